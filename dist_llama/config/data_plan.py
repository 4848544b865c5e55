"""The data plan a config describes: its sources (data.sources, or data.path as the one source) and
its curriculum stages with every left-out field filled in, each checked before training starts
(exit 2 naming the stage index and key, e.g. `data.stages[1].seq_len: 2*cp=4 must divide it`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from dist_llama.config.errors import ConfigError
from dist_llama.config.schema import Config, ParallelConfig, SourceConfig


@dataclass(frozen=True)
class PlannedStage:
    seq_len: int
    global_batch_size: int
    weights: dict
    until_tokens: Optional[int]


def sources_of(cfg: Config) -> list[SourceConfig]:
    """data.sources, or data.path as one source (named after it)."""
    d = cfg.data
    if not d.sources:
        return [SourceConfig(name=str(d.path).rstrip("/").rsplit("/", 1)[-1] or "data", path=d.path, weight=1.0)]
    return list(d.sources)


def held_out_of(cfg: Config) -> bool:
    """Whether the config holds data out for validation (data.eval_sources, or data.eval_fraction)."""
    return bool(cfg.data.eval_sources) or cfg.data.eval_fraction > 0


def stages_of(cfg: Config) -> list[PlannedStage]:
    """The stages with left-out fields taken from the previous stage (stage 0: data.seq_len,
    train.global_batch_size and the sources' weights); no data.stages: one stage of those."""
    seq_len, batch = cfg.data.seq_len, cfg.train.global_batch_size
    weights = {s.name: float(s.weight) for s in sources_of(cfg)}
    out = []
    for st in cfg.data.stages or [None]:
        if st is not None:
            seq_len = st.seq_len if st.seq_len is not None else seq_len
            batch = st.global_batch_size if st.global_batch_size is not None else batch
            weights = {k: float(v) for k, v in st.weights.items()} if st.weights is not None else weights
        out.append(PlannedStage(seq_len, batch, dict(weights), st.until_tokens if st is not None else None))
    return out


def validate_data_plan(cfg: Config, parallel: ParallelConfig, check_layout) -> None:
    """Sources and stages; `check_layout(seq_len, global_batch_size, key_prefix)` checks one stage's
    shape against the layout (raises ConfigError naming the key it is given)."""
    sources = sources_of(cfg)
    names = [s.name for s in sources]
    for i, s in enumerate(sources if cfg.data.sources else []):
        key = f"data.sources[{i}]"
        _require(bool(s.name) and names.count(s.name) == 1, f"{key}.name", f"must be a unique non-empty name, got {s.name!r}")
        _require(bool(s.path), f"{key}.path", "must name a prepared dataset directory or a builtin corpus")
        _require(s.weight >= 0, f"{key}.weight", f"must be >= 0, got {s.weight}")
    _require(sum(s.weight for s in sources) > 0, "data.sources", "the weights must not all be 0")
    stages = stages_of(cfg)
    multi = bool(cfg.data.stages)
    previous = 0
    for i, st in enumerate(stages):
        prefix = f"data.stages[{i}]." if multi else ""
        _require(st.seq_len > 0, f"{prefix}seq_len" if multi else "data.seq_len", f"must be positive, got {st.seq_len}")
        _require(st.global_batch_size > 0, f"{prefix}global_batch_size" if multi else "train.global_batch_size",
                 f"must be positive, got {st.global_batch_size}")
        unknown = sorted(set(st.weights) - set(names))
        _require(not unknown and all(w >= 0 for w in st.weights.values()) and sum(st.weights.values()) > 0,
                 f"{prefix}weights" if multi else "data.sources",
                 f"must give non-negative weights, not all 0, to sources among {names}; got {st.weights}")
        last = i == len(stages) - 1
        if multi:
            until = st.until_tokens
            _require(until is not None or last, f"{prefix}until_tokens", "only the last stage may leave it out")
            _require(until is None or until > previous, f"{prefix}until_tokens",
                     f"must be above the previous stage's ({previous}), got {until}")
            previous = until if until is not None else previous
            if parallel.pp > 1 or parallel.engine == "deepspeed":
                first = stages[0]
                what = "pipeline parallel (parallel.pp > 1)" if parallel.pp > 1 else "parallel.engine=deepspeed"
                _require(st.seq_len == first.seq_len or parallel.pp == 1, f"{prefix}seq_len",
                         f"{what} needs one seq_len for every stage ({first.seq_len}), got {st.seq_len}")
                _require(st.global_batch_size == first.global_batch_size, f"{prefix}global_batch_size",
                         f"{what} needs one global batch for every stage ({first.global_batch_size}), "
                         f"got {st.global_batch_size}")
        check_layout(st.seq_len, st.global_batch_size, prefix)
    _validate_eval(cfg)


def _validate_eval(cfg: Config) -> None:
    """Held-out data and the validation cadence. Whether each held-out source has a window is
    checked once the sources are open (train/cli.py)."""
    d, t = cfg.data, cfg.train
    _require(0.0 <= d.eval_fraction < 1.0, "data.eval_fraction", f"must be in [0, 1), got {d.eval_fraction}")
    _require(not (d.eval_sources and d.eval_fraction > 0), "data.eval_sources",
             f"set either data.eval_sources or data.eval_fraction (={d.eval_fraction}), not both")
    names = [s.name for s in d.eval_sources or []]
    for i, s in enumerate(d.eval_sources or []):
        key = f"data.eval_sources[{i}]"
        _require(bool(s.name) and names.count(s.name) == 1, f"{key}.name", f"must be a unique non-empty name, got {s.name!r}")
        _require(bool(s.path), f"{key}.path", "must name a prepared dataset directory or a builtin corpus")
    _require(t.eval_interval >= 0, "train.eval_interval", f"must be >= 0 (0 = never), got {t.eval_interval}")
    _require(t.eval_tokens > 0, "train.eval_tokens", f"must be positive, got {t.eval_tokens}")
    _require(t.eval_interval == 0 or held_out_of(cfg), "train.eval_interval",
             "validation needs held-out data: set data.eval_sources or data.eval_fraction > 0")


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)
