"""K/V tensors in each allocator's own memory layout, the row arithmetic that finds a token in them, and where a
batch's tokens go for the kernels.

Every layout exposes, per layer, a K and a V tensor whose first dimension is a "row" (one token's [kv_heads,
head_dim]) and `rows(seq, end)`: the rows holding a sequence's tokens 0..end-1. Attention gathers K/V through those
rows, so a wrong block table or base reads the wrong memory and shows up as wrong attention output.

    paged   pool [layers, 2, num_blocks, block_size, kv_heads, head_dim]; token t of a sequence lives in row
            block_table[t // block_size] * block_size + t % block_size; swap pool of the same shape on the CPU
    static  arena [layers, 2, rows, kv_heads, head_dim]; token t in row token_base + t
    vmm     the allocator's own virtual buffers (cpu backend: real mmap'd pages; cuda: CUDA VMM), viewed in place;
            token t in row token_base + t of every buffer. Only mapped rows are ever touched (anything else faults).

The layout is picked by what the allocator can do (kvscope.alloc.base's capabilities), not by its name: virtual
buffers it maps itself, else an arena of rows, else blocks.

For the kernels (kvscope.engine.cuda_executor) a layout also says where a batch's tokens go (`place`: each new
token's slot, each sequence's block table or base row) and which cache tensors the kernels get (`caches`); its
`contiguous` flag picks the kernel family (contiguous kernels and SDPA, or the paged ones).

Paged and static tensors are torch.empty: rows are read only after they are written, and untouched pages of a large
--kv-memory cost no physical memory.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from kvscope.alloc.base import (
    ArenaRows,
    BlockAddressed,
    Copy,
    KVAllocator,
    RowAddressed,
    Swappable,
    VirtualBuffers,
)
from kvscope.backends.base import BackendError
from kvscope.backends.cuda_vmm import tensor_view
from kvscope.backends.host import host_view
from kvscope.engine.model import TORCH_DTYPES
from kvscope.spec import KVSpec

# (sequence id, first position, tokens) of each sequence's share of a batch, in batch order
Span = tuple[int, int, int]


@dataclass
class Placement:
    """Where a batch's tokens live, for the kernels. Row numbers of contiguous layouts are relative to `row0`."""

    new_slots: np.ndarray  # [new tokens] where each new token's K/V goes: a row (contiguous) or a slot (paged)
    where: np.ndarray  # per sequence: its base row [n] (contiguous), or its block table [n, widest table] (paged)
    row0: int = 0  # contiguous: the row the cache views start at; 0 for paged
    segments: list[tuple[int, int, int, int]] = field(default_factory=list)  # contiguous: (base, offset, start, n)


class KVLayout(Protocol):
    contiguous: bool  # a sequence's K/V in consecutive rows at a base (contiguous kernels, SDPA); else block tables

    def keys(self, layer: int) -> torch.Tensor: ...  # [R, kv_heads, head_dim]
    def values(self, layer: int) -> torch.Tensor: ...
    def rows(self, seq: int, end: int) -> torch.Tensor: ...  # int64 row ids of tokens 0..end-1
    def apply(self, copies: list[Copy]) -> None: ...
    def place(self, spans: Sequence[Span]) -> Placement: ...
    def caches(self, layer: int, row0: int) -> tuple[torch.Tensor, torch.Tensor]: ...  # K, V as the kernels take
    def close(self) -> None: ...


class PagedLayout:
    contiguous = False

    def __init__(self, spec: KVSpec, allocator: BlockAddressed, device: torch.device) -> None:
        self.alloc = allocator
        self.bs = allocator.block_size
        dtype = TORCH_DTYPES[spec.dtype]
        shape = (spec.num_layers, 2, allocator.num_blocks, self.bs, spec.num_kv_heads, spec.head_dim)
        self.pool = torch.empty(shape, dtype=dtype, device=device)
        cpu_blocks = allocator.num_cpu_blocks if isinstance(allocator, Swappable) else 0
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
            elif c.kind == "swap_out" and self.cpu_pool is not None:
                self.cpu_pool[:, :, c.dst].copy_(self.pool[:, :, c.src])
            elif c.kind == "swap_in" and self.cpu_pool is not None:
                self.pool[:, :, c.dst].copy_(self.cpu_pool[:, :, c.src])
            else:
                raise ValueError(f"paged layout: unexpected copy {c}")

    def place(self, spans: Sequence[Span]) -> Placement:
        bs = self.bs
        tables = [np.asarray(self.alloc.block_table(seq), dtype=np.int64) for seq, _, _ in spans]
        slots = []
        for table, (_, start, n) in zip(tables, spans, strict=True):
            pos = np.arange(start, start + n)
            slots.append(table[pos // bs] * bs + pos % bs)
        width = max((len(t) for t in tables), default=1) or 1
        padded = np.zeros((len(tables), width), dtype=np.int64)
        for i, table in enumerate(tables):
            padded[i, : len(table)] = table
        return Placement(np.concatenate(slots), padded)

    def caches(self, layer: int, row0: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pool[layer, 0], self.pool[layer, 1]  # [num_blocks, block_size, kv_heads, head_dim]

    def close(self) -> None:
        pass


def _place_rows(alloc: RowAddressed, spans: Sequence[Span]) -> Placement:
    """Placement in a row-addressed layout: a sequence's token t at row token_base + t."""
    # The views handed to the kernels start at the batch's lowest row: Triton refuses a pointer that is not mapped
    # device memory, and a VMM buffer's first page may be unmapped (its slot idle); the lowest sequence of the batch
    # holds tokens, so its rows are mapped. Rows are numbered from there.
    bases = np.asarray([alloc.token_base(seq) for seq, _, _ in spans], dtype=np.int64)
    row0 = int(bases.min())
    bases -= row0
    slots, segments, off = [], [], 0
    for base, (_, start, n) in zip(bases.tolist(), spans, strict=True):
        slots.append(base + np.arange(start, start + n))
        segments.append((base, off, start, n))
        off += n
    return Placement(np.concatenate(slots), bases, row0, segments)


def _rows_of(alloc: RowAddressed, seq: int, end: int, device: torch.device) -> torch.Tensor:
    base = alloc.token_base(seq)
    return torch.arange(base, base + end, device=device)


class RowLayout:
    """Static arena: one flat [rows] dimension shared by all sequences."""

    contiguous = True

    def __init__(self, spec: KVSpec, allocator: ArenaRows, device: torch.device) -> None:
        self.alloc = allocator
        dtype = TORCH_DTYPES[spec.dtype]
        self.arena = torch.empty(
            (spec.num_layers, 2, allocator.num_rows, spec.num_kv_heads, spec.head_dim), dtype=dtype, device=device
        )
        self.device = device

    def keys(self, layer: int) -> torch.Tensor:
        return self.arena[layer, 0]

    def values(self, layer: int) -> torch.Tensor:
        return self.arena[layer, 1]

    def rows(self, seq: int, end: int) -> torch.Tensor:
        return _rows_of(self.alloc, seq, end, self.device)

    def place(self, spans: Sequence[Span]) -> Placement:
        return _place_rows(self.alloc, spans)

    def caches(self, layer: int, row0: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys(layer)[row0:], self.values(layer)[row0:]  # [rows from row0, kv_heads, head_dim]

    def apply(self, copies: list[Copy]) -> None:
        for c in copies:
            if c.kind != "rows":
                raise ValueError(f"row layout: unexpected copy {c}")
            self.arena[:, :, c.dst : c.dst + c.n].copy_(self.arena[:, :, c.src : c.src + c.n])

    def close(self) -> None:
        pass


class VmmLayout:
    """Tensors over the allocator's own virtual buffers: the K/V live in the very pages the allocator maps, at
    token_base(seq) + t. Per-layer buffers [K0, V0, K1, V1, ...], or one megacache buffer [rows, layers, 2, kv_heads,
    head_dim]. The cpu backend's mmap'd memory is wrapped with torch.frombuffer, CUDA VMM memory through DLPack
    (kvscope.backends.cuda_vmm.tensor_view); the sim backend has no memory to wrap."""

    contiguous = True

    def __init__(self, spec: KVSpec, allocator: VirtualBuffers, device: torch.device) -> None:
        backend = allocator.backend.name
        dtype = TORCH_DTYPES[spec.dtype]
        shape = allocator.buffer_shape
        if backend == "cpu" and device.type == "cpu":
            self._buffers = [
                torch.frombuffer(host_view(va, allocator.buffer_bytes), dtype=dtype).view(shape)
                for va in allocator.buffer_addresses()
            ]
        elif backend == "cuda" and device.type == "cuda":
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
        return _rows_of(self.alloc, seq, end, self.device)

    def place(self, spans: Sequence[Span]) -> Placement:
        return _place_rows(self.alloc, spans)

    def caches(self, layer: int, row0: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys(layer)[row0:], self.values(layer)[row0:]  # [rows from row0, kv_heads, head_dim]

    def apply(self, copies: list[Copy]) -> None:
        for c in copies:
            if c.kind != "rows":
                raise ValueError(f"vmm layout: unexpected copy {c}")
            for buf in self._buffers:
                buf[c.dst : c.dst + c.n].copy_(buf[c.src : c.src + c.n])

    @contextmanager
    def mapped_for_capture(self) -> Iterator[None]:
        """A scratch page mapped at each buffer's base while CUDA graphs are captured. Triton checks at every launch
        that each pointer argument is mapped device memory, and the graphs capture the caches' base pointers (each
        layer's K and V lie within a buffer's first page), while no page of the allocator is mapped before the
        first request. A replay then reads and writes only the rows of live sequences, in pages the allocator has
        mapped by then (padded rows read and store nothing). The scratch pages are outside the allocator's books
        and capacity, and are unmapped and released again before the first step."""
        backend, size = self.alloc.backend, self.alloc.page_size
        scratch: list[tuple[int, object]] = []
        try:
            for va in self.alloc.buffer_addresses():
                try:
                    backend.mapped_handle(va)
                    continue  # already mapped (by the allocator): nothing to lend
                except BackendError:
                    pass
                handle = backend.create(size)
                backend.map(va, size, handle)
                scratch.append((va, handle))
                backend.set_access(va, size)
            yield
        finally:
            for va, handle in reversed(scratch):
                backend.unmap(va, size)
                backend.release(handle)
            take = getattr(backend, "take_thread_driver_ns", None)
            if take is not None:
                take()  # the scratch pages' driver time is warm-up, not a step's mapping

    def close(self) -> None:
        # Drop the views before the allocator unmaps the memory under them.
        self._buffers.clear()
        self._k = []
        self._v = []


def make_layout(spec: KVSpec, allocator: KVAllocator, device: torch.device) -> KVLayout:
    """The layout for what the allocator can do: virtual buffers it maps itself, an arena of rows, or blocks."""
    if isinstance(allocator, VirtualBuffers):
        return VmmLayout(spec, allocator, device)
    if isinstance(allocator, ArenaRows):
        return RowLayout(spec, allocator, device)
    if isinstance(allocator, BlockAddressed):
        return PagedLayout(spec, allocator, device)
    raise ValueError(
        f"no K/V layout for the {allocator.name} allocator: it has neither virtual buffers, an arena of rows, "
        "nor block tables"
    )


def tensor_bytes(allocator: KVAllocator) -> int:
    """Device bytes make_layout allocates as tensors for `allocator` (0 for virtual buffers the allocator maps)."""
    if isinstance(allocator, VirtualBuffers):
        return 0
    if isinstance(allocator, ArenaRows):
        return allocator.capacity_bytes
    if isinstance(allocator, BlockAddressed):
        return allocator.num_blocks * allocator.block_bytes
    return 0
