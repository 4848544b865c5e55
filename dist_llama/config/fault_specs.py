"""The grammar of fault specs: "kind:key=value:key=value", e.g. "kill:rank=1:step=7". Parsing only
(plain Python, no side effects), so config validation can check specs; what each kind does, and
the injector that does it, are in dist_llama/faults.py."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional

ENV_VAR = "DIST_LLAMA_FAULTS"

_INT, _FLOAT = "int", "float"
KINDS: dict[str, tuple[dict[str, str], dict[str, str]]] = {
    # kind: (required keys, optional keys), each key -> its type
    "kill": ({"rank": _INT, "step": _INT}, {}),
    "crash": ({"step": _INT}, {"rank": _INT}),
    "hang": ({"rank": _INT, "step": _INT}, {}),
    "sigterm": ({"rank": _INT, "step": _INT}, {}),
    "nan": ({"step": _INT}, {"rank": _INT, "times": _INT}),
    "bitflip": ({"rank": _INT, "step": _INT}, {"bit": _INT}),
    "slow": ({"rank": _INT, "factor": _FLOAT}, {}),
    "ckpt_fail": ({"step": _INT}, {"rank": _INT}),
    "ckpt_corrupt": ({"step": _INT}, {"rank": _INT}),
}
KEY_ORDER = ("rank", "step", "times", "bit", "factor")
"""Canonical key order: the same fault written with its keys in another order is the same fault
(one marker)."""


@dataclass(frozen=True)
class FaultSpec:
    kind: str
    params: tuple[tuple[str, float | int], ...]
    """(key, value) in KEY_ORDER."""

    def get(self, key: str, default=None):
        return dict(self.params).get(key, default)

    @property
    def rank(self) -> Optional[int]:
        return self.get("rank")

    @property
    def canonical(self) -> str:
        return ":".join([self.kind] + [f"{k}={v}" for k, v in self.params])


def _allowed() -> str:
    return "; ".join(f"{kind}: {', '.join(req)}" + (f" [{', '.join(opt)}]" if opt else "")
                     for kind, (req, opt) in KINDS.items())


def parse_spec(spec: str, world_size: Optional[int] = None) -> FaultSpec:
    """Parse one spec; ValueError naming the spec and what is allowed when it is malformed."""
    def fail(why: str) -> ValueError:
        return ValueError(f"bad fault spec {spec!r}: {why}. Allowed (kind: required keys [optional]): "
                          f"{_allowed()}; written kind:key=value:key=value, e.g. 'kill:rank=1:step=7'")

    if not isinstance(spec, str) or not spec.strip():
        raise fail("empty")
    kind, *pairs = [s.strip() for s in spec.strip().split(":")]
    if kind not in KINDS:
        raise fail(f"unknown kind {kind!r}")
    required, optional = KINDS[kind]
    types = {**required, **optional}
    values: dict[str, float | int] = {}
    for pair in pairs:
        key, eq, raw = (s.strip() for s in pair.partition("="))
        if not eq or not key or not raw:
            raise fail(f"{pair!r} is not key=value")
        if key not in types:
            raise fail(f"unknown key {key!r} for {kind} (keys: {', '.join(types)})")
        if key in values:
            raise fail(f"key {key!r} given twice")
        try:
            value = int(raw) if types[key] == _INT else float(raw)
        except ValueError:
            raise fail(f"{key}={raw!r} is not {'an integer' if types[key] == _INT else 'a number'}") from None
        values[key] = value
    missing = [k for k in required if k not in values]
    if missing:
        raise fail(f"{kind} needs {', '.join(missing)}")
    for key in ("rank", "step", "bit"):
        if key in values and values[key] < 0:
            raise fail(f"{key} must be >= 0")
    if "times" in values and values["times"] < 1:
        raise fail("times must be >= 1")
    if "factor" in values and not values["factor"] >= 1:
        raise fail("factor must be >= 1")
    if world_size is not None and values.get("rank", 0) >= world_size:
        raise fail(f"rank {values['rank']} does not exist in a world of {world_size} ranks")
    if kind == "nan":
        values.setdefault("times", 1)
    return FaultSpec(kind, tuple((k, values[k]) for k in KEY_ORDER if k in values))


def validate_specs(specs: Iterable[str], world_size: Optional[int] = None) -> list[FaultSpec]:
    """Parse every spec (config validation: no files, no side effects); ValueError on the first bad one."""
    return [parse_spec(s, world_size) for s in specs]


def specs_from_env(environ: Mapping[str, str] = os.environ) -> list[str]:
    return [s.strip() for s in environ.get(ENV_VAR, "").split(",") if s.strip()]
