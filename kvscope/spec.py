"""KV-cache geometry (KVSpec) and model presets.

A KVSpec says how many bytes one token's keys and values take across all layers; that single number turns token
counts into bytes everywhere in kvscope. The model fields beyond the KV geometry (hidden size, q heads, MLP width,
vocabulary) let the engine build a Llama-shaped model with random weights in the real architecture's shapes.
"""

from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass, replace

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class KVSpec:
    name: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "bfloat16"
    num_q_heads: int = 0  # 0 means "same as kv heads"
    hidden_size: int = 0  # 0 means num_q_heads * head_dim
    intermediate_size: int = 0  # 0 means 4 * hidden_size
    vocab_size: int = 32000

    def __post_init__(self) -> None:
        # Specs also come from trace metadata (from_dict), so types are checked too: a string where a count belongs
        # must be one ValueError naming the field, not a TypeError from the first comparison.
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"KVSpec: name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.dtype, str) or self.dtype not in DTYPE_BYTES:
            raise ValueError(f"KVSpec {self.name!r}: unknown dtype {self.dtype!r} (choose from {sorted(DTYPE_BYTES)})")
        for field in ("num_layers", "num_kv_heads", "head_dim"):
            _check_count(self.name, field, getattr(self, field), minimum=1)
        for field in ("num_q_heads", "hidden_size", "intermediate_size"):
            _check_count(self.name, field, getattr(self, field), minimum=0)
        _check_count(self.name, "vocab_size", self.vocab_size, minimum=1)
        if self.q_heads % self.num_kv_heads:
            raise ValueError(f"KVSpec {self.name!r}: q heads ({self.q_heads}) not a multiple of kv heads")

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def q_heads(self) -> int:
        return self.num_q_heads or self.num_kv_heads

    @property
    def hidden(self) -> int:
        return self.hidden_size or self.q_heads * self.head_dim

    @property
    def ffn(self) -> int:
        return self.intermediate_size or 4 * self.hidden

    @property
    def token_bytes_per_layer_kv(self) -> int:
        """Bytes of K (or of V) for one token in one layer: one row of one per-layer buffer."""
        return self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def bytes_per_token(self) -> int:
        """Bytes of K and V for one token over all layers."""
        return 2 * self.num_layers * self.token_bytes_per_layer_kv

    def with_layers(self, num_layers: int) -> KVSpec:
        return replace(self, num_layers=num_layers)

    def to_dict(self) -> dict:
        return asdict(self) | {"bytes_per_token": self.bytes_per_token}

    @classmethod
    def from_dict(cls, d: dict) -> KVSpec:
        fields = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**fields)


# Far above any real model (the largest presets have 80 layers and 64 heads of 128): a bound that turns a typo like
# `--layers 1000000000` into one line instead of billions of per-layer buffers.
MAX_DIMENSION = 1 << 20


def _is_count(value: object, minimum: int) -> bool:
    """An integer (not a bool, which is an int subclass) in minimum..MAX_DIMENSION."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return False
    return minimum <= int(value) <= MAX_DIMENSION


def _check_count(name: str, field: str, value: object, minimum: int) -> None:
    if not _is_count(value, minimum):
        raise ValueError(f"KVSpec {name!r}: {field} must be an integer in {minimum}..{MAX_DIMENSION:,}, got {value!r}")


PRESETS: dict[str, KVSpec] = {
    s.name: s
    for s in [
        KVSpec("llama-3-8b", 32, 8, 128, "bfloat16", 32, 4096, 14336, 128256),
        KVSpec("llama-2-7b", 32, 32, 128, "bfloat16", 32, 4096, 11008, 32000),
        KVSpec("yi-6b", 32, 4, 128, "bfloat16", 32, 4096, 11008, 64000),
        KVSpec("llama-3-70b", 80, 8, 128, "bfloat16", 64, 8192, 28672, 128256),
        KVSpec("opt-13b", 40, 40, 128, "bfloat16", 40, 5120, 20480, 50272),
        # Multi-query attention, one KV head (bigcode/starcoder): tensor parallelism replicates it on every rank.
        # Its two-matrix MLP of 24576 is written as the gated shape with the same weights (3 x 16384 = 2 x 24576).
        KVSpec("starcoder-15b", 40, 1, 128, "bfloat16", 48, 6144, 16384, 49152),
        # Small enough for real attention on a CPU in tests: 2 layers, GQA 2:1, float32.
        KVSpec("tiny", 2, 2, 16, "float32", 4, 64, 128, 256),
    ]
}


def get_spec(name: str, num_layers: int | None = None) -> KVSpec:
    """Look up a preset by name, optionally with another number of layers (None: the preset's own)."""
    spec = PRESETS.get(name.lower()) if isinstance(name, str) else None
    if spec is None:
        raise ValueError(f"unknown model preset {name!r}; choose from {', '.join(PRESETS)}")
    if num_layers is None:
        return spec
    # 0 used to mean "the preset's layers" (a falsy test); now it is refused like any other impossible count.
    if not _is_count(num_layers, 1):
        raise ValueError(f"--layers: must be an integer in 1..{MAX_DIMENSION:,}, got {num_layers!r}")
    return spec.with_layers(num_layers)
