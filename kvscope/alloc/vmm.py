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

The allocator is backend-agnostic: it calls only the PhysicalMemory protocol (kvscope.backends.base).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from time import perf_counter_ns
from typing import Any

import numpy as np

from kvscope.alloc.base import Copy, KVOutOfMemory, Usage
from kvscope.backends.base import BackendError, BackendOutOfMemory, PhysicalMemory
from kvscope.events import Kind
from kvscope.recorder import NullRecorder, Recorder
from kvscope.spec import KVSpec

DEFAULT_PAGE_SIZE = 2 << 20


@dataclass(slots=True)
class _Seq:
    slot: int
    tokens: int
    final_len: int


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
        for field, value in (("max_batch", max_batch), ("max_len", max_len), ("page_size", page_size)):
            if value <= 0:
                raise ValueError(f"vmm allocator: {field} must be positive, got {value}")
        if eager_pages < 0:
            raise ValueError(f"vmm allocator: eager_pages must not be negative, got {eager_pages}")
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

        self._bases: list[int] = []
        self._handles: list[Any] = []
        self._closed = False
        self._setup()

        self._pool: list[int] = list(range(self.num_pages - 1, -1, -1))  # pop() hands out the lowest id first
        self._slot_pages: list[list[int]] = [[] for _ in range(max_batch)]  # group g = [g*nbuf, (g+1)*nbuf)
        self._slot_seq: list[int] = [-1] * max_batch
        self._free_slots: set[int] = set(range(max_batch))
        self._idle_groups = 0  # groups mapped on slots with no live request
        self._seqs: dict[int, _Seq] = {}

    # ---- construction / teardown ----------------------------------------------------------------------------
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
            for handle in self._handles:
                self.backend.release(handle)
            for base in self._bases:
                self.backend.free_reservation(base, self.buffer_bytes)
            self._handles.clear()
            self._bases.clear()
            self._closed = True
            if isinstance(e, BackendOutOfMemory):
                raise KVOutOfMemory(
                    f"vmm allocator: could not create {self.num_pages} pages of {self.page_size} bytes: {e}"
                ) from e
            raise

    def close(self) -> None:
        """Unmap every page, release every page, free the reservations. The backend itself stays open (its owner
        closes it). Safe to call twice."""
        with self.lock:
            if self._closed:
                return
            for slot in range(self.max_batch):
                while self._slot_pages[slot]:
                    self._unmap_tail_group(slot, self._slot_seq[slot])
            for pid, handle in enumerate(self._handles):
                t0 = perf_counter_ns()
                self.backend.release(handle)
                dur = perf_counter_ns() - t0
                self.recorder.emit(Kind.PAGE_RELEASE, block=pid, bytes=self.page_size, dur_ns=dur)
            for base in self._bases:
                self.backend.free_reservation(base, self.buffer_bytes)
            self._pool.clear()
            self._handles.clear()
            self._bases.clear()
            self._seqs.clear()
            self._slot_seq = [-1] * self.max_batch
            self._free_slots = set(range(self.max_batch))
            self._idle_groups = 0
            self._closed = True

    def __enter__(self) -> VMMAllocator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def config(self) -> dict:
        return {
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
        return 0

    def fork(self, parent: int, child: int) -> None:
        """The child gets its own slot holding a copy of the parent's tokens (a 'rows' Copy for the executor)."""
        with self.lock:
            p = self._get(parent)
            c = self._start(child, room=p.tokens, hold=p.tokens, final_len=p.final_len)
            self.pending_copies.append(Copy("rows", p.slot * self.rows_per_slot, c.slot * self.rows_per_slot, p.tokens))

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
            if need + self.eager_pages > len(self._slot_pages[s.slot]) // self.num_buffers:
                self._grow(seq, s, need)
            s.tokens = new
            self.recorder.emit(Kind.APPEND, seq=seq, n=n, aux=new)

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
            return self.mapped_groups(s.slot) - before

    def free(self, seq: int) -> None:
        with self.lock:
            s = self._get(seq)
            del self._seqs[seq]
            if not self.deferred_reclaim:
                while self._slot_pages[s.slot]:
                    self._unmap_tail_group(s.slot, seq)
            self._release_slot(s.slot)
            self.recorder.emit(Kind.SLOT_FREE, seq=seq, addr=s.slot, n=len(self._slot_pages[s.slot]))

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
            assert len(self._pool) % nbuf == 0, f"pool holds {len(self._pool)} pages, not whole groups"
            idle = 0
            for slot, pages in enumerate(self._slot_pages):
                assert len(pages) % nbuf == 0, f"slot {slot}: {len(pages)} pages, not whole groups"
                assert len(pages) // nbuf <= self.max_groups_per_slot, f"slot {slot}: more groups than fit"
                for pid in pages:
                    assert pid not in seen, f"page {pid} mapped twice or both mapped and in the pool"
                    seen.add(pid)
                owner = self._slot_seq[slot]
                if owner == -1:
                    assert slot in self._free_slots, f"slot {slot} has no owner but is not free"
                    assert self.deferred_reclaim or not pages, f"slot {slot}: idle pages without deferred reclaim"
                    idle += len(pages) // nbuf
                else:
                    assert slot not in self._free_slots, f"slot {slot} owned by {owner} but listed free"
                    s = self._seqs.get(owner)
                    assert s is not None and s.slot == slot, f"slot {slot}: owner {owner} does not point back"
                    assert s.tokens <= self.max_len, f"seq {owner}: {s.tokens} tokens > max_len"
                    assert self._groups_for(s.tokens) <= len(pages) // nbuf, f"seq {owner}: tokens beyond its pages"
            assert len(seen) == (0 if self._closed else self.num_pages), "pages lost or invented"
            assert idle == self._idle_groups, f"idle group count {self._idle_groups} != {idle}"
            assert len(self._seqs) + len(self._free_slots) == self.max_batch, "slots lost"

    # ---- internals ------------------------------------------------------------------------------------------
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
        (chained to the backend error)."""
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
                self._map_group(slot, seq, self._take_group(slot))
                done += 1
        except BackendError as e:
            if done >= required:
                if isinstance(e, BackendOutOfMemory):
                    return  # only mapping ahead failed: keep what is mapped, the append goes on
                raise
            for _ in range(done):
                self._unmap_tail_group(slot, seq)
            if isinstance(e, BackendOutOfMemory):
                self.recorder.emit(Kind.OOM, seq=seq, n=need, bytes=missing * self.group_bytes)
                raise KVOutOfMemory(f"sequence {seq}: the {self.backend.name} backend is out of memory: {e}") from e
            raise

    def _take_group(self, for_slot: int) -> list[int]:
        """nbuf pages from the pool; an idle slot gives up its tail group first when the pool is dry."""
        nbuf = self.num_buffers
        if len(self._pool) < nbuf:
            victim = max(
                (slot for slot in self._free_slots if self._slot_pages[slot] and slot != for_slot),
                key=lambda slot: (len(self._slot_pages[slot]), -slot),
            )
            self._unmap_tail_group(victim, -1)
            self._idle_groups -= 1
        pool = self._pool
        return [pool.pop() for _ in range(nbuf)]

    def _map_group(self, slot: int, seq: int, group: list[int]) -> None:
        """Map one page of `group` into every buffer at the slot's next group index. On a backend error, the
        buffers mapped so far are unmapped and the group goes back to the pool before the error propagates."""
        pages = self._slot_pages[slot]
        offset = len(pages) // self.num_buffers * self.page_size
        region = slot * self.slot_bytes + offset
        size = self.page_size
        emit = self.recorder.emit
        backend = self.backend
        mapped = recorded = 0  # buffers mapped / buffers whose PAGE_MAP + PAGE_ACCESS are in the trace
        try:
            for b, pid in enumerate(group):
                va = self._bases[b] + region
                t0 = perf_counter_ns()
                backend.map(va, size, self._handles[pid])
                t1 = perf_counter_ns()
                mapped += 1
                backend.set_access(va, size)
                t2 = perf_counter_ns()
                emit(Kind.PAGE_MAP, seq=seq, block=pid, aux=slot, addr=offset, n=b, dur_ns=t1 - t0)
                emit(Kind.PAGE_ACCESS, seq=seq, block=pid, aux=slot, addr=offset, n=b, dur_ns=t2 - t1)
                recorded += 1
        except BaseException:
            for b in range(mapped - 1, -1, -1):
                self._unmap_page(slot, seq, b, offset, group[b], emit_event=b < recorded)
            self._pool.extend(reversed(group))
            raise
        pages.extend(group)

    def _unmap_page(self, slot: int, seq: int, b: int, offset: int, pid: int, *, emit_event: bool) -> None:
        va = self._bases[b] + slot * self.slot_bytes + offset
        t0 = perf_counter_ns()
        self.backend.unmap(va, self.page_size)
        dur = perf_counter_ns() - t0
        if emit_event:
            self.recorder.emit(Kind.PAGE_UNMAP, seq=seq, block=pid, aux=slot, addr=offset, n=b, dur_ns=dur)

    def _unmap_tail_group(self, slot: int, seq: int) -> None:
        """Unmap the slot's last group (every buffer) and put its pages back in the pool."""
        pages = self._slot_pages[slot]
        nbuf = self.num_buffers
        start = len(pages) - nbuf
        offset = start // nbuf * self.page_size
        group = pages[start:]
        for b in range(nbuf - 1, -1, -1):
            self._unmap_page(slot, seq, b, offset, group[b], emit_event=True)
        del pages[start:]
        self._pool.extend(reversed(group))
