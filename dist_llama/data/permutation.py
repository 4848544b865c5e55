"""A pseudo-random permutation of [0, n) computed per index, never materialised.

A balanced Feistel network on the smallest even number of bits covering n is a bijection of
[0, 4^k); cycle-walking (apply it again while the result is >= n) restricts it to a bijection of
[0, n). Memory is O(1) and each index costs a few rounds of integer mixing, so the first batch of a
15T-token corpus is as quick to find as the first batch of a small one, at any position.
"""

from __future__ import annotations

import numpy as np

_ROUNDS = 6
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a well-mixed 64-bit function of x (uint64 arithmetic wraps)."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


def mix_key(*parts: int) -> int:
    """A 64-bit key from integers (seed, source, stage, epoch, ...): stable across processes."""
    key = np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        for p in parts:
            key = _mix(np.asarray(key ^ np.uint64(p & 0xFFFFFFFFFFFFFFFF)))
    return int(key)


class KeyedPermutation:
    """perm(i) for i in [0, n): a bijection chosen by `key`."""

    def __init__(self, n: int, key: int):
        if n < 1:
            raise ValueError(f"a permutation needs n >= 1, got {n}")
        self.n = int(n)
        half = max(1, (max(1, self.n - 1).bit_length() + 1) // 2)
        self.half_bits = np.uint64(half)
        self.mask = np.uint64((1 << half) - 1)
        self.round_keys = [np.uint64(mix_key(key, r)) for r in range(_ROUNDS)]

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self.half_bits, x & self.mask
        with np.errstate(over="ignore"):
            for k in self.round_keys:
                left, right = right, left ^ (_mix(right ^ k) & self.mask)
        return (left << self.half_bits) | right

    def __call__(self, index) -> np.ndarray:
        """The images of `index` (an int or an int array, each in [0, n)), as int64."""
        x = np.atleast_1d(np.asarray(index, dtype=np.uint64))
        if x.size and int(x.max()) >= self.n:
            raise IndexError(f"index {int(x.max())} outside [0, {self.n})")
        out = self._feistel(x)
        outside = out >= np.uint64(self.n)
        while outside.any():  # cycle-walk: at most a few rounds, the domain is < 4n
            out[outside] = self._feistel(out[outside])
            outside = out >= np.uint64(self.n)
        return out.astype(np.int64)


def uniform(key: int, index: np.ndarray) -> np.ndarray:
    """A float64 in [0, 1) per index, a pure function of (key, index)."""
    with np.errstate(over="ignore"):
        bits = _mix(np.asarray(index, dtype=np.uint64) ^ np.uint64(key))
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


class EpochOrder:
    """Global sample k → item perm_e(k mod n) of epoch e = k // n, a keyed permutation per epoch:
    a pure function of (seed, salt, k), so a loader's state is only how many samples it consumed."""

    def __init__(self, n: int, seed: int, salt: int):
        self.n, self.seed, self.salt = n, seed, salt
        self._perm: tuple[int, KeyedPermutation] | None = None

    def __call__(self, k: int) -> int:
        epoch = k // self.n
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, KeyedPermutation(self.n, mix_key(self.seed, self.salt, epoch)))
        return int(self._perm[1](k % self.n)[0])


def restored_consumed(saved: dict, mine: dict, keys) -> int:
    """The sample count of a saved loader state whose `keys` equal this loader's (ValueError naming
    the first that does not, or a bad count)."""
    for key in keys:
        if saved.get(key) != mine[key]:
            raise ValueError(f"data loader state mismatch on {key!r}: checkpoint has {saved.get(key)!r}, "
                             f"current run has {mine[key]!r}")
    consumed = saved.get("consumed")
    if not isinstance(consumed, (int, np.integer)) or consumed < 0:
        raise ValueError(f"data loader state has a bad 'consumed' value: {consumed!r}")
    return int(consumed)
