"""ParallelDims: the five parallel degrees, and the DeviceMesh they form.

The mesh is [pp, dp_replicate, dp_shard, cp, tp] with tp innermost, as in Llama 3 (§3.3.2), so the
ranks that talk most (tensor parallel) are neighbours on a node. Flattened views are built once here
and kept, because slicing a flattened dim from the root mesh is deprecated.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from dist_llama.config.schema import Degrees

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


@dataclass(frozen=True)
class ParallelDims(Degrees):
    """The degrees of a resolved ParallelConfig; dp, dp_cp, data_parallel and world_size come from Degrees."""

    pp: int
    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int

    @classmethod
    def from_config(cls, parallel) -> "ParallelDims":
        """From a resolved ParallelConfig (dp_shard already filled in by config.resolve_parallel)."""
        return cls(pp=parallel.pp, dp_replicate=parallel.dp_replicate, dp_shard=parallel.dp_shard,
                   cp=parallel.cp, tp=parallel.tp)

    def build_mesh(self, device_type: str) -> "Meshes":
        world = init_device_mesh(device_type, tuple(getattr(self, d) for d in MESH_DIMS),
                                 mesh_dim_names=MESH_DIMS)
        return Meshes(
            world=world,
            dp=world["dp_replicate", "dp_shard"]._flatten(mesh_dim_name="dp"),
            dp_shard_cp=world["dp_shard", "cp"]._flatten(mesh_dim_name="dp_shard_cp"),
            dp_cp=world["dp_replicate", "dp_shard", "cp"]._flatten(mesh_dim_name="dp_cp"),
        )


@dataclass(frozen=True)
class Meshes:
    """The world mesh and its flattened views."""

    world: DeviceMesh
    dp: DeviceMesh
    """Ranks that load different data (dp_replicate x dp_shard)."""
    dp_shard_cp: DeviceMesh
    """Ranks FSDP shards parameters over (cp folds in: same weights, different tokens)."""
    dp_cp: DeviceMesh
    """Ranks whose gradients are averaged and whose token counts add up to the global batch."""

    @property
    def pp_group(self):
        """The pipeline's process group, or None without pipeline parallelism."""
        return self.world["pp"].get_group() if self.world["pp"].size() > 1 else None

    def __getitem__(self, names):
        return self.world[names]
