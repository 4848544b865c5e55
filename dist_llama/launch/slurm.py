"""`dist-llama-submit`: render the Slurm batch script for a training config, show it, or submit it.

    dist-llama-submit --config configs/llama3_8b.yaml --cluster h100 --nodes 4 [key=value ...]
    dist-llama-submit --config configs/debug.yaml --nodes 2 --gpus-per-node 2 --cpu --cluster local --wait
    dist-llama-submit --config configs/llama3_405b.yaml --cluster h100 --dry-run

The job size comes from --nodes x --gpus-per-node, or, without --nodes, from the config's parallel
layout (every degree explicit). Everything is validated against that world size before anything is
written. Submitting writes <run_dir>/slurm/{config.yaml, job.sbatch} and runs sbatch; the job's log is
<run_dir>/slurm/<job name>-<job id>.out (all requeues append to it), per-rank logs are under
<run_dir>/logs/. The batch script itself (train.sbatch beside this file) explains preemption,
requeue, preflight and the exclude list.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from omegaconf import OmegaConf

from dist_llama import config as config_lib
from dist_llama.config import CONFIG_DIR, EXIT_CONFIG, ConfigError
from dist_llama.config.errors import ArgumentParser as OneLineParser
from dist_llama.launch.local import torchrun_args
from dist_llama.launch.script_values import (NAME, check, check_line, default_job_name, sbatch_path,
                                             validate_cluster)

TEMPLATE = Path(__file__).with_name("train.sbatch")


@dataclass
class ClusterConfig:
    """A Slurm cluster preset (configs/clusters/NAME.yaml); every field can also be overridden."""

    partition: Optional[str] = None
    """Partition (queue) to submit to; None = the cluster's default."""
    account: Optional[str] = None
    """Account to charge; None = the user's default."""
    qos: Optional[str] = None
    """Quality of service; None = the default."""
    constraint: Optional[str] = None
    """Node features the job needs (sbatch --constraint)."""
    gpus_per_node: int = 8
    """GPUs on each node: one rank per GPU."""
    cpus_per_task: Optional[int] = None
    """CPUs for each node's task (torchrun and all its ranks); None = the cluster's default."""
    time: str = "24:00:00"
    """Time limit of one allocation; the job requeues itself after a preemption notice."""
    signal_lead_s: int = 300
    """USR1 this many seconds before the time limit: the trainer's time to reach a step boundary and save."""
    exclude: list[str] = field(default_factory=list)
    """Nodes never to use (known bad); nodes failing preflight are added per run in <run_dir>/slurm/bad_nodes."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run first in the batch script (module load, conda activate, exported NCCL settings)."""
    python: Optional[str] = None
    """Python on the compute nodes; None = the interpreter running dist-llama-submit."""
    max_restarts: int = 3
    """torchrun worker-group restarts inside one allocation (a killed or crashed rank)."""
    max_requeues: int = 20
    """Requeues after preemption notices before the job stops requeueing itself."""
    max_resubmits: int = 3
    """Resubmissions after preflight failures (each without the failing nodes)."""
    max_failures: int = 2
    """Requeues after an allocation whose training failed for good (torchrun's restarts exhausted);
    never after a configuration error or a detected crash loop."""
    port_base: int = 29500
    """Rendezvous port = port_base + job id % 1000, so jobs sharing a node do not collide."""
    sbatch: list[str] = field(default_factory=list)
    """Extra sbatch options, verbatim (e.g. '--mem=0', '--exclusive')."""


def load_cluster(name: Optional[str], overrides: Sequence[str] = ()) -> ClusterConfig:
    """The preset's values over ClusterConfig's defaults (no preset: the defaults alone)."""
    path = name
    if name and not Path(name).is_file():
        path = str(CONFIG_DIR / "clusters" / f"{name}.yaml")
        if not Path(path).is_file():
            known = sorted(p.stem for p in (CONFIG_DIR / "clusters").glob("*.yaml"))
            raise ConfigError("--cluster", f"no file {name} and no preset {name!r}; presets: {', '.join(known)}")
    check_time_values(path, overrides)
    return config_lib.to_object(config_lib.load(path, overrides, schema=ClusterConfig, flag="--cluster",
                                                prefix="cluster."))


def check_time_values(path: Optional[str], overrides: Sequence[str]) -> None:
    """A time limit must reach sbatch as written: YAML 1.1 reads an unquoted 48:00:00 as the base-60
    integer 172800, which sbatch would take as minutes (120 days)."""
    from dist_llama.config.loading import parse_override, preset_path, read_yaml

    found = [(str(path), read_yaml(preset_path(path, "--cluster"), "--cluster").get("time"))] if path else []
    found += [("the command line", parse_override(o).get("time")) for o in overrides if o.split("=", 1)[0] == "time"]
    for where, value in found:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            raise ConfigError("cluster.time", f"is the number {value} in {where} (YAML reads an unquoted 48:00:00 as "
                                              "a base-60 integer): quote it, e.g. time: \"48:00:00\"")


def job_size(cfg: config_lib.Config, nodes: Optional[int], gpus_per_node: int) -> int:
    """Nodes for the job: given, or the layout's world size over GPUs per node."""
    if nodes is not None:
        if nodes < 1:
            raise ConfigError("--nodes", f"must be >= 1, got {nodes}")
        return nodes
    p = cfg.parallel
    if p.dp_shard == -1:
        raise ConfigError("--nodes", "give --nodes, or set parallel.dp_shard so the layout fixes the world size")
    world = p.world_size
    if world % gpus_per_node:
        raise ConfigError("--gpus-per-node", f"the layout's {world} ranks do not fill nodes of {gpus_per_node}")
    return world // gpus_per_node


def sbatch_lines(cluster: ClusterConfig, nproc: int, cpu: bool) -> str:
    options = [f"--gpus-per-node={nproc}"] if not cpu else []
    for key in ("partition", "account", "qos", "constraint", "cpus_per_task"):
        value = getattr(cluster, key)
        if value is not None:
            options.append(f"--{key.replace('_', '-')}={value}")
    if cluster.exclude:  # validated: names and hostlist expressions, nothing to quote
        options.append(f"--exclude={','.join(cluster.exclude)}")
    options += cluster.sbatch
    return "".join(f"#SBATCH {o}\n" for o in options)


def render(template: str, values: dict[str, object]) -> str:
    def substitute(match: re.Match) -> str:
        return str(values[match.group(1)])

    missing = set(re.findall(r"{{(\w+)}}", template)) - set(values)
    if missing:
        raise KeyError(f"train.sbatch needs values for {sorted(missing)}")
    return re.sub(r"{{(\w+)}}", substitute, template)


@dataclass
class Job:
    """What one submission consists of: the batch script and the training config it runs."""

    script: str
    config_yaml: str
    run_dir: Path
    nodes: int
    nproc: int

    @property
    def script_path(self) -> Path:
        return self.run_dir / "slurm" / "job.sbatch"

    @property
    def config_path(self) -> Path:
        return self.run_dir / "slurm" / "config.yaml"


def build_job(config_path: Optional[str], overrides: Sequence[str], cluster: ClusterConfig, nodes: Optional[int],
              cpu: bool, job_name: Optional[str] = None, workdir: Optional[Path] = None) -> Job:
    """Validate the config for the job's world size and render the batch script (writes nothing)."""
    workdir = (workdir or Path.cwd()).resolve()
    if job_name is not None:
        check("--job-name", job_name, NAME, "a job name ([A-Za-z0-9._+-])")
    overrides = list(overrides) + (["train.device=cpu"] if cpu else [])
    raw = config_lib.load(config_path, overrides)
    cfg = config_lib.to_object(raw)
    nproc = cluster.gpus_per_node
    nodes = job_size(cfg, nodes, nproc)
    config_lib.validate(cfg, nodes * nproc)
    # The job runs from a snapshot, so editing the preset later cannot change a run mid-way.
    run_dir = (workdir / cfg.train.run_dir).resolve()
    check_line("train.run_dir", str(run_dir))
    check_line("working directory", str(workdir))
    raw.train.run_dir = str(run_dir)
    job = Job(script="", config_yaml=OmegaConf.to_yaml(raw), run_dir=run_dir, nodes=nodes, nproc=nproc)
    q = shlex.quote
    args = torchrun_args(nproc, nodes, '"$MASTER_ADDR:$MASTER_PORT"', '"$SLURM_JOB_ID"', cluster.max_restarts,
                         '"$RUN_DIR/logs/job-$SLURM_JOB_ID-$requeues"', [f"--config={q(str(job.config_path))}"])
    # Each value is quoted here, once, for where the template puts it: q() for shell lines,
    # sbatch_path() for #SBATCH lines; validated names and numbers need neither.
    job.script = render(TEMPLATE.read_text(), {
        "job_name": job_name or default_job_name(run_dir.name),
        "nodes": nodes,
        "nproc": nproc,
        "script": q(str(job.script_path)),
        "sbatch_lines": sbatch_lines(cluster, nproc, cpu),
        "time": cluster.time,
        "signal_lead_s": cluster.signal_lead_s,
        "run_dir": q(str(run_dir)),
        "output_dir": sbatch_path("train.run_dir", f"{run_dir}/slurm", pattern=True),
        "chdir": sbatch_path("working directory", str(workdir)),
        "python": q(cluster.python or sys.executable),
        "exclude": q(",".join(cluster.exclude)),
        "setup": "\n".join(cluster.setup),
        "port_base": cluster.port_base,
        "preflight_device": "--cpu" if cpu else f"--gpus {nproc}",
        "max_resubmits": cluster.max_resubmits,
        "max_requeues": cluster.max_requeues,
        "max_failures": cluster.max_failures,
        "torchrun_args": " \\\n    ".join(args[:args.index("-m")] + [" ".join(args[args.index("-m"):])]),
    })
    return job


def write_job(job: Job) -> None:
    job.script_path.parent.mkdir(parents=True, exist_ok=True)
    for path, text in ((job.config_path, job.config_yaml), (job.script_path, job.script)):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)


def parse_args(argv: Optional[Sequence[str]]):
    parser = OneLineParser(
        prog="dist-llama-submit", description="Render, show or submit the Slurm batch script for a training run. "
        "Extra key=value arguments override the training config; cluster.KEY=value overrides the cluster preset.")
    parser.add_argument("--config", required=True, help="training YAML preset (a path, or a name in configs/)")
    parser.add_argument("--cluster", help="cluster preset: a name in configs/clusters/ or a path (default: none)")
    parser.add_argument("--nodes", type=int, help="nodes (default: the layout's world size / GPUs per node)")
    parser.add_argument("--gpus-per-node", type=int, help="GPUs per node = ranks per node (default: the preset's)")
    parser.add_argument("--cpu", action="store_true", help="gloo ranks on CPUs: --gpus-per-node ranks per node, no GPUs")
    parser.add_argument("--time", help="time limit per allocation, e.g. 04:00:00 (default: the preset's)")
    parser.add_argument("--exclude", help="comma-separated nodes to avoid, added to the preset's")
    parser.add_argument("--job-name", help="default: dist-llama-<run directory name>")
    parser.add_argument("--max-failures", type=int, help="requeues after failed allocations (default: the preset's)")
    parser.add_argument("--dry-run", action="store_true", help="print the batch script; write and submit nothing")
    parser.add_argument("--wait", action="store_true", help="sbatch --wait: return when the job (and its requeues) ends")
    return parser.parse_known_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, rest = parse_args(argv)
    cluster_overrides = [o.split("cluster.", 1)[1] for o in rest if o.lstrip("-").startswith("cluster.")]
    overrides = [o for o in rest if not o.lstrip("-").startswith("cluster.")]
    try:
        cluster = load_cluster(args.cluster, cluster_overrides)
        flags = {"gpus_per_node": args.gpus_per_node, "time": args.time, "max_failures": args.max_failures}
        given = {k: v for k, v in flags.items() if v is not None}
        cluster = dataclasses.replace(cluster, **given)
        if args.exclude:
            cluster.exclude = cluster.exclude + [n for n in args.exclude.split(",") if n]
            given["exclude"] = args.exclude
        validate_cluster(cluster, {k: "--" + k.replace("_", "-") for k in given})
        job = build_job(args.config, overrides, cluster, args.nodes, args.cpu, args.job_name)
    except ConfigError as exc:
        print(f"dist-llama-submit: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    summary = (f"{job.nodes} node(s) x {job.nproc} {'CPU rank' if args.cpu else 'GPU'}(s) = "
               f"{job.nodes * job.nproc} ranks; run directory {job.run_dir}")
    if args.dry_run:
        print(job.script, end="")
        print(f"# dry run: {summary}; would write {job.script_path} and {job.config_path}", file=sys.stderr)
        return 0
    try:
        write_job(job)
    except OSError as exc:  # a run directory that cannot hold the job's files: nothing is submitted
        print(f"dist-llama-submit: config error: train.run_dir: cannot write {job.script_path.parent} "
              f"({exc.strerror or exc})", file=sys.stderr)
        return EXIT_CONFIG
    cmd = ["sbatch", "--parsable"] + (["--wait"] if args.wait else []) + [str(job.script_path)]
    print(f"dist-llama-submit: {summary}\n  {' '.join(cmd)}", file=sys.stderr, flush=True)
    if args.wait:
        return _submit_and_wait(cmd, job)
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        print(f"dist-llama-submit: sbatch failed: {out.stderr.strip()}", file=sys.stderr)
        return out.returncode
    job_id = out.stdout.strip().split(";")[0]
    print(job_id)
    print(f"  log: {job.run_dir}/slurm/*-{job_id}.out   watch: squeue -j {job_id}   stop: scancel {job_id}",
          file=sys.stderr)
    return 0


def _submit_and_wait(cmd: list[str], job: Job) -> int:
    """sbatch --wait prints the id at once and returns the job's exit code when it ends."""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as proc:
        job_id = proc.stdout.readline().strip().split(";")[0]
        print(job_id, flush=True)
        print(f"  log: {job.run_dir}/slurm/*-{job_id}.out", file=sys.stderr, flush=True)
        return proc.wait()


if __name__ == "__main__":
    sys.exit(main())
