"""How many compiled variants of kvscope's Triton kernels this process holds: the measure of "no compilation in a
measured run" (the cuda executor reads it after its warm-up and at the end; tests/test_gpu_compiles.py expects no
growth). 0 under Triton's interpreter, which compiles nothing."""

from __future__ import annotations

from typing import Any

from . import block_copy, decode, kv_store, prefill

KERNELS = {
    "decode_split": decode._decode_split_kernel,
    "decode_reduce": decode._decode_reduce_kernel,
    "prefill": prefill._prefill_kernel,
    "store_kv": kv_store._store_kv_kernel,
    "copy_blocks": block_copy._copy_blocks_kernel,
}


def _variants(kernel: Any) -> int:
    caches = getattr(kernel, "device_caches", None)
    if caches is None:  # interpreted: nothing is compiled
        return 0
    total = 0
    for entry in caches.values():
        cache = entry[0] if isinstance(entry, tuple) else entry  # (kernel_cache, key_cache, target, backend, binder)
        total += len(cache)
    return total


def compiled_variants() -> dict[str, int]:
    """Compiled variants per kernel, over every device of this process."""
    return {name: _variants(k) for name, k in KERNELS.items()}


def total_compiled() -> int:
    return sum(compiled_variants().values())
