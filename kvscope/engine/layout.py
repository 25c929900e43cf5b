"""K/V tensors in each allocator's own memory layout, and the row arithmetic that finds a token in them.

Every layout exposes, per layer, a K and a V tensor whose first dimension is a "row" (one token's [kv_heads,
head_dim]) and `rows(seq, end)`: the rows holding a sequence's tokens 0..end-1. Attention gathers K/V through those
rows, so a wrong block table or base reads the wrong memory and shows up as wrong attention output.

    paged   pool [layers, 2, num_blocks, block_size, kv_heads, head_dim]; token t of a sequence lives in row
            block_table[t // block_size] * block_size + t % block_size; swap pool of the same shape on the CPU
    static  arena [layers, 2, rows, kv_heads, head_dim]; token t in row token_base + t
    vmm     the allocator's own virtual buffers (cpu backend: real mmap'd pages; cuda: CUDA VMM), viewed in place;
            token t in row token_base + t of every buffer. Only mapped rows are ever touched (anything else faults).

Paged and static tensors are torch.empty: rows are read only after they are written, and untouched pages of a large
--kv-memory cost no physical memory.
"""

from __future__ import annotations

from typing import Protocol

import torch

from kvscope.alloc.base import Copy, KVAllocator
from kvscope.engine.model import TORCH_DTYPES
from kvscope.spec import KVSpec


class KVLayout(Protocol):
    def keys(self, layer: int) -> torch.Tensor: ...  # [R, kv_heads, head_dim]
    def values(self, layer: int) -> torch.Tensor: ...
    def rows(self, seq: int, end: int) -> torch.Tensor: ...  # int64 row ids of tokens 0..end-1
    def apply(self, copies: list[Copy]) -> None: ...
    def close(self) -> None: ...


class PagedLayout:
    def __init__(self, spec: KVSpec, allocator: KVAllocator, device: torch.device) -> None:
        self.alloc = allocator
        self.bs = allocator.block_size
        dtype = TORCH_DTYPES[spec.dtype]
        shape = (spec.num_layers, 2, allocator.num_blocks, self.bs, spec.num_kv_heads, spec.head_dim)
        self.pool = torch.empty(shape, dtype=dtype, device=device)
        cpu_blocks = getattr(allocator, "num_cpu_blocks", 0)
        self.cpu_pool = torch.empty((*shape[:2], cpu_blocks, *shape[3:]), dtype=dtype) if cpu_blocks else None
        self._flat = self.pool.view(spec.num_layers, 2, allocator.num_blocks * self.bs, *shape[4:])
        self._offsets = torch.arange(self.bs, device=device)
        self.device = device

    def keys(self, layer: int) -> torch.Tensor:
        return self._flat[layer, 0]

    def values(self, layer: int) -> torch.Tensor:
        return self._flat[layer, 1]

    def rows(self, seq: int, end: int) -> torch.Tensor:
        table = torch.tensor(self.alloc.block_table(seq), dtype=torch.int64, device=self.device)
        return (table[:, None] * self.bs + self._offsets[None, :]).reshape(-1)[:end]

    def apply(self, copies: list[Copy]) -> None:
        for c in copies:
            if c.kind == "block":
                self.pool[:, :, c.dst].copy_(self.pool[:, :, c.src])
            elif c.kind == "swap_out":
                self.cpu_pool[:, :, c.dst].copy_(self.pool[:, :, c.src])
            elif c.kind == "swap_in":
                self.pool[:, :, c.dst].copy_(self.cpu_pool[:, :, c.src])
            else:
                raise ValueError(f"paged layout: unexpected copy {c}")

    def close(self) -> None:
        pass


class RowLayout:
    """Static arena: one flat [rows] dimension shared by all sequences."""

    def __init__(self, spec: KVSpec, allocator: KVAllocator, device: torch.device) -> None:
        self.alloc = allocator
        rows = allocator.num_rows
        dtype = TORCH_DTYPES[spec.dtype]
        self.arena = torch.empty(
            (spec.num_layers, 2, rows, spec.num_kv_heads, spec.head_dim), dtype=dtype, device=device
        )
        self.device = device

    def keys(self, layer: int) -> torch.Tensor:
        return self.arena[layer, 0]

    def values(self, layer: int) -> torch.Tensor:
        return self.arena[layer, 1]

    def rows(self, seq: int, end: int) -> torch.Tensor:
        base = self.alloc.token_base(seq)
        return torch.arange(base, base + end, device=self.device)

    def apply(self, copies: list[Copy]) -> None:
        for c in copies:
            if c.kind != "rows":
                raise ValueError(f"static layout: unexpected copy {c}")
            self.arena[:, :, c.dst : c.dst + c.n].copy_(self.arena[:, :, c.src : c.src + c.n])

    def close(self) -> None:
        pass


class VmmLayout:
    """Tensors over the VMM allocator's own buffers: the K/V live in the very pages the allocator maps, at
    token_base(seq) + t. Per-layer buffers [K0, V0, K1, V1, ...], or one megacache buffer [rows, layers, 2, kv_heads,
    head_dim]. The cpu backend's mmap'd memory is wrapped with torch.frombuffer, CUDA VMM memory through
    __cuda_array_interface__; the sim backend has no memory to wrap."""

    def __init__(self, spec: KVSpec, allocator: KVAllocator, device: torch.device) -> None:
        backend = allocator.backend.name
        dtype = TORCH_DTYPES[spec.dtype]
        shape = allocator.buffer_shape
        if backend == "cpu" and device.type == "cpu":
            from kvscope.backends.host import host_view

            self._buffers = [
                torch.frombuffer(host_view(va, allocator.buffer_bytes), dtype=dtype).view(shape)
                for va in allocator.buffer_addresses()
            ]
        elif backend == "cuda" and device.type == "cuda":
            from kvscope.backends.cuda_vmm import tensor_view

            self._buffers = [tensor_view(va, shape, dtype, owner=allocator) for va in allocator.buffer_addresses()]
        else:
            raise ValueError(f"vmm layout: the {backend} backend has no memory a {device.type} tensor can use")
        self.alloc = allocator
        if allocator.megacache:
            mega = self._buffers[0]
            self._k = [mega[:, layer, 0] for layer in range(spec.num_layers)]
            self._v = [mega[:, layer, 1] for layer in range(spec.num_layers)]
        else:
            self._k = self._buffers[0::2]
            self._v = self._buffers[1::2]
        self.device = device

    def keys(self, layer: int) -> torch.Tensor:
        return self._k[layer]

    def values(self, layer: int) -> torch.Tensor:
        return self._v[layer]

    def rows(self, seq: int, end: int) -> torch.Tensor:
        base = self.alloc.token_base(seq)
        return torch.arange(base, base + end, device=self.device)

    def apply(self, copies: list[Copy]) -> None:
        for c in copies:
            if c.kind != "rows":
                raise ValueError(f"vmm layout: unexpected copy {c}")
            for buf in self._buffers:
                buf[c.dst : c.dst + c.n].copy_(buf[c.src : c.src + c.n])

    def close(self) -> None:
        # Drop the views before the allocator unmaps the memory under them.
        self._buffers.clear()
        self._k = []
        self._v = []


def make_layout(spec: KVSpec, allocator: KVAllocator, device: torch.device) -> KVLayout:
    if allocator.name == "paged":
        return PagedLayout(spec, allocator, device)
    if allocator.name == "static":
        return RowLayout(spec, allocator, device)
    if allocator.name == "vmm":
        return VmmLayout(spec, allocator, device)
    raise ValueError(f"no K/V layout for the {allocator.name} allocator")
