"""VMM allocator (vAttention): contiguous virtual KV buffers backed by physical pages mapped on demand.

Layout. Per layer one K and one V virtual buffer shaped [max_batch, max_len, kv_heads, head_dim] (2 x layers buffers;
buffer 2*l is layer l's K, 2*l+1 its V), or with `megacache` ONE buffer [max_batch, max_len, layers, 2, kv_heads,
head_dim] holding every layer. A request owns one slot (one row of the batch dimension); its token i lives in row
`token_base(seq) + i` of every buffer, so kernels see plain contiguous tensors. Each slot's region is rounded up to a
whole number of pages (and of rows), hence `rows_per_slot` >= max_len.

Physical memory. All pages are created up front (capacity_bytes // page_size, rounded down to whole page-groups) and
sit in a pool. A slot grows by one page-group at a time: the next page of the slot's region in every buffer, mapped in
order (map + set access, each timed). `eager_pages` groups are kept mapped ahead of need (that is "reservation" in
the books). A freed slot keeps its pages with deferred reclamation (mapped-idle) and the next request takes the best
fitting free slot, reusing those pages without any driver call; when the pool runs dry, idle slots give up pages from
their tails. Without deferred reclamation a freed slot is unmapped at once.

Page-group size decides growth granularity: one page holds page_size / row_bytes tokens of a buffer; llama-3-8b with
2 MiB pages: 1024 tokens per page in a per-layer buffer (2 KiB rows), 16 tokens in a megacache (128 KiB rows).

Every public method takes `self.lock`, so `ensure_room` may run on a background thread (mapping the next step's
pages while the current step computes) while the engine thread appends.

Driver failures. The books change only after a driver call went through, so after any failure they say exactly what
the backend holds (`backend_books()` == `backend.state()`). A failed admit / fork / append / ensure_room unmaps what
it mapped and raises (KVOutOfMemory for lack of memory, the backend's error otherwise) with the sequences, slots and
mapped pages as they were; only idle slots may have given pages back to the pool on the way. A teardown cannot
always be undone: when an unmap fails after other buffers of the same page-group went, that group leaves its slot as
a *stray* (still partly mapped, counted as mapped-idle) that the next use of its place, a dry pool, or close()
unmaps. free() always frees (the sequence is gone); without deferred reclamation an unmap failure leaves the slot's
remaining groups as strays and is raised after the books are done. close() gives back each thing once, and after a
failure a second close() retries only what is left.

The allocator is backend-agnostic: it calls only the PhysicalMemory protocol (kvscope.backends.base).
"""

# This module is longer than 400 lines: slots, page groups, deferred reclamation and the rollback of every failed
# driver call (strays included) change the same books, and a rollback is only checkable next to the path it undoes.

from __future__ import annotations

import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from time import perf_counter_ns
from typing import Any

import numpy as np

from kvscope.alloc.base import Copy, HighWater, KVOutOfMemory, Usage
from kvscope.alloc.registry import AllocatorEntry, BuildContext, Option, register
from kvscope.backends.base import BackendError, BackendOutOfMemory, BackendState, PhysicalMemory
from kvscope.events import Kind
from kvscope.recorder import NullRecorder, Recorder
from kvscope.spec import KVSpec
from kvscope.units import check_host_memory, check_int, format_bytes

DEFAULT_PAGE_SIZE = 2 << 20
# User address space of x86-64 and arm64 Linux processes (47 bits); CUDA's virtual space is not larger in practice.
_MAX_VIRTUAL_BYTES = 1 << 47
# Host memory of the books, measured with tracemalloc (sim backend, recording) and rounded up: a page's handle, pool
# entry and PAGE_CREATE event about 220 bytes; a slot's page list, sequence entry and free-set entry about 160; a
# buffer's reservation about 320.
_PAGE_BOOKKEEPING_BYTES = 256
_SLOT_BOOKKEEPING_BYTES = 192
_BUFFER_BOOKKEEPING_BYTES = 384


@dataclass(slots=True)
class _Seq:
    slot: int
    tokens: int
    final_len: int


@dataclass(slots=True)
class _Group:
    """One page per buffer at group `index` of `slot`'s region, and how far the driver calls on it got: buffers
    [0, mapped) are mapped, [0, access) also accessible. Mapping goes up from buffer 0 and unmapping down from the
    last, so the two counts say exactly what the driver holds when a call fails part-way. A group whose teardown
    failed part-way is kept as a stray (VMMAllocator._strays) until a retry finishes it."""

    slot: int
    index: int
    pages: list[int]
    mapped: int = 0
    access: int = 0


def _add_note(error: BaseException, note: str) -> None:
    """Say on the first error that cleaning up after it failed too (BaseException.add_note: Python 3.11+)."""
    add = getattr(error, "add_note", None)
    if add is not None:
        add(note)


class VMMAllocator:
    name = "vmm"

    def __init__(
        self,
        spec: KVSpec,
        capacity_bytes: int,
        recorder: Recorder | None = None,
        *,
        backend: PhysicalMemory,
        max_batch: int,
        max_len: int,
        page_size: int = DEFAULT_PAGE_SIZE,
        megacache: bool = False,
        eager_pages: int = 0,
        deferred_reclaim: bool = True,
    ) -> None:
        capacity_bytes = check_int("vmm allocator: capacity_bytes", capacity_bytes, 0)
        max_batch = check_int("vmm allocator: max_batch", max_batch, 1)
        max_len = check_int("vmm allocator: max_len", max_len, 1)
        page_size = check_int("vmm allocator: page_size", page_size, 1)
        eager_pages = check_int("vmm allocator: eager_pages", eager_pages, 0)
        if page_size % backend.granularity:
            raise ValueError(
                f"vmm allocator: page_size={page_size} is not a multiple of the {backend.name} backend's "
                f"granularity ({backend.granularity} bytes)"
            )
        self.spec = spec
        self.recorder = recorder if recorder is not None else NullRecorder()
        self.backend = backend
        self.max_batch = max_batch
        self.max_len = max_len
        self.page_size = page_size
        self.megacache = megacache
        self.eager_pages = eager_pages
        self.deferred_reclaim = deferred_reclaim
        self.bytes_per_token = spec.bytes_per_token
        self.pending_copies: list[Copy] = []
        self.lock = threading.RLock()

        self.num_buffers = 1 if megacache else 2 * spec.num_layers
        self.buffer_row_bytes = spec.bytes_per_token if megacache else spec.token_bytes_per_layer_kv
        # A slot's region is a whole number of pages (page-aligned growth) and of rows (integer token_base).
        unit = math.lcm(page_size, self.buffer_row_bytes)
        self.slot_bytes = -(-max_len * self.buffer_row_bytes // unit) * unit
        self.rows_per_slot = self.slot_bytes // self.buffer_row_bytes
        self.buffer_bytes = max_batch * self.slot_bytes
        self.max_groups_per_slot = self._groups_for(max_len)
        self.group_bytes = self.num_buffers * page_size
        groups = capacity_bytes // page_size // self.num_buffers
        if groups <= 0:
            raise ValueError(
                f"vmm allocator: capacity_bytes={capacity_bytes} is less than one page-group "
                f"({self.num_buffers} buffers x {page_size} bytes)"
            )
        self.num_pages = groups * self.num_buffers
        self._check_sizes(capacity_bytes)

        self._bases: list[int] = []
        self._handles: list[Any] = []
        self._closed = False
        # Groups whose teardown failed part-way, by (slot, group index): off their slot, counted as idle groups.
        self._strays: dict[tuple[int, int], _Group] = {}
        self._setup()

        self._pool: list[int] = list(range(self.num_pages - 1, -1, -1))  # pop() hands out the lowest id first
        self._slot_pages: list[list[int]] = [[] for _ in range(max_batch)]  # group g = [g*nbuf, (g+1)*nbuf)
        self._slot_seq: list[int] = [-1] * max_batch
        self._free_slots: set[int] = set(range(max_batch))
        self._idle_groups = 0  # groups mapped on slots with no live request
        self._seqs: dict[int, _Seq] = {}
        # Running totals over live sequences (tokens held, page-groups those tokens need), so that the high-water
        # marks noted after every operation are O(1); check_invariants compares them with usage()'s full count.
        self._tokens = 0
        self._needed = 0
        self.high_water = HighWater()

    # ---- construction / teardown ----------------------------------------------------------------------------
    def _check_sizes(self, capacity_bytes: int) -> None:
        """Refuse, before anything is reserved or created, layouts no process could hold: virtual buffers beyond a
        64-bit address space, or per-page and per-slot books beyond host RAM (--max-batch 100000000)."""
        virtual = self.num_buffers * self.buffer_bytes
        if virtual > _MAX_VIRTUAL_BYTES:
            raise ValueError(
                f"vmm allocator: {self.num_buffers:,} virtual buffers of {format_bytes(self.buffer_bytes)} "
                f"(max_batch {self.max_batch:,} x max_len {self.max_len:,}) take {format_bytes(virtual)} of address "
                f"space, more than the {format_bytes(_MAX_VIRTUAL_BYTES)} a process has; use a smaller --max-batch "
                "or --max-len"
            )
        books = (
            self.num_pages * _PAGE_BOOKKEEPING_BYTES
            + self.max_batch * _SLOT_BOOKKEEPING_BYTES
            + self.num_buffers * _BUFFER_BOOKKEEPING_BYTES
        )
        check_host_memory(
            books,
            f"vmm allocator: {self.num_pages:,} pages of {format_bytes(self.page_size)} "
            f"({format_bytes(capacity_bytes)}) and {self.max_batch:,} slots",
            "use a smaller --kv-memory or --max-batch, or a larger --page-size",
        )

    def _setup(self) -> None:
        try:
            t0 = perf_counter_ns()
            for _ in range(self.num_buffers):
                self._bases.append(self.backend.reserve(self.buffer_bytes))
            dur = perf_counter_ns() - t0
            self.recorder.emit(
                Kind.VMM_RESERVE, n=self.num_buffers, bytes=self.num_buffers * self.buffer_bytes, dur_ns=dur
            )
            for pid in range(self.num_pages):
                t0 = perf_counter_ns()
                self._handles.append(self.backend.create(self.page_size))
                dur = perf_counter_ns() - t0
                self.recorder.emit(Kind.PAGE_CREATE, block=pid, bytes=self.page_size, dur_ns=dur)
        except BackendError as e:
            # Give back what was taken, so that a failed construction leaks nothing.
            self._closed = True
            self._pool = list(range(len(self._handles)))  # the pages made so far, none mapped
            try:
                self._release_pages()
                self._free_reservations()
            except BackendError as cleanup:
                _add_note(e, f"giving back what was taken failed too ({cleanup}); the backend's close() frees the rest")
            if isinstance(e, BackendOutOfMemory):
                raise KVOutOfMemory(
                    f"vmm allocator: could not create {self.num_pages} pages of {self.page_size} bytes: {e}"
                ) from e
            raise

    def close(self) -> None:
        """Drop the live sequences (SLOT_FREE), unmap every page, release every page, free the reservations. The
        backend itself stays open (its owner closes it). Each thing leaves the books as soon as the driver gave it
        back, so a close that fails raises the backend's error with the books naming exactly what is still held, and
        calling close() again retries only that. Once everything is back, close() is a no-op."""
        with self.lock:
            if self._closed and not (self._handles or self._bases):
                return
            self._closed = True  # nothing new is admitted from here on, even if this close fails
            owners = self._drop_sequences()
            for slot in range(self.max_batch):
                while self._slot_pages[slot]:
                    self._unmap_tail_group(slot, owners.get(slot, -1))
                    self._idle_groups -= 1
            for key in list(self._strays):
                self._finish_stray(key)
            self._pool.sort()  # every page is in the pool now; _release_pages gives them back from the top
            self._release_pages()
            self._free_reservations()

    def _drop_sequences(self) -> dict[int, int]:
        """close(): every live sequence gives its slot back, as free() does; returns slot -> the sequence it had
        (the unmap events still name it)."""
        owners: dict[int, int] = {}
        for seq, s in list(self._seqs.items()):
            owners[s.slot] = seq
            del self._seqs[seq]
            self._tokens -= s.tokens
            self._needed -= self._groups_for(s.tokens)
            self._release_slot(s.slot)
            self.recorder.emit(Kind.SLOT_FREE, seq=seq, addr=s.slot, n=len(self._slot_pages[s.slot]))
        return owners

    def _release_pages(self) -> None:
        """Release every page, the highest id first (the pool must hold them all, sorted). Each page leaves the
        books (its handle and its pool entry) once the driver let it go, so a failure stops with the books naming
        exactly the pages still alive, and a retry releases only those: never a handle twice."""
        while self._handles:
            pid = len(self._handles) - 1
            t0 = perf_counter_ns()
            self.backend.release(self._handles[pid])
            dur = perf_counter_ns() - t0
            self._handles.pop()
            self._pool.pop()
            self.recorder.emit(Kind.PAGE_RELEASE, block=pid, bytes=self.page_size, dur_ns=dur)

    def _free_reservations(self) -> None:
        """Free the buffers' address ranges, the last first; each leaves the books once freed (retry-safe)."""
        while self._bases:
            self.backend.free_reservation(self._bases[-1], self.buffer_bytes)
            self._bases.pop()

    def backend_books(self) -> BackendState:
        """What the books say the backend holds now: the reservations, every live handle, and each mapping (the
        slots' pages, all accessible, and the still-mapped buffers of strays). After any failure, and at any other
        time, this must equal `backend.state()`."""
        with self.lock:
            maps: set[tuple[int, int, Any, bool]] = set()
            for slot, pages in enumerate(self._slot_pages):
                for i, pid in enumerate(pages):
                    group, b = divmod(i, self.num_buffers)
                    maps.add((self._page_va(slot, group, b), self.page_size, self._handles[pid], True))
            for g in self._strays.values():
                for b in range(g.mapped):
                    va = self._page_va(g.slot, g.index, b)
                    maps.add((va, self.page_size, self._handles[g.pages[b]], b < g.access))
            return BackendState(
                reservations=frozenset((base, self.buffer_bytes) for base in self._bases),
                handles=frozenset(self._handles),
                mappings=frozenset(maps),
            )

    def __enter__(self) -> VMMAllocator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def config(self) -> dict:
        return {
            "addressing": "pages",  # how analysis replays this trace (kvscope.analysis.replay)
            "label": f"vmm {format_bytes(self.page_size)}" + (" megacache" if self.megacache else ""),
            "page_size": self.page_size,
            "megacache": self.megacache,
            "eager_pages": self.eager_pages,
            "deferred_reclaim": self.deferred_reclaim,
            "max_batch": self.max_batch,
            "max_len": self.max_len,
            "backend": self.backend.name,
            "pages": self.num_pages,
            "buffers": self.num_buffers,
            "buffer_row_bytes": self.buffer_row_bytes,
            "rows_per_slot": self.rows_per_slot,
            "tokens_per_page": self.page_size / self.buffer_row_bytes,
        }

    # ---- what an executor needs to wrap the buffers as tensors ----------------------------------------------
    def buffer_addresses(self) -> list[int]:
        """Virtual base address of each buffer (per-layer: [K0, V0, K1, V1, ...]; megacache: one)."""
        return list(self._bases)

    @property
    def buffer_shape(self) -> tuple[int, ...]:
        """Element shape of each buffer, rows first (max_batch * rows_per_slot rows)."""
        rows = self.max_batch * self.rows_per_slot
        s = self.spec
        if self.megacache:
            return (rows, s.num_layers, 2, s.num_kv_heads, s.head_dim)
        return (rows, s.num_kv_heads, s.head_dim)

    def token_base(self, seq: int) -> int:
        """First row of the sequence in every buffer (slot * rows_per_slot)."""
        return self._get(seq).slot * self.rows_per_slot

    def slot_of(self, seq: int) -> int:
        return self._get(seq).slot

    def mapped_groups(self, slot: int) -> int:
        """Page-groups mapped on a slot (live or idle)."""
        return len(self._slot_pages[slot]) // self.num_buffers

    def live_sequences(self) -> list[int]:
        return list(self._seqs)

    # ---- protocol -------------------------------------------------------------------------------------------
    def can_admit(self, prompt_len: int, final_len: int) -> bool:
        with self.lock:
            if self._closed or not self._free_slots or final_len > self.max_len or final_len < max(prompt_len, 1):
                return False
            return self._groups_for(prompt_len) <= self._available_groups()

    def admit(self, seq: int, prompt_tokens: np.ndarray, final_len: int) -> int:
        """Take a slot (best fit among free slots) and map the pages the prompt needs (+ eager ones)."""
        prompt_len = len(prompt_tokens)
        if final_len > self.max_len:
            raise ValueError(f"sequence {seq}: final length {final_len} exceeds max_len={self.max_len}")
        if final_len < max(prompt_len, 1):
            raise ValueError(f"sequence {seq}: final length {final_len} is shorter than its prompt ({prompt_len})")
        with self.lock:
            self._start(seq, room=prompt_len, hold=0, final_len=final_len)
            self._note()
        return 0

    def fork(self, parent: int, child: int) -> None:
        """The child gets its own slot holding a copy of the parent's tokens (a 'rows' Copy for the executor)."""
        with self.lock:
            p = self._get(parent)
            c = self._start(child, room=p.tokens, hold=p.tokens, final_len=p.final_len)
            self.pending_copies.append(Copy("rows", p.slot * self.rows_per_slot, c.slot * self.rows_per_slot, p.tokens))
            self._note()

    def can_append(self, seq: int, n: int = 1) -> bool:
        with self.lock:
            s = self._seqs.get(seq) or self._get(seq)
            new = s.tokens + n
            if new > self.max_len:
                return False
            missing = (
                -(-new * self.buffer_row_bytes // self.page_size) - len(self._slot_pages[s.slot]) // self.num_buffers
            )
            return missing <= 0 or missing <= self._available_groups()

    def append(self, seq: int, tokens: np.ndarray) -> None:
        # The hot path (millions of calls in a simulated run): the helpers are inlined.
        n = len(tokens)
        with self.lock:
            s = self._seqs.get(seq) or self._get(seq)
            new = s.tokens + n
            if new > self.max_len:
                self._oom(seq, n, 0, f"sequence {seq}: {s.tokens} + {n} tokens exceed max_len={self.max_len}")
            need = -(-new * self.buffer_row_bytes // self.page_size)
            grew = need + self.eager_pages > len(self._slot_pages[s.slot]) // self.num_buffers
            if grew:
                self._grow(seq, s, need)
            held_before = self._tokens
            crossed = need - self._groups_for(s.tokens)  # groups newly needed: internal fragmentation rises
            self._tokens += n
            self._needed += crossed
            s.tokens = new
            self.recorder.emit(Kind.APPEND, seq=seq, n=n, aux=new)
            if grew or crossed or not held_before:
                self._note()
            else:  # within the groups it already needed: only used can rise
                self.high_water.note_growth(self._tokens * self.bytes_per_token)

    def ensure_room(self, seq: int, tokens: int) -> int:
        """Map ahead so that the sequence has room for `tokens` tokens in all (plus eager pages), without appending.
        Returns the page-groups newly mapped. Raises KVOutOfMemory (nothing changed) if the room cannot be had."""
        with self.lock:
            s = self._get(seq)
            if tokens > self.max_len:
                self._oom(seq, tokens - s.tokens, 0, f"sequence {seq}: room for {tokens} tokens exceeds max_len")
            before = self.mapped_groups(s.slot)
            need = self._groups_for(tokens)
            if need + self.eager_pages > before:
                self._grow(seq, s, need)
                self._note()
            return self.mapped_groups(s.slot) - before

    def free(self, seq: int) -> None:
        with self.lock:
            s = self._get(seq)
            del self._seqs[seq]
            self._tokens -= s.tokens
            self._needed -= self._groups_for(s.tokens)
            failure = None if self.deferred_reclaim else self._unmap_freed_slot(s.slot, seq)
            self._release_slot(s.slot)
            self.recorder.emit(Kind.SLOT_FREE, seq=seq, addr=s.slot, n=len(self._slot_pages[s.slot]))
            self._note()
            if failure is not None:
                raise failure

    def num_tokens(self, seq: int) -> int:
        return self._get(seq).tokens

    def usage(self) -> Usage:
        with self.lock:
            tokens = needed = live_mapped = 0
            for s in self._seqs.values():
                tokens += s.tokens
                needed += self._groups_for(s.tokens)
                live_mapped += len(self._slot_pages[s.slot])
            gb = self.group_bytes
            used = tokens * self.bytes_per_token
            live_mapped //= self.num_buffers
            return Usage(
                capacity=len(self._handles) * self.page_size,  # 0 once closed
                reserved=(live_mapped + self._idle_groups) * gb,
                used=used,
                logical=used,
                internal=needed * gb - used,
                reservation=(live_mapped - needed) * gb,
                mapped_idle=self._idle_groups * gb,
                cached_idle=0,
                free=len(self._pool) * self.page_size,
            )

    def check_invariants(self) -> None:
        with self.lock:
            nbuf = self.num_buffers
            seen: set[int] = set(self._pool)
            assert len(seen) == len(self._pool), "a page is in the pool twice"
            # A close that failed while releasing may leave part of a group (the pages it could not release yet).
            assert self._closed or len(self._pool) % nbuf == 0, f"pool holds {len(self._pool)} pages, not whole groups"
            idle = self._check_strays(seen)
            for slot, pages in enumerate(self._slot_pages):
                assert len(pages) % nbuf == 0, f"slot {slot}: {len(pages)} pages, not whole groups"
                assert len(pages) // nbuf <= self.max_groups_per_slot, f"slot {slot}: more groups than fit"
                for pid in pages:
                    assert pid not in seen, f"page {pid} mapped twice or both mapped and in the pool"
                    seen.add(pid)
                owner = self._slot_seq[slot]
                if owner == -1:
                    assert slot in self._free_slots, f"slot {slot} has no owner but is not free"
                    # (A close that failed part-way leaves the rest of its teardown on the slots it dropped.)
                    ok = self.deferred_reclaim or not pages or self._closed
                    assert ok, f"slot {slot}: idle pages without deferred reclaim"
                    idle += len(pages) // nbuf
                else:
                    assert slot not in self._free_slots, f"slot {slot} owned by {owner} but listed free"
                    s = self._seqs.get(owner)
                    assert s is not None and s.slot == slot, f"slot {slot}: owner {owner} does not point back"
                    assert s.tokens <= self.max_len, f"seq {owner}: {s.tokens} tokens > max_len"
                    assert self._groups_for(s.tokens) <= len(pages) // nbuf, f"seq {owner}: tokens beyond its pages"
            assert len(seen) == len(self._handles), "pages lost or invented"
            assert self._closed or len(self._handles) == self.num_pages, "pages released while open"
            assert idle == self._idle_groups, f"idle group count {self._idle_groups} != {idle}"
            assert len(self._seqs) + len(self._free_slots) == self.max_batch, "slots lost"
            u = self.usage()
            books = (u.reserved, u.used, u.internal, u.reservation, u.mapped_idle, u.cached_idle)
            assert self._closed or self._note_values() == books, f"running totals {self._note_values()} != {books}"

    def _check_strays(self, seen: set[int]) -> int:
        """check_invariants for strays: each is partly mapped, lies past its slot's mapped groups, holds pages of
        its own; returns how many (they count as idle groups)."""
        nbuf = self.num_buffers
        for (slot, index), g in self._strays.items():
            assert (g.slot, g.index) == (slot, index), f"stray filed at ({slot}, {index}) is ({g.slot}, {g.index})"
            assert 0 < g.mapped <= nbuf and g.mapped - 1 <= g.access <= g.mapped, f"stray {g}: bad counts"
            assert index >= len(self._slot_pages[slot]) // nbuf, f"stray {g} inside its slot's mapped groups"
            for pid in g.pages:
                assert pid not in seen, f"page {pid} of stray {g} is also mapped or in the pool"
                seen.add(pid)
        return len(self._strays)

    # ---- internals ------------------------------------------------------------------------------------------
    def _note_values(self) -> tuple[int, int, int, int, int, int]:
        """(reserved, used, internal, reservation, mapped_idle, cached) from the running totals: every created page
        is in the pool or mapped on a slot, so the mapped groups are the pages outside the pool."""
        gb = self.group_bytes
        mapped = (len(self._handles) - len(self._pool)) // self.num_buffers
        used = self._tokens * self.bytes_per_token
        live = mapped - self._idle_groups
        return mapped * gb, used, self._needed * gb - used, (live - self._needed) * gb, self._idle_groups * gb, 0

    def _note(self) -> None:
        reserved, used, internal, reservation, idle, cached = self._note_values()
        self.high_water.note(reserved, used, used, internal, reservation, idle, cached)

    def _groups_for(self, tokens: int) -> int:
        """Page-groups a slot needs to hold `tokens` tokens."""
        return -(-tokens * self.buffer_row_bytes // self.page_size)

    def _available_groups(self) -> int:
        """Groups a live slot could still get: the pool plus what idle slots can give up."""
        return len(self._pool) // self.num_buffers + self._idle_groups

    def _get(self, seq: int) -> _Seq:
        try:
            return self._seqs[seq]
        except KeyError:
            raise KeyError(f"vmm allocator: unknown sequence {seq}") from None

    def _oom(self, seq: int, n: int, groups: int, message: str) -> None:
        self.recorder.emit(Kind.OOM, seq=seq, n=n, bytes=groups * self.group_bytes)
        raise KVOutOfMemory(message)

    def _start(self, seq: int, *, room: int, hold: int, final_len: int) -> _Seq:
        """Admit or fork: pick a slot, take it over, map what `room` tokens need; the sequence then holds `hold`
        tokens. Atomic."""
        if self._closed:
            raise RuntimeError("vmm allocator is closed")
        if seq in self._seqs:
            raise KeyError(f"vmm allocator: sequence {seq} is already admitted")
        need = self._groups_for(room)
        if not self._free_slots:
            self._oom(seq, room, need, f"sequence {seq}: all {self.max_batch} slots are taken")
        if need > self._available_groups():
            self._oom(
                seq,
                room,
                need,
                f"sequence {seq}: needs {need} page-groups, {self._available_groups()} available",
            )
        slot = self._best_fit_slot(self._groups_for(min(room + 1, self.max_len)))
        if self._strays:
            self._finish_strays_on(slot)  # its old owner's unfinished teardown goes first; raises: nothing taken
        self._free_slots.discard(slot)
        self._slot_seq[slot] = seq
        taken = len(self._slot_pages[slot])
        self._idle_groups -= taken // self.num_buffers
        s = _Seq(slot, 0, final_len)
        self._seqs[seq] = s
        self.recorder.emit(Kind.SLOT_ALLOC, seq=seq, addr=slot)
        if taken:
            self.recorder.emit(Kind.RECLAIM, seq=seq, addr=slot, n=taken)
        try:
            if need + self.eager_pages > taken // self.num_buffers:
                self._grow(seq, s, need)
        except BaseException:
            del self._seqs[seq]
            self._release_slot(slot)
            self.recorder.emit(Kind.SLOT_FREE, seq=seq, addr=slot, n=len(self._slot_pages[slot]))
            raise
        s.tokens = hold
        self._tokens += hold
        self._needed += self._groups_for(hold)
        return s

    def _release_slot(self, slot: int) -> None:
        self._slot_seq[slot] = -1
        self._free_slots.add(slot)
        self._idle_groups += len(self._slot_pages[slot]) // self.num_buffers

    def _best_fit_slot(self, target: int) -> int:
        """The free slot whose mapped groups best fit `target`: the smallest that covers it, else the largest
        (fewest new maps); ties go to the lowest slot."""
        pages = self._slot_pages
        nbuf = self.num_buffers
        best, best_key = -1, None
        for slot in self._free_slots:
            have = len(pages[slot]) // nbuf
            key = (0, have - target, slot) if have >= target else (1, target - have, slot)
            if best_key is None or key < best_key:
                best, best_key = slot, key
        return best

    def _grow(self, seq: int, s: _Seq, need: int) -> None:
        """Map groups on s's slot until it has `need` (required; idle slots give up pages if the pool is dry) and
        `need + eager_pages` (best effort, from the pool only: mapping ahead never unmaps idle slots; capped at the
        slot size). If the required part fails, this call's groups are unmapped again and KVOutOfMemory is raised
        (chained to the backend error); any other backend error unmaps this call's groups and propagates."""
        slot = s.slot
        have = len(self._slot_pages[slot]) // self.num_buffers
        missing = need - have
        available = self._available_groups()
        if missing > available:
            self._oom(seq, need, missing, f"sequence {seq}: needs {missing} more page-groups, {available} available")
        required = max(missing, 0)
        pool_left = max(len(self._pool) // self.num_buffers - required, 0)
        wanted = min(need + self.eager_pages, self.max_groups_per_slot) - have
        todo = required + max(min(wanted - required, pool_left), 0)
        done = 0
        try:
            while done < todo:
                if (slot, have + done) in self._strays:
                    self._finish_stray((slot, have + done))  # a teardown left unfinished where the group goes
                self._map_group(slot, seq, self._take_group(slot))
                done += 1
        except BackendError as e:
            if done >= required and isinstance(e, BackendOutOfMemory):
                return  # only mapping ahead ran out of memory: keep what is mapped, the append goes on
            self._undo_grow(slot, seq, have, e)
            if isinstance(e, BackendOutOfMemory):
                self.recorder.emit(Kind.OOM, seq=seq, n=need, bytes=missing * self.group_bytes)
                raise KVOutOfMemory(f"sequence {seq}: the {self.backend.name} backend is out of memory: {e}") from e
            raise

    def _undo_grow(self, slot: int, seq: int, have: int, error: BaseException) -> None:
        """A grow failed: unmap the groups it mapped so that the slot has its `have` groups again. If an unmap fails
        too, this call's groups still on the slot become strays (the slot is still as it was; a retry or close()
        finishes them); `error`, the first failure, is what the caller raises."""
        try:
            while len(self._slot_pages[slot]) // self.num_buffers > have:
                self._unmap_tail_group(slot, seq)
        except BackendError as undo:
            self._strand_tail(slot, have)
            _add_note(error, f"unmapping what it mapped failed too ({undo}); left as strays for a retry or close()")

    def _take_group(self, for_slot: int) -> list[int]:
        """nbuf pages from the pool. When the pool is dry, an unfinished teardown (a stray) is finished first, else
        an idle slot gives up its tail group."""
        nbuf = self.num_buffers
        if len(self._pool) < nbuf:
            if self._strays:
                self._finish_stray(next(iter(self._strays)))
            else:
                victim = max(
                    (slot for slot in self._free_slots if self._slot_pages[slot] and slot != for_slot),
                    key=lambda slot: (len(self._slot_pages[slot]), -slot),
                )
                self._unmap_tail_group(victim, -1)
                self._idle_groups -= 1
        pool = self._pool
        return [pool.pop() for _ in range(nbuf)]

    def _map_group(self, slot: int, seq: int, group: list[int]) -> None:
        """Map one page of `group` into every buffer at the slot's next group index (map, then set access; each
        recorded once it went through). On any failure the buffers mapped so far are unmapped (PAGE_UNMAP each) and
        the group goes back to the pool before the error propagates."""
        pages = self._slot_pages[slot]
        g = _Group(slot, len(pages) // self.num_buffers, group)
        offset = g.index * self.page_size
        region = slot * self.slot_bytes + offset
        size = self.page_size
        emit = self.recorder.emit
        backend = self.backend
        try:
            for b, pid in enumerate(group):
                va = self._bases[b] + region
                t0 = perf_counter_ns()
                backend.map(va, size, self._handles[pid])
                t1 = perf_counter_ns()
                g.mapped = b + 1
                emit(Kind.PAGE_MAP, seq=seq, block=pid, aux=slot, addr=offset, n=b, dur_ns=t1 - t0)
                t2 = perf_counter_ns()
                backend.set_access(va, size)
                t3 = perf_counter_ns()
                g.access = b + 1
                emit(Kind.PAGE_ACCESS, seq=seq, block=pid, aux=slot, addr=offset, n=b, dur_ns=t3 - t2)
        except BaseException as e:
            self._undo_map(g, seq, e)
            raise
        pages.extend(group)

    def _undo_map(self, g: _Group, seq: int, error: BaseException) -> None:
        """Roll back a group that _map_group could not finish: unmap what it mapped, pages back to the pool. If an
        unmap fails too, the group stays behind as a stray for a retry; `error` is what the caller raises."""
        try:
            self._unmap_group(g, seq)
        except BackendError as undo:
            self._add_stray(g, counted=False)
            _add_note(error, f"unmapping the part mapped failed too ({undo}); left as a stray for a retry or close()")
            return
        self._pool.extend(reversed(g.pages))

    def _page_va(self, slot: int, group: int, b: int) -> int:
        return self._bases[b] + slot * self.slot_bytes + group * self.page_size

    def _unmap_page(self, slot: int, seq: int, b: int, offset: int, pid: int) -> None:
        va = self._bases[b] + slot * self.slot_bytes + offset
        t0 = perf_counter_ns()
        self.backend.unmap(va, self.page_size)
        dur = perf_counter_ns() - t0
        self.recorder.emit(Kind.PAGE_UNMAP, seq=seq, block=pid, aux=slot, addr=offset, n=b, dur_ns=dur)

    def _unmap_group(self, g: _Group, seq: int) -> None:
        """Unmap g's mapped buffers, the last first, lowering g.mapped after each: when a call fails, g says exactly
        which buffers are still mapped."""
        offset = g.index * self.page_size
        while g.mapped:
            b = g.mapped - 1
            self._unmap_page(g.slot, seq, b, offset, g.pages[b])
            g.mapped = b
            g.access = min(g.access, b)

    def _unmap_tail_group(self, slot: int, seq: int) -> None:
        """Unmap the slot's last group (every buffer, the last first) and put its pages back in the pool. If an
        unmap fails after others of the group went, the group leaves the slot as a stray before the error
        propagates; if the first one fails, nothing changed. Idle-group counts are the caller's."""
        pages = self._slot_pages[slot]
        nbuf = self.num_buffers
        start = len(pages) - nbuf
        g = _Group(slot, start // nbuf, pages[start:], nbuf, nbuf)
        try:
            self._unmap_group(g, seq)
        except BaseException:
            if g.mapped < nbuf:
                del pages[start:]
                self._add_stray(g, counted=self._slot_seq[slot] == -1)
            raise
        del pages[start:]
        self._pool.extend(reversed(g.pages))

    def _unmap_freed_slot(self, slot: int, seq: int) -> BackendError | None:
        """free() without deferred reclamation: the slot gives back every group, the tail first. If an unmap fails,
        the free still completes (the sequence is gone either way): what is still mapped leaves the slot as strays,
        and the error is returned for free() to raise once its books are done."""
        try:
            while self._slot_pages[slot]:
                self._unmap_tail_group(slot, seq)
        except BackendError as e:
            self._strand_tail(slot, 0)
            return e
        return None

    # ---- strays: page-groups whose teardown failed part-way ------------------------------------------------------
    def _add_stray(self, g: _Group, *, counted: bool) -> None:
        """File g as a stray. Strays count as idle groups (mapped, no request), so usage() still adds up: `counted`
        says whether g already was (it sat on an idle slot)."""
        self._strays[(g.slot, g.index)] = g
        if not counted:
            self._idle_groups += 1

    def _strand_tail(self, slot: int, keep: int) -> None:
        """The slot's groups past its first `keep` leave it as strays, still fully mapped."""
        pages = self._slot_pages[slot]
        nbuf = self.num_buffers
        counted = self._slot_seq[slot] == -1
        for index in range(keep, len(pages) // nbuf):
            self._add_stray(_Group(slot, index, pages[index * nbuf : (index + 1) * nbuf], nbuf, nbuf), counted=counted)
        del pages[keep * nbuf :]

    def _finish_stray(self, key: tuple[int, int]) -> None:
        """Retry a stray's teardown; once all of it is unmapped its pages go back to the pool. Raises the backend's
        error with the stray's books brought up to date."""
        g = self._strays[key]
        self._unmap_group(g, -1)
        del self._strays[key]
        self._pool.extend(reversed(g.pages))
        self._idle_groups -= 1

    def _finish_strays_on(self, slot: int) -> None:
        for key in [key for key in self._strays if key[0] == slot]:
            self._finish_stray(key)


# ---- registry entry ----------------------------------------------------------------------------------------------
def _build(context: BuildContext, options: Mapping[str, Any]) -> VMMAllocator:
    return VMMAllocator(
        context.spec,
        context.capacity_bytes,
        context.recorder,
        backend=context.backend,
        max_batch=context.max_batch,
        max_len=context.max_len,
        page_size=DEFAULT_PAGE_SIZE if options["page_size"] is None else options["page_size"],
        megacache=options["megacache"],
        eager_pages=0 if options["eager_pages"] is None else options["eager_pages"],
        deferred_reclaim=options["deferred_reclaim"],
    )


def _legacy_label(config: Mapping[str, Any]) -> str:
    return f"vmm {format_bytes(config['page_size'])}" + (" megacache" if config.get("megacache") else "")


ENTRY = register(
    AllocatorEntry(
        name="vmm",
        description="vAttention: contiguous virtual buffers, physical pages mapped on demand, deferred reclamation",
        build=_build,
        addressing="pages",
        options=(
            Option("page_size", "--page-size"),
            Option("megacache", "--megacache", False),
            Option("eager_pages", "--eager-pages"),
            Option("deferred_reclaim", "--no-deferred-reclaim", True),
            Option("background_map", "--no-background-map", True),
        ),
        needs_backend=True,
        legacy_label=_legacy_label,
    )
)
