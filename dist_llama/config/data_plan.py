"""The data plan a config describes: its sources (data.sources, or data.path as the one source) and
its curriculum stages with every left-out field filled in, each checked before training starts
(exit 2 naming the stage index and key, e.g. `data.stages[1].seq_len: 2*cp=4 must divide it`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from dist_llama.config.engines import engine_facts
from dist_llama.config.errors import ConfigError
from dist_llama.config.objectives import objective_spec
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
    train.global_batch_size and the sources' weights); no data.stages: one stage of those. With
    data.anneal_tokens, the stage in effect at (total tokens - anneal_tokens) is cut there and an
    annealing stage (data.anneal_weights) runs to the end."""
    stages = _declared_stages(cfg)
    d = cfg.data
    if d.anneal_tokens <= 0:
        return stages
    start = token_clock(stages, cfg.train.steps)[-1] - d.anneal_tokens
    i = next((i for i, st in enumerate(stages) if st.until_tokens is None or st.until_tokens > start), len(stages) - 1)
    last = stages[i]
    weights = {k: float(v) for k, v in d.anneal_weights.items()} if d.anneal_weights else last.weights
    anneal = PlannedStage(last.seq_len, last.global_batch_size, weights, None)
    begins = stages[i - 1].until_tokens if i else 0
    if start <= begins:  # the annealing starts where stage i would: it replaces it
        return stages[:i] + [anneal]
    return stages[:i] + [PlannedStage(last.seq_len, last.global_batch_size, last.weights, start), anneal]


def token_clock(stages: list[PlannedStage], steps: int) -> list[int]:
    """Input tokens consumed before each of steps + 1 step boundaries."""
    out, tokens, t = [0], 0, 0
    for _ in range(steps):
        while t + 1 < len(stages) and stages[t].until_tokens is not None and tokens >= stages[t].until_tokens:
            t += 1
        tokens += stages[t].seq_len * stages[t].global_batch_size
        out.append(tokens)
    return out


def anneal_start_step(cfg: Config) -> Optional[int]:
    """The first (0-based) step of the annealing stage, or None without annealing."""
    if cfg.data.anneal_tokens <= 0:
        return None
    stages = stages_of(cfg)
    start = stages[-2].until_tokens if len(stages) > 1 else 0
    return next(s for s, tokens in enumerate(token_clock(stages, cfg.train.steps)) if tokens >= start)


def _declared_stages(cfg: Config) -> list[PlannedStage]:
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
        _require(bool(s.name) and s.name not in names[:i], f"{key}.name", f"must be a unique non-empty name, got {s.name!r}")
        _require(bool(s.path), f"{key}.path", "must name a prepared dataset directory or a builtin corpus")
        _require(s.weight >= 0, f"{key}.weight", f"must be >= 0, got {s.weight}")
    _require(sum(s.weight for s in sources) > 0, "data.sources", "the weights must not all be 0")
    d = cfg.data
    _require(d.anneal_tokens >= 0, "data.anneal_tokens", f"must be >= 0, got {d.anneal_tokens}")
    if d.anneal_tokens:
        total = token_clock(_declared_stages(cfg), cfg.train.steps)[-1]
        _require(d.anneal_tokens < total, "data.anneal_tokens",
                 f"must be below the {total} tokens of the whole run (train.steps={cfg.train.steps}), got {d.anneal_tokens}")
    _require(not d.anneal_weights or d.anneal_tokens > 0, "data.anneal_weights", "needs data.anneal_tokens > 0")
    if d.anneal_weights:
        unknown = sorted(set(d.anneal_weights) - set(names))
        _require(not unknown and all(w >= 0 for w in d.anneal_weights.values())
                 and sum(d.anneal_weights.values()) > 0, "data.anneal_weights",
                 f"must give non-negative weights, not all 0, to sources among {names}; got {dict(d.anneal_weights)}")
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
            if engine_facts(parallel).fixed_global_batch:  # e.g. DeepSpeed's train_batch_size
                _require(st.global_batch_size == stages[0].global_batch_size, f"{prefix}global_batch_size",
                         f"parallel.engine={parallel.engine} needs one global batch for every stage "
                         f"({stages[0].global_batch_size}), got {st.global_batch_size}")
        check_layout(st.seq_len, st.global_batch_size, prefix)
    _validate_eval(cfg)


def _validate_eval(cfg: Config) -> None:
    """Held-out data and the validation cadence. Whether each held-out source has a window is
    checked once the sources are open (train/cli.py)."""
    d, t = cfg.data, cfg.train
    _require(0.0 <= d.eval_fraction < 1.0, "data.eval_fraction", f"must be in [0, 1), got {d.eval_fraction}")
    names = [s.name for s in d.eval_sources or []]
    for i, s in enumerate(d.eval_sources or []):
        key = f"data.eval_sources[{i}]"
        _require(bool(s.name) and names.count(s.name) == 1, f"{key}.name", f"must be a unique non-empty name, got {s.name!r}")
        _require(bool(s.path), f"{key}.path", "must name a prepared dataset directory or a builtin corpus")
    _require(t.eval_interval >= 0, "train.eval_interval", f"must be >= 0 (0 = never), got {t.eval_interval}")
    _require(t.eval_tokens > 0, "train.eval_tokens", f"must be positive, got {t.eval_tokens}")
    _require(t.eval_interval == 0 or held_out_of(cfg), "train.eval_interval",
             "validation needs held-out data: set data.eval_sources or data.eval_fraction > 0")
    _validate_downstream(cfg)


def _validate_downstream(cfg: Config) -> None:
    """In-loop downstream scores (train/downstream.py). Whether the tasks exist and their data files
    are on disk is checked once lm-eval is imported (train/cli.py)."""
    t = cfg.train
    _require(t.downstream_eval_interval >= 0, "train.downstream_eval_interval",
             f"must be >= 0 (0 = never), got {t.downstream_eval_interval}")
    _require(t.downstream_limit > 0, "train.downstream_limit", f"must be positive, got {t.downstream_limit}")
    if t.downstream_eval_interval:
        _require(bool(t.downstream_tasks), "train.downstream_tasks",
                 "name at least one lm-eval task when train.downstream_eval_interval > 0")
        _require(not objective_spec(t.objective).score_head, "train.downstream_eval_interval",
                 f"must be 0 with train.objective={t.objective} (a reward model has no language-model head)")


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)
