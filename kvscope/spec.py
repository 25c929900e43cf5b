"""KV-cache geometry (KVSpec) and model presets.

A KVSpec says how many bytes one token's keys and values take across all layers; that single number turns token
counts into bytes everywhere in kvscope. The model fields beyond the KV geometry (hidden size, q heads, MLP width,
vocabulary) let the engine build a Llama-shaped model with random weights in the real architecture's shapes.
"""

from __future__ import annotations

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
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"KVSpec {self.name!r}: unknown dtype {self.dtype!r} (choose from {sorted(DTYPE_BYTES)})")
        for field in ("num_layers", "num_kv_heads", "head_dim"):
            if getattr(self, field) <= 0:
                raise ValueError(f"KVSpec {self.name!r}: {field} must be positive, got {getattr(self, field)}")
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


PRESETS: dict[str, KVSpec] = {
    s.name: s
    for s in [
        KVSpec("llama-3-8b", 32, 8, 128, "bfloat16", 32, 4096, 14336, 128256),
        KVSpec("llama-2-7b", 32, 32, 128, "bfloat16", 32, 4096, 11008, 32000),
        KVSpec("yi-6b", 32, 4, 128, "bfloat16", 32, 4096, 11008, 64000),
        KVSpec("llama-3-70b", 80, 8, 128, "bfloat16", 64, 8192, 28672, 128256),
        KVSpec("opt-13b", 40, 40, 128, "bfloat16", 40, 5120, 20480, 50272),
        # Small enough for real attention on a CPU in tests: 2 layers, GQA 2:1, float32.
        KVSpec("tiny", 2, 2, 16, "float32", 4, 64, 128, 256),
    ]
}


def get_spec(name: str, num_layers: int | None = None) -> KVSpec:
    """Look up a preset by name, optionally with another number of layers."""
    try:
        spec = PRESETS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; choose from {', '.join(PRESETS)}") from None
    return spec.with_layers(num_layers) if num_layers else spec
