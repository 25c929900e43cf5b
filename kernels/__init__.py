"""Triton attention kernels over the KV layouts kvscope profiles, each with a torch reference in `.reference`.

Paged (vLLM): k_cache, v_cache [num_blocks, block_size, kv_heads, head_dim] read through block tables.
Contiguous (static, VMM): k_buf, v_buf [num_rows, kv_heads, head_dim], sequence b at rows token_base[b] + position.

    paged_decode_attention / contiguous_decode_attention     one query token per sequence, split-K (flash-decoding)
    paged_prefill_attention / contiguous_prefill_attention   packed new tokens, causal over cached context + themselves
    store_kv_paged / store_kv_contiguous                     new K/V into their slots or rows
    copy_blocks                                              copy-on-write and swap of whole blocks

On CUDA tensors the kernels run compiled; on CPU tensors only in Triton's interpreter (TRITON_INTERPRET=1 set before
this package is imported; see `INTERPRETED` and `kernels_available(device)`). `kvscope.kernels.reference` has the same
functions in plain torch.
"""

from __future__ import annotations

from .block_copy import copy_blocks
from .common import (
    INTERPRETED,
    DecodeConfig,
    PrefillConfig,
    default_decode_config,
    default_prefill_config,
    kernels_available,
)
from .decode import contiguous_decode_attention, paged_decode_attention
from .decode_tiles import decode_plan, decode_plans
from .kv_store import contiguous_rows, store_kv_contiguous, store_kv_paged
from .prefill import contiguous_prefill_attention, paged_prefill_attention

__all__ = [
    "INTERPRETED",
    "DecodeConfig",
    "PrefillConfig",
    "contiguous_decode_attention",
    "contiguous_prefill_attention",
    "contiguous_rows",
    "copy_blocks",
    "decode_plan",
    "decode_plans",
    "default_decode_config",
    "default_prefill_config",
    "kernels_available",
    "paged_decode_attention",
    "paged_prefill_attention",
    "store_kv_contiguous",
    "store_kv_paged",
]
