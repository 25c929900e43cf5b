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

Page sharing (`page_sharing`, on by default where a page holds a whole number of rows). A fork maps the parent's
pages (those holding its tokens) into the child's slot at the same places: one physical page mapped at several
addresses, as cuMemMap allows and as the cpu backend does with one memfd offset mapped twice. Each page has a count of
its mappings (`_refs`, equal to the backend's) and of the live slots holding it (`_live`). Pages are written only at a
sequence's end, so a full shared page stays shared; before the first write into a partly filled shared page, the
writer copies it: it maps a fresh page in its place, buffer by buffer, and queues a 'rows' Copy from another holder's
rows (PAGE_COW). With `prefix_sharing`, an admitted prompt maps the full page-groups a live sequence already holds with
the same tokens (chained hashes of each group's token ids, as paged prefix caching hashes blocks; the last prompt
token is always computed), and `admit` returns those tokens as prefix hits. A freed slot unmaps its pages from its
first shared group up (an idle slot holds no page another slot maps: its next owner writes from row 0), and keeps
the exclusive ones below with deferred reclamation. What sharing saves depends on the page size: only whole pages
are shared, so 2 MiB pages of a per-layer buffer (1024 llama-3-8b tokens) share almost nothing of a ShareGPT prompt,
while a megacache page (16 tokens) shares like a 16-token block.

Copies in flight. A queued Copy reads another slot's rows when the executor drains `pending_copies` (before the next
forward pass). Until then the rows it reads must stay mapped to the same pages: a slot that is the source of a
pending copy ("pinned") and is freed keeps everything mapped until the copies are drained (then its teardown runs;
`_later`), and is neither reclaimed nor stripped for a dry pool meanwhile; a source that copies its own shared page
first hands its pending copies over to another holder of the page. The allocator sees the drain as
`pending_copies` becoming empty (executors clear it after applying it).

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
failure a second close() retries only what is left. A copy-on-write is rolled back buffer by buffer when a call fails;
if the rollback fails too, the place is a *hole* (`_holes`: the shared page is unmapped there, or mapped without
access, or a fresh page is still there) that the sequence's next operation (or free, or close) mends first, mapping
the shared page back; the hole keeps that page out of the pool meanwhile.

The allocator is backend-agnostic: it calls only the PhysicalMemory protocol (kvscope.backends.base).
"""

# This module is longer than 400 lines: slots, page groups, deferred reclamation, page sharing with copy-on-write,
# and the rollback of every failed driver call (strays and holes included) change the same books, and a rollback is
# only checkable next to the path it undoes.

from __future__ import annotations

import hashlib
import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
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
# entry and PAGE_CREATE event about 220 bytes, plus three list entries for its sharing counts (24 bytes); a slot's
# page list, sequence entry and free-set entry about 160; a buffer's reservation about 320.
_PAGE_BOOKKEEPING_BYTES = 288
_SLOT_BOOKKEEPING_BYTES = 192
_BUFFER_BOOKKEEPING_BYTES = 384
_ROOT_HASH = b""  # the parent of a sequence's first page-group in the prefix hash chains


@dataclass(slots=True)
class _Seq:
    slot: int
    tokens: int
    final_len: int
    # Groups [0, maybe_shared) may hold pages another live slot maps: an append into one of them checks for a copy.
    maybe_shared: int = 0
    hashes: list[bytes] = field(default_factory=list)  # prefix sharing: chained hashes of its full page-groups
    partial: list[int] = field(default_factory=list)  # prefix sharing: token ids of its partly filled group


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


@dataclass(slots=True)
class _Hole:
    """A place of a live slot (flat index group * buffers + buffer) that a failed copy-on-write left wrong: it must
    hold `original` (the shared page, kept out of the pool meanwhile), and the driver has `current` there (-1:
    nothing), accessible or not."""

    original: int
    current: int
    access: bool


def _add_note(error: BaseException, note: str) -> None:
    """Say on the first error that cleaning up after it failed too (BaseException.add_note: Python 3.11+)."""
    add = getattr(error, "add_note", None)
    if add is not None:
        add(note)


def _chain_hash(parent: bytes, tokens: list[int]) -> bytes:
    """The prefix-sharing hash of one full page-group: blake2b(parent hash + its token ids as int64)."""
    return hashlib.blake2b(parent + np.asarray(tokens, dtype="<i8").tobytes(), digest_size=16).digest()


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
        page_sharing: bool = True,
        prefix_sharing: bool = False,
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
        # Sharing maps whole pages, so a page must hold whole rows: a row across two pages would be half shared.
        whole = page_size % self.buffer_row_bytes == 0
        self.tokens_per_page = page_size // self.buffer_row_bytes if whole else 0
        if prefix_sharing and not whole:
            raise ValueError(
                f"vmm allocator: prefix sharing needs pages of whole rows; a {page_size}-byte page holds "
                f"{page_size / self.buffer_row_bytes:g} rows of {self.buffer_row_bytes} bytes"
            )
        self.page_sharing = page_sharing and whole  # else forks copy rows into the child's own pages
        self.prefix_sharing = prefix_sharing
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
        # Groups whose teardown failed part-way, by (slot, group index): off their slot, their mapped pages idle.
        self._strays: dict[tuple[int, int], _Group] = {}
        self._setup()

        n = self.num_pages
        self._pool: list[int] = list(range(n - 1, -1, -1))  # pop() hands out the lowest id first
        self._slot_pages: list[list[int]] = [[] for _ in range(max_batch)]  # group g = [g*nbuf, (g+1)*nbuf)
        self._slot_seq: list[int] = [-1] * max_batch
        self._free_slots: set[int] = set(range(max_batch))
        self._seqs: dict[int, _Seq] = {}
        # Per page: its mappings in the backend (a page is in the pool iff it has none and no hole holds it), and
        # the live slots whose page lists hold it (shared when > 1); `_home` is that slot while there is exactly
        # one, `_holders` the set while there are more, with `_shared_fill` the tokens a shared page holds.
        self._refs = [0] * n
        self._live = [0] * n
        self._home = [-1] * n
        self._holders: dict[int, set[int]] = {}
        self._shared_fill: dict[int, int] = {}
        self._holes: dict[tuple[int, int], _Hole] = {}  # (slot, flat index) -> what a failed copy-on-write left
        self._pins: dict[tuple[int, int], list[int]] = {}  # (slot, group) -> indices of pending copies reading it
        self._later: set[int] = set()  # free slots kept as they were until the pending copies are drained
        self._by_hash: dict[bytes, dict[int, None]] = {}  # prefix sharing: group hash -> live seqs holding it
        self._first_prompt: dict[int, int] = {}  # prefix sharing: seq -> its first prompt length (PREFIX_HIT)
        # Running totals, so that the high-water marks noted after every operation are O(1); check_invariants
        # compares them with usage()'s full count: tokens held (no sharing), page-groups those tokens need, pages
        # held by a live slot, and what sharing saves of the last two (pages, and the rows in them, beyond one).
        self._tokens = 0
        self._needed = 0
        self._n_live = 0
        self._dup_pages = 0
        self._dup_rows = 0
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
        calling close() again retries only that. Once everything is back, close() is a no-op. Pending copies are
        dropped (nothing will run them)."""
        with self.lock:
            if self._closed and not (self._handles or self._bases):
                return
            self._closed = True  # nothing new is admitted from here on, even if this close fails
            self.pending_copies.clear()
            self._pins.clear()
            self._later.clear()
            self._mend_all()
            owners = self._drop_sequences()
            for slot in range(self.max_batch):
                while self._slot_pages[slot]:
                    self._unmap_tail_group(slot, owners.get(slot, -1))
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
            self._forget(seq, s)
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
        slots' pages, all accessible but where a hole says otherwise, and the still-mapped buffers of strays). After
        any failure, and at any other time, this must equal `backend.state()`."""
        with self.lock:
            maps: set[tuple[int, int, Any, bool]] = set()
            for slot, pages in enumerate(self._slot_pages):
                for i, pid in enumerate(pages):
                    group, b = divmod(i, self.num_buffers)
                    hole = self._holes.get((slot, i))
                    if hole is None:
                        maps.add((self._page_va(slot, group, b), self.page_size, self._handles[pid], True))
                    elif hole.current >= 0:
                        va = self._page_va(slot, group, b)
                        maps.add((va, self.page_size, self._handles[hole.current], hole.access))
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
            "page_sharing": self.page_sharing,
            "prefix_sharing": self.prefix_sharing,
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

    def page_refs(self) -> list[int]:
        """Mappings of each page in the backend (sharing maps one page at several slots)."""
        return list(self._refs)

    def shared_pages(self) -> int:
        """Pages held by more than one live slot now."""
        return len(self._holders)

    # ---- protocol -------------------------------------------------------------------------------------------
    def can_admit(self, prompt_len: int, final_len: int) -> bool:
        with self.lock:
            self._sync_pins()
            if self._closed or final_len > self.max_len or final_len < max(prompt_len, 1):
                return False
            if not self._usable_slots():
                return False
            return self._groups_for(prompt_len) * self.num_buffers <= self._available_pages()

    def admit(self, seq: int, prompt_tokens: np.ndarray, final_len: int) -> int:
        """Take a slot (best fit among free slots) and map the pages the prompt needs (+ eager ones). With prefix
        sharing, first map the full page-groups live sequences hold with the same leading tokens; returns the
        tokens they cover (prefix hits: the sequence starts holding them)."""
        prompt_len = len(prompt_tokens)
        if final_len > self.max_len:
            raise ValueError(f"sequence {seq}: final length {final_len} exceeds max_len={self.max_len}")
        if final_len < max(prompt_len, 1):
            raise ValueError(f"sequence {seq}: final length {final_len} is shorter than its prompt ({prompt_len})")
        with self.lock:
            self._sync_pins()
            shared: list[list[int]] = []
            hashes: list[bytes] = []
            if self.prefix_sharing and seq not in self._seqs:
                shared, hashes = self._lookup(np.asarray(prompt_tokens))
            hit = len(shared) * self.tokens_per_page
            s = self._start(seq, room=prompt_len, hold=hit, final_len=final_len, shared=shared)
            if self.prefix_sharing:
                first = self._first_prompt.setdefault(seq, prompt_len)
                s.hashes = hashes
                for h in hashes:
                    self._by_hash.setdefault(h, {})[seq] = None
                if hit:
                    self.recorder.emit(Kind.PREFIX_HIT, seq=seq, n=min(hit, first))
            self._note()
        return hit

    def fork(self, parent: int, child: int) -> None:
        """The child starts with the parent's tokens in a slot of its own: with page sharing, the pages holding
        them are mapped into the child's slot (no copy; a partly filled page is copied on its first write); else
        the child's own pages get a copy of the parent's rows (a 'rows' Copy for the executor)."""
        with self.lock:
            self._sync_pins()
            p = self._get(parent)
            if child in self._seqs:
                raise KeyError(f"vmm allocator: sequence {child} is already admitted")
            if not self.page_sharing:
                c = self._start(child, room=p.tokens, hold=p.tokens, final_len=p.final_len)
                self._queue_copy(p.slot, c.slot, 0, p.tokens)
                self._note()
                return
            self._mend(p.slot)
            nbuf = self.num_buffers
            pages = self._slot_pages[p.slot]
            shared = [pages[g * nbuf : (g + 1) * nbuf] for g in range(self._groups_for(p.tokens))]
            c = self._start(child, room=p.tokens, hold=p.tokens, final_len=p.final_len, shared=shared)
            p.maybe_shared = c.maybe_shared = len(shared)
            if self.prefix_sharing:
                c.hashes, c.partial = list(p.hashes), list(p.partial)
                for h in c.hashes:
                    self._by_hash.setdefault(h, {})[child] = None
            self._note()

    def can_fork(self, parent: int) -> bool:
        """Room for a fork of `parent` now: a slot, and (without page sharing) pages for a copy of its tokens."""
        with self.lock:
            self._sync_pins()
            p = self._get(parent)
            if self._closed or not self._usable_slots():
                return False
            if self.page_sharing:
                return True
            return self._groups_for(p.tokens) * self.num_buffers <= self._available_pages()

    def can_append(self, seq: int, n: int = 1) -> bool:
        with self.lock:
            self._sync_pins()
            s = self._seqs.get(seq) or self._get(seq)
            new = s.tokens + n
            if new > self.max_len:
                return False
            missing = max(self._groups_for(new) - len(self._slot_pages[s.slot]) // self.num_buffers, 0)
            pages = missing * self.num_buffers + (len(self._cow_places(s)) if n > 0 else 0)
            return pages <= 0 or pages <= self._available_pages()

    def append(self, seq: int, tokens: np.ndarray) -> None:
        # The hot path (millions of calls in a simulated run): the helpers are inlined.
        n = len(tokens)
        with self.lock:
            if self._pins:
                self._sync_pins()
            s = self._seqs.get(seq) or self._get(seq)
            new = s.tokens + n
            if new > self.max_len:
                self._oom(seq, n, 0, f"sequence {seq}: {s.tokens} + {n} tokens exceed max_len={self.max_len}")
            cow = n > 0 and s.tokens // self.tokens_per_page < s.maybe_shared if self.page_sharing else False
            need = -(-new * self.buffer_row_bytes // self.page_size)
            have = len(self._slot_pages[s.slot]) // self.num_buffers
            spare = 0
            if cow:
                if self._holes:
                    self._mend(s.slot)
                spare = len(self._cow_places(s))
                pages = (need - have) * self.num_buffers if need > have else 0
                if pages + spare > self._available_pages():
                    self._oom(seq, n, -(-(pages + spare) // self.num_buffers), f"sequence {seq}: no room for {n}")
            grew = need + self.eager_pages > have
            if grew:
                self._grow(seq, s, need, spare)  # first: a failed grow undoes itself, and a copy is not undone
            if cow:
                try:
                    self._copy_on_write(seq, s, new)
                except BaseException as e:
                    self._undo_grow(s.slot, seq, have, e)
                    raise
            held_before = self._tokens
            crossed = need - self._groups_for(s.tokens)  # groups newly needed: internal fragmentation rises
            if self.prefix_sharing:
                self._hash_tokens(seq, s, tokens)
            self._tokens += n
            self._needed += crossed
            s.tokens = new
            self.recorder.emit(Kind.APPEND, seq=seq, n=n, aux=new)
            if grew or crossed or cow or not held_before or self._dup_rows:
                self._note()  # (with shared pages used and logical differ: note_growth takes them as one)
            else:  # within the groups it already needed: only used can rise
                self.high_water.note_growth(self._used_bytes())

    def ensure_room(self, seq: int, tokens: int) -> int:
        """Map ahead so that the sequence has room for `tokens` tokens in all (plus eager pages), without appending.
        Returns the page-groups newly mapped. Raises KVOutOfMemory (nothing changed) if the room cannot be had.
        A copy-on-write is left to the append (the write it protects happens there)."""
        with self.lock:
            self._sync_pins()
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
        """Release the sequence. Its pages from its first shared group up are unmapped (an idle slot holds no page
        another slot maps); without deferred reclamation all of them. A slot some pending copy reads stays as it is
        until the copies are drained. Only a hole a failed copy-on-write left that cannot be mended makes free()
        raise with nothing changed."""
        with self.lock:
            self._sync_pins()
            s = self._get(seq)
            self._mend(s.slot)
            self._forget(seq, s)
            slot = s.slot
            self._drop_copies_into(slot)
            pinned = any(key[0] == slot for key in self._pins)
            self._release_slot(slot)
            failure = None
            if pinned:
                self._later.add(slot)
            else:
                failure = self._teardown_freed(slot, seq)
            self.recorder.emit(Kind.SLOT_FREE, seq=seq, addr=slot, n=len(self._slot_pages[slot]))
            self._note()
            if failure is not None:
                raise failure

    def num_tokens(self, seq: int) -> int:
        return self._get(seq).tokens

    def usage(self) -> Usage:
        """The books counted from scratch (check_invariants holds the running totals against this)."""
        with self.lock:
            self._sync_pins()
            nbuf, row, page = self.num_buffers, self.buffer_row_bytes, self.page_size
            tokens = needed = 0
            holders: dict[int, int] = {}
            fill_of: dict[int, int] = {}
            for s in self._seqs.values():
                tokens += s.tokens
                needed += self._groups_for(s.tokens)
                for i, pid in enumerate(self._slot_pages[s.slot]):
                    holders[pid] = holders.get(pid, 0) + 1
                    if self.tokens_per_page:
                        fill_of[pid] = min(max(s.tokens - (i // nbuf) * self.tokens_per_page, 0), self.tokens_per_page)
            for (slot, _), hole in self._holes.items():  # a fresh page a failed copy-on-write left in place
                if hole.current >= 0 and hole.current != hole.original and self._slot_seq[slot] != -1:
                    holders[hole.current] = holders.get(hole.current, 0) + 1
            dup_pages = sum(c - 1 for c in holders.values())
            dup_rows = sum((c - 1) * fill_of.get(pid, 0) for pid, c in holders.items() if c > 1)
            mapped = len(self._handles) - len(self._pool)
            live = len(holders)
            used = (tokens * nbuf - dup_rows) * row
            need_pages = needed * nbuf - dup_pages
            return Usage(
                capacity=len(self._handles) * page,  # 0 once closed
                reserved=mapped * page,
                used=used,
                logical=tokens * self.bytes_per_token,
                internal=need_pages * page - used,
                reservation=(live - need_pages) * page,
                mapped_idle=(mapped - live) * page,
                cached_idle=0,
                free=len(self._pool) * page,
            )

    def check_invariants(self) -> None:
        with self.lock:
            self._sync_pins()  # copies the executor drained no longer pin anything
            nbuf = self.num_buffers
            pool = set(self._pool)
            assert len(pool) == len(self._pool), "a page is in the pool twice"
            maps = [0] * len(self._handles)
            live = [0] * len(self._handles)
            for slot, pages in enumerate(self._slot_pages):
                assert len(pages) % nbuf == 0, f"slot {slot}: {len(pages)} pages, not whole groups"
                assert len(pages) // nbuf <= self.max_groups_per_slot, f"slot {slot}: more groups than fit"
                owner = self._slot_seq[slot]
                for i, pid in enumerate(pages):
                    hole = self._holes.get((slot, i))
                    if hole is None:
                        maps[pid] += 1
                    else:
                        assert hole.original == pid and owner != -1, f"hole at ({slot}, {i}) is not its place's"
                        if hole.current >= 0:
                            maps[hole.current] += 1
                            live[hole.current] += hole.current != pid
                    live[pid] += owner != -1
                if owner == -1:
                    assert slot in self._free_slots, f"slot {slot} has no owner but is not free"
                    # (A close that failed part-way leaves the rest of its teardown on the slots it dropped.)
                    ok = self.deferred_reclaim or not pages or self._closed or slot in self._later
                    assert ok, f"slot {slot}: idle pages without deferred reclaim"
                    if slot not in self._later:
                        for pid in pages:
                            assert self._live[pid] == 0, f"idle slot {slot} holds page {pid} a live slot maps"
                else:
                    assert slot not in self._free_slots and slot not in self._later, f"slot {slot} owned and free"
                    s = self._seqs.get(owner)
                    assert s is not None and s.slot == slot, f"slot {slot}: owner {owner} does not point back"
                    assert s.tokens <= self.max_len, f"seq {owner}: {s.tokens} tokens > max_len"
                    assert self._groups_for(s.tokens) <= len(pages) // nbuf, f"seq {owner}: tokens beyond its pages"
            self._check_strays(maps)
            held = {h.original for h in self._holes.values()}
            for pid in range(len(self._handles)):
                assert maps[pid] == self._refs[pid], f"page {pid}: {self._refs[pid]} mappings booked, {maps[pid]} real"
                assert self._closed or live[pid] == self._live[pid], f"page {pid}: live holders {self._live[pid]}"
                out = maps[pid] > 0 or pid in held
                assert out != (pid in pool), f"page {pid}: {'mapped' if out else 'unmapped'} but pool says otherwise"
            for pid, holders in self._holders.items():
                assert len(holders) == self._live[pid] > 1, f"page {pid}: holders {holders} vs {self._live[pid]}"
            assert self._closed or len(self._handles) == self.num_pages, "pages released while open"
            assert len(self._seqs) + len(self._free_slots) == self.max_batch, "slots lost"
            assert self._later <= self._free_slots, "a slot waits for copies but is not free"
            for (slot, group), where in self._pins.items():
                for i in where:
                    c = self.pending_copies[i]
                    assert c.src == slot * self.rows_per_slot + group * self.tokens_per_page or not self.page_sharing
            u = self.usage()
            books = (u.reserved, u.used, u.internal, u.reservation, u.mapped_idle, u.cached_idle)
            assert self._closed or self._note_values() == books, f"running totals {self._note_values()} != {books}"

    def _check_strays(self, maps: list[int]) -> None:
        """check_invariants for strays: each is partly mapped and lies past its slot's mapped groups; its mapped
        pages count in `maps`."""
        nbuf = self.num_buffers
        for (slot, index), g in self._strays.items():
            assert (g.slot, g.index) == (slot, index), f"stray filed at ({slot}, {index}) is ({g.slot}, {g.index})"
            assert 0 < g.mapped <= nbuf and g.mapped - 1 <= g.access <= g.mapped, f"stray {g}: bad counts"
            assert index >= len(self._slot_pages[slot]) // nbuf, f"stray {g} inside its slot's mapped groups"
            for pid in g.pages[: g.mapped]:
                maps[pid] += 1

    # ---- internals ------------------------------------------------------------------------------------------
    def _used_bytes(self) -> int:
        return (self._tokens * self.num_buffers - self._dup_rows) * self.buffer_row_bytes

    def _note_values(self) -> tuple[int, int, int, int, int, int]:
        """(reserved, used, internal, reservation, mapped_idle, cached) from the running totals: a created page out
        of the pool is mapped somewhere (or held by a hole); live pages are those a live slot holds."""
        page = self.page_size
        mapped = len(self._handles) - len(self._pool)
        used = self._used_bytes()
        need_pages = self._needed * self.num_buffers - self._dup_pages
        live = self._n_live
        return mapped * page, used, need_pages * page - used, (live - need_pages) * page, (mapped - live) * page, 0

    def _note(self) -> None:
        reserved, used, internal, reservation, idle, cached = self._note_values()
        logical = self._tokens * self.bytes_per_token
        self.high_water.note(reserved, used, logical, internal, reservation, idle, cached)

    def _groups_for(self, tokens: int) -> int:
        """Page-groups a slot needs to hold `tokens` tokens."""
        return -(-tokens * self.buffer_row_bytes // self.page_size)

    def _usable_slots(self) -> int:
        return len(self._free_slots) - len(self._later)

    def _available_pages(self) -> int:
        """Pages a live slot could still get: the pool plus the pages only idle slots and strays map (a slot that
        waits for pending copies gives up nothing)."""
        mapped = len(self._handles) - len(self._pool)
        waiting = len({pid for slot in self._later for pid in self._slot_pages[slot] if not self._live[pid]})
        return len(self._pool) + mapped - self._n_live - waiting

    def _get(self, seq: int) -> _Seq:
        try:
            return self._seqs[seq]
        except KeyError:
            raise KeyError(f"vmm allocator: unknown sequence {seq}") from None

    def _oom(self, seq: int, n: int, groups: int, message: str) -> None:
        self.recorder.emit(Kind.OOM, seq=seq, n=n, bytes=groups * self.group_bytes)
        raise KVOutOfMemory(message)

    def _forget(self, seq: int, s: _Seq) -> None:
        """A sequence leaves: the running totals and the prefix index drop it (its slot is the caller's)."""
        del self._seqs[seq]
        self._tokens -= s.tokens
        self._needed -= self._groups_for(s.tokens)
        for h in s.hashes:
            holders = self._by_hash.get(h)
            if holders is not None:
                holders.pop(seq, None)
                if not holders:
                    del self._by_hash[h]

    # ---- per-page holders ------------------------------------------------------------------------------------
    def _hold(self, pid: int, slot: int, fill: int) -> None:
        """A live slot's page list now holds page `pid` (holding `fill` tokens, for a page it shares)."""
        live = self._live[pid]
        if live == 0:
            self._n_live += 1
            self._home[pid] = slot
        else:
            if live == 1:
                self._holders[pid] = {self._home[pid]}
                self._shared_fill[pid] = fill
            self._holders[pid].add(slot)
            self._dup_pages += 1
            self._dup_rows += self._shared_fill[pid]
        self._live[pid] = live + 1

    def _drop(self, pid: int, slot: int) -> None:
        """A live slot's page list no longer holds page `pid`."""
        live = self._live[pid] - 1
        self._live[pid] = live
        if live == 0:
            self._n_live -= 1
            self._home[pid] = -1
            return
        holders = self._holders[pid]
        holders.discard(slot)
        self._dup_pages -= 1
        self._dup_rows -= self._shared_fill[pid]
        if live == 1:
            (self._home[pid],) = holders
            del self._holders[pid]
            del self._shared_fill[pid]

    def _fill(self, s: _Seq, group: int) -> int:
        return min(max(s.tokens - group * self.tokens_per_page, 0), self.tokens_per_page)

    def _mapped_once_more(self, pid: int) -> None:
        self._refs[pid] += 1

    def _mapped_once_less(self, pid: int) -> None:
        """A mapping of `pid` went: with none left (and no hole waiting for it) the page is back in the pool."""
        refs = self._refs[pid] - 1
        self._refs[pid] = refs
        if refs == 0 and not (self._holes and any(h.original == pid for h in self._holes.values())):
            self._pool.append(pid)

    # ---- starting a sequence ------------------------------------------------------------------------------------
    def _start(self, seq: int, *, room: int, hold: int, final_len: int, shared: list[list[int]] | None = None) -> _Seq:
        """Admit or fork: pick a slot, take it over, map the `shared` page-groups (pages other slots map, at the
        same places) and what else `room` tokens need; the sequence then holds `hold` tokens. Atomic."""
        if self._closed:
            raise RuntimeError("vmm allocator is closed")
        if seq in self._seqs:
            raise KeyError(f"vmm allocator: sequence {seq} is already admitted")
        shared = shared or []
        need = self._groups_for(room)
        fresh = max(need - len(shared), 0)
        if not self._usable_slots():
            self._oom(seq, room, need, f"sequence {seq}: all {self.max_batch} slots are taken")
        available = self._available_pages() // self.num_buffers
        if fresh > available:
            self._oom(seq, room, fresh, f"sequence {seq}: needs {fresh} page-groups, {available} available")
        # A shared start maps other slots' pages from row 0, so it takes the free slot with the fewest pages and
        # gives those back first; otherwise the best fit, whose idle pages it reuses without a driver call.
        target = 0 if shared else self._groups_for(min(room + 1, self.max_len))
        slot = self._best_fit_slot(target)
        if self._strays:
            self._finish_strays_on(slot)  # its old owner's unfinished teardown goes first; raises: nothing taken
        if shared:
            while self._slot_pages[slot]:
                self._unmap_tail_group(slot, -1)
        self._free_slots.discard(slot)
        self._slot_seq[slot] = seq
        pages = self._slot_pages[slot]
        for pid in pages:
            self._hold(pid, slot, 0)  # an idle slot's pages are its own
        s = _Seq(slot, hold, final_len)
        self._seqs[seq] = s
        self.recorder.emit(Kind.SLOT_ALLOC, seq=seq, addr=slot)
        if pages:
            self.recorder.emit(Kind.RECLAIM, seq=seq, addr=slot, n=len(pages))
        try:
            for group in shared:
                self._map_group(slot, seq, group, self._fill(s, len(pages) // self.num_buffers))
            if need + self.eager_pages > len(pages) // self.num_buffers:
                self._grow(seq, s, need)
        except BaseException as e:
            if shared:
                self._undo_grow(slot, seq, 0, e)  # an idle slot must not keep other slots' pages
            del self._seqs[seq]
            self._release_slot(slot)
            self.recorder.emit(Kind.SLOT_FREE, seq=seq, addr=slot, n=len(self._slot_pages[slot]))
            raise
        self._tokens += hold
        self._needed += self._groups_for(hold)
        return s

    def _release_slot(self, slot: int) -> None:
        for pid in self._slot_pages[slot]:
            self._drop(pid, slot)
        self._slot_seq[slot] = -1
        self._free_slots.add(slot)

    def _teardown_freed(self, slot: int, seq: int) -> BackendError | None:
        """A freed slot's teardown: without deferred reclamation every group, else those from its first shared
        group up (the tail first). A failed unmap leaves the rest as strays; the error is returned for free() to
        raise once its books are done."""
        nbuf = self.num_buffers
        pages = self._slot_pages[slot]
        keep = 0
        if self.deferred_reclaim:
            shared = next((i for i, pid in enumerate(pages) if self._refs[pid] > 1), len(pages))
            keep = shared // nbuf
        try:
            while len(pages) // nbuf > keep:
                self._unmap_tail_group(slot, seq)
        except BackendError as e:
            self._strand_tail(slot, keep)
            return e
        return None

    def _best_fit_slot(self, target: int) -> int:
        """The free slot whose mapped groups best fit `target`: the smallest that covers it, else the largest
        (fewest new maps); ties go to the lowest slot. Slots waiting for pending copies are left alone."""
        pages = self._slot_pages
        nbuf = self.num_buffers
        best, best_key = -1, None
        for slot in self._free_slots:
            if slot in self._later:
                continue
            have = len(pages[slot]) // nbuf
            key = (0, have - target, slot) if have >= target else (1, target - have, slot)
            if best_key is None or key < best_key:
                best, best_key = slot, key
        return best

    # ---- prefix sharing -------------------------------------------------------------------------------------
    def _lookup(self, prompt: np.ndarray) -> tuple[list[list[int]], list[bytes]]:
        """The page-groups of the longest run of the prompt's full groups that live sequences hold with the same
        tokens (never covering the last prompt token), and their hashes."""
        tpp, nbuf = self.tokens_per_page, self.num_buffers
        ids = prompt.tolist()
        groups: list[list[int]] = []
        hashes: list[bytes] = []
        parent = _ROOT_HASH
        for g in range((len(ids) - 1) // tpp):
            h = _chain_hash(parent, ids[g * tpp : (g + 1) * tpp])
            holders = self._by_hash.get(h)
            if not holders:
                break
            slot = self._seqs[next(iter(holders))].slot
            if self._holes and any(key[0] == slot for key in self._holes):
                break  # a holder a failed copy left with a hole: not a page to hand out
            groups.append(self._slot_pages[slot][g * nbuf : (g + 1) * nbuf])
            hashes.append(h)
            parent = h
        return groups, hashes

    def _hash_tokens(self, seq: int, s: _Seq, tokens: np.ndarray) -> None:
        """Prefix sharing: every page-group the append fills gets its chained hash, findable by later prompts."""
        tpp = self.tokens_per_page
        for t in np.asarray(tokens).tolist():
            s.partial.append(t)
            if len(s.partial) == tpp:
                h = _chain_hash(s.hashes[-1] if s.hashes else _ROOT_HASH, s.partial)
                s.hashes.append(h)
                self._by_hash.setdefault(h, {})[seq] = None
                s.partial = []

    # ---- copies in flight --------------------------------------------------------------------------------------
    def _queue_copy(self, src_slot: int, dst_slot: int, first: int, rows: int) -> None:
        """Queue a rows Copy of `rows` tokens from src_slot's row `first` to dst_slot's, and pin the source groups
        it reads until the executor drains the copies."""
        rps = self.rows_per_slot
        self.pending_copies.append(Copy("rows", src_slot * rps + first, dst_slot * rps + first, rows))
        if not self.page_sharing:
            for g in range(self._groups_for(first + rows)):
                self._pins.setdefault((src_slot, g), []).append(len(self.pending_copies) - 1)
            return
        group = first // self.tokens_per_page
        self._pins.setdefault((src_slot, group), []).append(len(self.pending_copies) - 1)

    def _drop_copies_into(self, slot: int) -> None:
        """The slot's sequence is gone: pending copies into its rows have nothing to fill (its rows may be unmapped
        before the executor runs them); they become empty copies (indices stay), reading nothing."""
        lo, hi = slot * self.rows_per_slot, (slot + 1) * self.rows_per_slot
        for i, c in enumerate(self.pending_copies):
            if c.n and lo <= c.dst < hi:
                self.pending_copies[i] = Copy(c.kind, c.src, c.dst, 0)
                for key in [key for key, where in self._pins.items() if i in where]:
                    self._pins[key].remove(i)
                    if not self._pins[key]:
                        del self._pins[key]

    def _repin(self, slot: int, group: int, to_slot: int) -> None:
        """The copies reading (slot, group) read another holder's rows of the same pages instead: `slot` is about
        to write there."""
        where = self._pins.pop((slot, group), None)
        if not where:
            return
        shift = (to_slot - slot) * self.rows_per_slot
        for i in where:
            c = self.pending_copies[i]
            self.pending_copies[i] = Copy(c.kind, c.src + shift, c.dst, c.n)
        self._pins.setdefault((to_slot, group), []).extend(where)

    def _sync_pins(self) -> None:
        """Once the executor drained the copies, the sources are free again: the slots freed meanwhile get their
        teardown. A failed unmap there leaves strays (the free that deferred it has returned; close() or the next
        use of those places finishes them)."""
        if self.pending_copies or not (self._pins or self._later):
            return
        self._pins.clear()
        later, self._later = self._later, set()
        wait = getattr(self.backend, "synchronize", None)  # a device backend: copies it was handed run async
        if later and wait is not None:
            wait()  # the copies that read these pages have finished before the pages go
        for slot in sorted(later):
            if self._slot_seq[slot] == -1:
                self._teardown_freed(slot, -1)

    # ---- copy-on-write -----------------------------------------------------------------------------------------
    def _cow_places(self, s: _Seq) -> list[int]:
        """Flat indices of the sequence's partly filled group whose page another live slot holds too: an append
        copies them first."""
        tpp = self.tokens_per_page
        if not self.page_sharing or s.tokens % tpp == 0 or s.tokens // tpp >= s.maybe_shared:
            return []
        nbuf = self.num_buffers
        start = (s.tokens // tpp) * nbuf
        pages = self._slot_pages[s.slot]
        return [i for i in range(start, start + nbuf) if self._live[pages[i]] > 1]

    def _copy_on_write(self, seq: int, s: _Seq, new: int) -> None:
        """Before the append writes into a partly filled group holding shared pages: map a fresh page in place of
        each (the last buffer first), then queue a copy of the group's rows from another holder. A failure rolls
        back the places already switched and raises; an unreadable place it cannot restore becomes a hole."""
        places = self._cow_places(s)
        tpp = self.tokens_per_page
        group = s.tokens // tpp
        if not places:
            s.maybe_shared = group  # every group below is full and never written again: no check until a fork
            return
        available = self._available_pages()
        if len(places) > available:
            self._oom(seq, new - s.tokens, 1, f"sequence {seq}: copy-on-write needs {len(places)} pages, {available}")
        slot = s.slot
        pages = self._slot_pages[slot]
        source = min(self._holders[pages[places[0]]] - {slot})  # holds the same rows of this group
        self._repin(slot, group, source)  # copies reading this slot's rows read the other holder's from here on
        fresh = self._take_pages(len(places), slot)
        done: list[tuple[int, int]] = []  # (place, the shared page it had)
        fill = self._fill(s, group)
        try:
            for i in reversed(places):
                old = pages[i]
                self._switch(slot, seq, i, fresh.pop(), fill)
                done.append((i, old))
        except BackendError as e:
            self._pool.extend(reversed(fresh))  # the pages never mapped
            for i, old in reversed(done):
                undo = self._unswitch(slot, seq, i, old, fill)
                if undo is not None:
                    _add_note(e, f"undoing the copy-on-write failed too ({undo}); a hole is left for a retry")
            if isinstance(e, BackendOutOfMemory):
                self.recorder.emit(Kind.OOM, seq=seq, n=new - s.tokens, bytes=len(places) * self.page_size)
                raise KVOutOfMemory(f"sequence {seq}: copy-on-write ran out of memory: {e}") from e
            raise
        self._queue_copy(source, slot, group * tpp, fill)
        s.maybe_shared = group

    def _switch(self, slot: int, seq: int, i: int, fresh: int, fill: int) -> None:
        """Put page `fresh` at place i of a live slot instead of the shared page there (unmap, map, set access). A
        failure after the unmap puts the shared page back; if that fails too, the place is left a hole."""
        pages = self._slot_pages[slot]
        shared = pages[i]
        group, b = divmod(i, self.num_buffers)
        offset = group * self.page_size
        try:
            self._unmap_page(slot, seq, b, offset, shared)
        except BackendError:
            self._pool.append(fresh)  # nothing changed: the fresh page goes back
            raise
        self._drop(shared, slot)
        try:
            self._map_page(slot, seq, b, offset, fresh)
        except BackendError:
            mapped = self._refs[fresh] > 0  # mapped here without access (it was mapped nowhere else)
            if mapped:
                self._hold(fresh, slot, 0)
            else:
                self._pool.append(fresh)
            self._hole(slot, seq, i, shared, fresh if mapped else -1, False, fill)
            raise
        pages[i] = fresh
        self._hold(fresh, slot, fill)
        self.recorder.emit(Kind.PAGE_COW, seq=seq, block=fresh, aux=shared, addr=offset, n=b, bytes=self.page_size)

    def _unswitch(self, slot: int, seq: int, i: int, shared: int, fill: int) -> BackendError | None:
        """Roll place i of a copy-on-write back to its shared page (unmap the fresh one, map the shared one back);
        returns the error that left it a hole, if one did."""
        pages = self._slot_pages[slot]
        fresh = pages[i]
        pages[i] = shared
        return self._hole(slot, seq, i, shared, fresh, True, fill)

    def _hole(
        self, slot: int, seq: int, i: int, original: int, current: int, access: bool, fill: int
    ) -> BackendError | None:
        """Book place i as a hole standing for `original` (held by the slot again; `current` is what the driver has
        there, -1 for nothing), then try to mend it; returns the error that keeps it a hole, if any."""
        self._holes[(slot, i)] = _Hole(original, current, access)
        self._hold(original, slot, fill)
        try:
            self._mend_place(slot, seq, i)
        except BackendError as e:
            return e
        return None

    def _mend(self, slot: int) -> None:
        """Mend the holes a failed copy-on-write left on `slot` (raises the backend's error, books exact)."""
        if not self._holes:
            return
        seq = self._slot_seq[slot]
        for key in sorted(k for k in self._holes if k[0] == slot):
            self._mend_place(slot, seq, key[1])

    def _mend_all(self) -> None:
        for slot, _ in sorted(self._holes):
            self._mend(slot)

    def _mend_place(self, slot: int, seq: int, i: int) -> None:
        hole = self._holes[(slot, i)]
        group, b = divmod(i, self.num_buffers)
        offset = group * self.page_size
        if hole.current >= 0 and hole.current != hole.original:
            wrong = hole.current
            self._unmap_page(slot, seq, b, offset, wrong)
            hole.current, hole.access = -1, False
            self._drop(wrong, slot)
        if hole.current < 0:
            va = self._page_va(slot, group, b)
            t0 = perf_counter_ns()
            self.backend.map(va, self.page_size, self._handles[hole.original])
            dur = perf_counter_ns() - t0
            self._mapped_once_more(hole.original)
            hole.current = hole.original
            self.recorder.emit(Kind.PAGE_MAP, seq=seq, block=hole.original, aux=slot, addr=offset, n=b, dur_ns=dur)
        if not hole.access:
            va = self._page_va(slot, group, b)
            t0 = perf_counter_ns()
            self.backend.set_access(va, self.page_size)
            dur = perf_counter_ns() - t0
            self.recorder.emit(Kind.PAGE_ACCESS, seq=seq, block=hole.original, aux=slot, addr=offset, n=b, dur_ns=dur)
        del self._holes[(slot, i)]

    # ---- growth -------------------------------------------------------------------------------------------------
    def _grow(self, seq: int, s: _Seq, need: int, spare: int = 0) -> None:
        """Map groups on s's slot until it has `need` (required; idle slots give up pages if the pool is dry) and
        `need + eager_pages` (best effort, from the pool only: mapping ahead never unmaps idle slots; capped at the
        slot size). If the required part fails, this call's groups are unmapped again and KVOutOfMemory is raised
        (chained to the backend error); any other backend error unmaps this call's groups and propagates."""
        slot = s.slot
        nbuf = self.num_buffers
        have = len(self._slot_pages[slot]) // nbuf
        missing = need - have
        available = self._available_pages() // nbuf
        if missing > available:
            self._oom(seq, need, missing, f"sequence {seq}: needs {missing} more page-groups, {available} available")
        required = max(missing, 0)
        pool_left = max((len(self._pool) - spare) // nbuf - required, 0)  # `spare` pages stay for a copy-on-write
        wanted = min(need + self.eager_pages, self.max_groups_per_slot) - have
        todo = required + max(min(wanted - required, pool_left), 0)
        done = 0
        try:
            while done < todo:
                if (slot, have + done) in self._strays:
                    self._finish_stray((slot, have + done))  # a teardown left unfinished where the group goes
                self._map_group(slot, seq, self._take_pages(nbuf, slot), 0)
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

    def _take_pages(self, count: int, for_slot: int) -> list[int]:
        """`count` pages from the pool. When the pool is dry, an unfinished teardown (a stray) is finished first,
        else an idle slot gives up its tail group (never one waiting for pending copies)."""
        while len(self._pool) < count:
            if self._strays:
                self._finish_stray(next(iter(self._strays)))
                continue
            victim = max(
                (
                    slot
                    for slot in self._free_slots
                    if self._slot_pages[slot] and slot != for_slot and slot not in self._later
                ),
                key=lambda slot: (len(self._slot_pages[slot]), -slot),
            )
            self._unmap_tail_group(victim, -1)
        pool = self._pool
        return [pool.pop() for _ in range(count)]

    def _map_page(self, slot: int, seq: int, b: int, offset: int, pid: int) -> None:
        """Map page `pid` at buffer b, byte `offset` of the slot's region, then set access; on a failed set access
        the map stays (the caller's rollback unmaps it). Each call is booked once it went through."""
        va = self._bases[b] + slot * self.slot_bytes + offset
        emit = self.recorder.emit
        t0 = perf_counter_ns()
        self.backend.map(va, self.page_size, self._handles[pid])
        t1 = perf_counter_ns()
        self._mapped_once_more(pid)
        emit(Kind.PAGE_MAP, seq=seq, block=pid, aux=slot, addr=offset, n=b, dur_ns=t1 - t0)
        t2 = perf_counter_ns()
        self.backend.set_access(va, self.page_size)
        t3 = perf_counter_ns()
        emit(Kind.PAGE_ACCESS, seq=seq, block=pid, aux=slot, addr=offset, n=b, dur_ns=t3 - t2)

    def _map_group(self, slot: int, seq: int, group: list[int], fill: int) -> None:
        """Map one page of `group` into every buffer at the slot's next group index (map, then set access; each
        recorded once it went through); the pages may be mapped elsewhere too (sharing: they hold `fill` tokens).
        On any failure the buffers mapped so far are unmapped (PAGE_UNMAP each) and pages no slot maps any more go
        back to the pool before the error propagates."""
        pages = self._slot_pages[slot]
        g = _Group(slot, len(pages) // self.num_buffers, list(group))
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
                self._mapped_once_more(pid)
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
        for pid in group:
            self._hold(pid, slot, fill)

    def _undo_map(self, g: _Group, seq: int, error: BaseException) -> None:
        """Roll back a group that _map_group could not finish: unmap what it mapped; pages nobody maps go back to
        the pool. If an unmap fails too, the group stays behind as a stray for a retry; `error` is what the caller
        raises."""
        unmapped = [pid for pid in reversed(g.pages[g.mapped :]) if self._refs[pid] == 0]
        self._pool.extend(unmapped)  # never mapped here: the fresh ones go back first, in the old order
        try:
            self._unmap_group(g, seq)
        except BackendError as undo:
            self._add_stray(g)
            _add_note(error, f"unmapping the part mapped failed too ({undo}); left as a stray for a retry or close()")

    def _page_va(self, slot: int, group: int, b: int) -> int:
        return self._bases[b] + slot * self.slot_bytes + group * self.page_size

    def _unmap_page(self, slot: int, seq: int, b: int, offset: int, pid: int) -> None:
        va = self._bases[b] + slot * self.slot_bytes + offset
        t0 = perf_counter_ns()
        self.backend.unmap(va, self.page_size)
        dur = perf_counter_ns() - t0
        self._mapped_once_less(pid)
        self.recorder.emit(Kind.PAGE_UNMAP, seq=seq, block=pid, aux=slot, addr=offset, n=b, dur_ns=dur)

    def _unmap_group(self, g: _Group, seq: int) -> None:
        """Unmap g's mapped buffers, the last first, lowering g.mapped after each: when a call fails, g says exactly
        which buffers are still mapped. (g is not on a slot's page list: its pages are held by no live slot.)"""
        offset = g.index * self.page_size
        while g.mapped:
            b = g.mapped - 1
            self._unmap_page(g.slot, seq, b, offset, g.pages[b])
            g.mapped = b
            g.access = min(g.access, b)

    def _unmap_tail_group(self, slot: int, seq: int) -> None:
        """Unmap the slot's last group (every buffer, the last first); pages nobody maps any more go back to the
        pool. If an unmap fails after others of the group went, the group leaves the slot as a stray before the
        error propagates; if the first one fails, nothing changed."""
        pages = self._slot_pages[slot]
        nbuf = self.num_buffers
        start = len(pages) - nbuf
        live = self._slot_seq[slot] != -1
        group = pages[start:]
        g = _Group(slot, start // nbuf, group, nbuf, nbuf)
        try:
            self._unmap_group(g, seq)
        except BaseException:
            if g.mapped < nbuf:
                del pages[start:]
                if live:
                    for pid in group:
                        self._drop(pid, slot)
                self._add_stray(g)
            raise
        del pages[start:]
        if live:
            for pid in group:
                self._drop(pid, slot)

    # ---- strays: page-groups whose teardown failed part-way ------------------------------------------------------
    def _add_stray(self, g: _Group) -> None:
        """File g as a stray: its still-mapped pages are mapped-idle until a retry unmaps them."""
        self._strays[(g.slot, g.index)] = g

    def _strand_tail(self, slot: int, keep: int) -> None:
        """The slot's groups past its first `keep` leave it as strays, still fully mapped."""
        pages = self._slot_pages[slot]
        nbuf = self.num_buffers
        live = self._slot_seq[slot] != -1
        for index in range(keep, len(pages) // nbuf):
            group = pages[index * nbuf : (index + 1) * nbuf]
            if live:
                for pid in group:
                    self._drop(pid, slot)
            self._add_stray(_Group(slot, index, group, nbuf, nbuf))
        del pages[keep * nbuf :]

    def _finish_stray(self, key: tuple[int, int]) -> None:
        """Retry a stray's teardown; pages nobody maps any more go back to the pool. Raises the backend's error with
        the stray's books brought up to date."""
        g = self._strays[key]
        self._unmap_group(g, -1)
        del self._strays[key]

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
        page_sharing=options["page_sharing"],
        prefix_sharing=options["prefix_caching"],
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
            Option("page_sharing", "--no-page-sharing", True),
            Option("prefix_caching", "--prefix-caching", False),
        ),
        needs_backend=True,
        legacy_label=_legacy_label,
    )
)
