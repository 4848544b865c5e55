"""Communication on one rank: a kind of traffic summed over a step (Collective), the achieved link
bandwidths (Links), and whether a mesh dimension's group leaves the node."""

from __future__ import annotations

from dataclasses import dataclass

from dist_llama.plan.hardware import Hardware


@dataclass
class Collective:
    """One kind of communication, summed over a step on one rank."""

    name: str
    """What and where (e.g. "tp all-gather/reduce-scatter (nvlink)")."""
    bytes_per_step: float
    """Bytes this rank sends per step (ring bus volume)."""
    seconds: float
    """Time the transfers take at the achieved bandwidth."""
    exposed_seconds: float
    """Part of it not hidden behind compute."""


@dataclass(frozen=True)
class Links:
    """Achieved bandwidths and per-call latency, the hardware's or the calibration's."""

    nvlink: float
    network: float
    host: float
    latency_s: float

    @classmethod
    def of(cls, hw: Hardware, cal) -> "Links":
        intra = hw.link_efficiency if hw.link_efficiency is not None else cal.intra_node_efficiency
        inter = hw.link_efficiency if hw.link_efficiency is not None else cal.inter_node_efficiency
        latency = hw.collective_latency_s if hw.collective_latency_s is not None else cal.collective_latency_s
        return cls(hw.intra_node_bw * intra, hw.inter_node_bw * inter, hw.host_bw, latency)

    def time(self, volume: float, bw: float, calls: float) -> float:
        return volume / bw + calls * self.latency_s


def group_spans_nodes(inner: int, size: int, hw: Hardware) -> bool:
    """A mesh dim of `size` ranks with stride `inner` (product of the dims inside it) fits a node
    only if inner*size ranks do."""
    return size > 1 and inner * size > hw.gpus_per_node


def collective(name: str, volume: float, bw: float, calls: float, links: Links, hidden: float) -> Collective:
    secs = links.time(volume, bw, calls)
    return Collective(name, volume, secs, secs * (1 - hidden))
