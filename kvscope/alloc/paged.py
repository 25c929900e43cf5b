"""Paged KV allocator (vLLM PagedAttention): a pool of fixed-size blocks, per-sequence block tables, reference
counts, copy-on-write, prefix caching by chained block hashes, and swapping to a CPU block pool.

Block states (every block is in exactly one):
    free         ref 0, no hash: in `_free`
    active       ref > 0: held by one or more sequences' block tables
    cached-idle  ref 0, hashed: in `_idle` (LRU order), still findable by a prefix lookup until evicted

The books follow vLLM 0.33's v1 block pool (BlockPool with its FreeKVCacheBlockQueue). vLLM keeps one free queue
holding both kinds of ref-0 block: `_free` + `_idle` is that queue, split at the point where it always splits
(never-hashed blocks in front, cached ones behind them), so:
- allocation takes the queue's head: a free block while there is one, else the least recently used cached-idle block,
  which is evicted (BLOCK_EVICT, like BlockRemoved) and only it leaves the hash index;
- a release walks the block table tail first; its blocks that drop to ref 0 and carry a hash go to the LRU tail in
  that order (a freed chain's tail is evicted before its head); with prefix caching, its never-hashed ones go to the
  front, so they are handed out again last in, first out, as vLLM 0.33 does (without prefix caching kvscope keeps
  them first in, first out; only block ids depend on this, not counts or the eviction order);
- an append takes every new block it needs before it caches any of them (vLLM's allocate_slots, then
  cache_full_blocks), so an append's evictions come before its BLOCK_CACHE events.
vLLM reserves block 0 as a null block, so its pool of N usable blocks has num_gpu_blocks = N + 1 and its block ids
are ours + 1; we have no null block: all `num_blocks` blocks hold KV and count towards capacity.

Prefix caching: a block that becomes full gets the chained hash sha256(parent hash + its token ids as int64) and is
registered in `_cached` (hash -> blocks, in registration order). Like vLLM, two blocks may carry the same hash (the
same prompt running twice at once: the last prompt block is always computed, so the second copy registers its own
block). A lookup returns the first block registered under the hash, reviving it if it is cached-idle, even when
another block with that hash is active, as vLLM's get_cached_block does; `hit_prefers_active=True` (off by default,
a deliberate deviation from vLLM) shares an active holder instead, which keeps the idle copy evictable. A lookup stops
at the first miss and never covers the last prompt token. A full block is never written again, so its hash stays
valid. `reset_prefix_cache` mirrors vLLM's reset_prefix_cache (AllBlocksCleared): only with no active block, every
cached-idle block is evicted (one BLOCK_EVICT each, LRU first: kvscope has no all-cleared event) and becomes free.

Swapping: `swap_out` refuses sequences holding a shared block (ref > 1: forks or prefix hits). Moving a block that
others still read would need per-block CPU ref counts and re-sharing on the way back; the engine preempts such
sequences by recompute instead (`can_swap_out` says which way to go). Swapped sequences do not count in `logical`
(their tokens are not in GPU memory). vLLM v1 has no swapping (nor forks and copy-on-write); those paths keep the
rules above for the blocks they free and take.

Eviction policy (`eviction`, `--eviction`; off by default): a policy of kvscope.policies that needs nothing but the
order of releases and hits replaces the LRU order of `_idle` (kvscope.policies.engine.IdleQueue); only which
cached-idle block an allocation evicts changes. Without it the books above are vLLM's, block for block.

CPU tier (`cpu_cache_bytes`, `--cpu-cache`; Pensieve's second tier, off by default): a block evicted from the GPU
prefix cache is copied to a CPU block (BLOCK_OFFLOAD after its BLOCK_EVICT; the tier drops its least recently used
block when full, BLOCK_TIER_DROP) and a prefix lookup that misses on the GPU continues in the tier: a block found
there is copied back into a newly taken GPU block (BLOCK_ALLOC, BLOCK_CACHE, BLOCK_RELOAD) and counts as a hit. The
tier's CPU blocks come after the swap pool's in `num_cpu_blocks`, the CPU pool the executors' layouts allocate, and
its copies are queued as 'swap_out' / 'swap_in', so cpu and cuda runs move the real K/V; the sim clock charges PCIe
time for them (kvscope.engine.api.PCIeClock). Without a tier no code path changes.

Data movement is queued in `pending_copies` (Copy 'block' for copy-on-write, 'swap_out' GPU->CPU, 'swap_in'
CPU->GPU) and the executor must drain it, in order, before the next forward pass writes K/V: a block freed by a
swap-out may be handed to another sequence in the same step.
"""

# This module is longer than 400 lines: vLLM's block pool rules (lookup, revival, free queue, eviction order),
# copy-on-write, swapping, the CPU tier and the registry entry share one set of books, and every rule is next to
# the books it changes; the invariants at the end check them all together.

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvscope.alloc.base import Copy, HighWater, KVOutOfMemory, TokenIds, Usage
from kvscope.alloc.registry import AllocatorEntry, BuildContext, Option, register
from kvscope.events import Kind
from kvscope.policies.engine import IdleQueue, make_idle_queue
from kvscope.recorder import NullRecorder, Recorder
from kvscope.spec import KVSpec
from kvscope.units import check_host_memory, check_int, format_bytes

# Host memory one block's bookkeeping takes (its _Block, its place in the free queue), measured with tracemalloc at
# about 110 bytes, rounded up; a CPU swap block is one int in a list.
_BLOCK_BOOKKEEPING_BYTES = 128
_CPU_BLOCK_BOOKKEEPING_BYTES = 48

_ROOT_HASH = b""  # parent of a sequence's first block; real hashes are 32 bytes, so no chain can collide with it


class SwapRefused(KVOutOfMemory):
    """swap_out cannot move this sequence (it shares blocks, or the CPU pool is too small): preempt by recompute.
    A KVOutOfMemory, so a caller that falls back to recompute on any KVOutOfMemory handles it too."""


def block_hash(parent: bytes, token_ids) -> bytes:
    """Chained hash of one full block: sha256(parent hash + token ids as little-endian int64)."""
    data = token_ids.astype("<i8").tobytes() if isinstance(token_ids, np.ndarray) else array("q", token_ids).tobytes()
    return hashlib.sha256(parent + data).digest()


def hash_prefix(h: bytes) -> int:
    """The int64 a trace stores for a hash (BLOCK_CACHE / BLOCK_EVICT aux)."""
    return int.from_bytes(h[:8], "little", signed=True)


@dataclass(slots=True)
class _Block:
    id: int
    ref: int = 0
    fill: int = 0  # tokens written; a shared block has one fill, because writes to shared blocks copy first
    hash: bytes | None = None


@dataclass(slots=True)
class _Seq:
    table: list[int] = field(default_factory=list)  # GPU block ids; empty while swapped out
    tokens: int = 0
    hashes: list[bytes] = field(default_factory=list)  # chain hash of each full block (prefix caching only)
    partial: list[int] = field(default_factory=list)  # token ids in the unfilled last block (prefix caching only)
    cpu_table: list[int] | None = None  # CPU block ids while swapped out
    last: _Block | None = None  # the block of table[-1], None while the table is empty (append_decode reads it)


class PagedAllocator:
    """vLLM 0.33's v1 block pool as kvscope's books (the module docstring gives the rules it follows).

    Options: `block_size` (tokens per block), `enable_prefix_caching` (on by default in vLLM v1; off here unless
    asked for), `cpu_swap_bytes` (a CPU block pool for swap preemption, which vLLM v1 does not have), `eviction`
    (a prefix-cache eviction policy; None: vLLM's LRU), `cpu_cache_bytes` (the prefix cache's CPU tier).

    Deliberate deviations from vLLM:
    - no null block: ids start at 0 (vLLM's id = ours + 1) and all `num_blocks` blocks are usable, so a vLLM pool of
      N usable blocks (`num_gpu_blocks` = N + 1) is `num_blocks` = N here; always so, it changes block ids only;
    - `hit_prefers_active` (off by default): a prefix lookup of a hash that several blocks carry shares an active one
      when there is one (kvscope's rule before it followed vLLM) instead of the first one registered, so an idle
      duplicate is not revived while an active copy exists.
    """

    name = "paged"

    def __init__(
        self,
        spec: KVSpec,
        capacity_bytes: int,
        recorder: Recorder | None = None,
        *,
        block_size: int = 16,
        enable_prefix_caching: bool = False,
        cpu_swap_bytes: int = 0,
        hit_prefers_active: bool = False,
        eviction: str | None = None,
        cpu_cache_bytes: int = 0,
    ) -> None:
        capacity_bytes = check_int("paged allocator: capacity_bytes", capacity_bytes, 0)
        block_size = check_int("paged allocator: block_size", block_size, 1)
        cpu_swap_bytes = check_int("paged allocator: cpu_swap_bytes", cpu_swap_bytes, 0)
        cpu_cache_bytes = check_int("paged allocator: cpu_cache_bytes", cpu_cache_bytes, 0)
        for flag, given in (("--eviction", eviction is not None), ("--cpu-cache", cpu_cache_bytes > 0)):
            if given and not enable_prefix_caching:
                raise ValueError(f"{flag} needs --prefix-caching (without it no block stays cached)")
        self.spec = spec
        self.recorder = recorder if recorder is not None else NullRecorder()
        self.block_size = block_size
        self.prefix_caching = enable_prefix_caching
        self.hit_prefers_active = hit_prefers_active
        self.bytes_per_token = spec.bytes_per_token
        self.block_bytes = block_size * self.bytes_per_token
        self.num_blocks = capacity_bytes // self.block_bytes
        if self.num_blocks <= 0:
            raise ValueError(
                f"paged allocator: capacity {capacity_bytes} bytes is less than one block "
                f"({block_size} tokens x {self.bytes_per_token} bytes = {self.block_bytes} bytes)"
            )
        self.num_swap_blocks = cpu_swap_bytes // self.block_bytes
        self.num_tier_blocks = cpu_cache_bytes // self.block_bytes
        if cpu_cache_bytes and not self.num_tier_blocks:
            raise ValueError(
                f"--cpu-cache {format_bytes(cpu_cache_bytes)}: less than one block ({format_bytes(self.block_bytes)})"
            )
        # The CPU pool the layouts allocate (kvscope.engine.layout): the swap blocks, then the CPU tier's.
        self.num_cpu_blocks = self.num_swap_blocks + self.num_tier_blocks
        # Every block is a Python object in lists: refuse a pool whose books alone would not fit in RAM.
        check_host_memory(
            self.num_blocks * _BLOCK_BOOKKEEPING_BYTES + self.num_cpu_blocks * _CPU_BLOCK_BOOKKEEPING_BYTES,
            f"paged allocator: {self.num_blocks:,} blocks of {block_size} tokens ({format_bytes(capacity_bytes)}) and "
            f"{self.num_cpu_blocks:,} CPU blocks",
            "use a smaller --kv-memory (or --swap-space) or a larger --block-size",
        )
        self.pending_copies: list[Copy] = []

        self._blocks = [_Block(i) for i in range(self.num_blocks)]
        # vLLM's one free queue, split where it always splits: never-hashed blocks in front, cached-idle ones behind.
        self._free: deque[int] = deque(range(self.num_blocks))
        self._idle: OrderedDict[int, None] | IdleQueue = OrderedDict()  # cached-idle blocks, least recently used first
        self.eviction = eviction
        if eviction is not None:  # an eviction policy picks _take's victim (kvscope.policies.engine); None: vLLM's LRU
            self._idle = make_idle_queue(eviction, self.num_blocks, lambda b: self._blocks[b].hash)
        self._cached: dict[bytes, dict[int, None]] = {}  # hash -> blocks carrying it (active or idle), oldest first
        self._cpu_free: list[int] = list(range(self.num_swap_blocks - 1, -1, -1))  # stack: lowest id on top
        # The CPU tier (Pensieve's second tier; None without --cpu-cache): hash -> CPU block, least recently used
        # first. Blocks evicted from the GPU prefix cache are copied here; a lookup that misses on the GPU finds them
        # and copies them back. Exclusive: a block moves back, it is not kept in both (a hash sealed again on the GPU
        # while a copy sits here is the exception; offloading it later only refreshes the copy).
        self._tier: OrderedDict[bytes, int] | None = OrderedDict() if self.num_tier_blocks else None
        self._tier_free: list[int] = list(range(self.num_cpu_blocks - 1, self.num_swap_blocks - 1, -1))
        self.tier_in_bytes = 0  # bytes copied CPU tier -> GPU so far (the sim clock charges PCIe time for them)
        self.tier_out_bytes = 0  # bytes copied GPU -> CPU tier so far
        self._seqs: dict[int, _Seq] = {}
        # Prompt length at each sequence's first admission (prefix caching only). A recompute preemption re-admits
        # with prompt + generated tokens; hits on those generated tokens' cached blocks are shared like any other,
        # but PREFIX_HIT counts prompt tokens only (kvscope.events), so its n stops at the first prompt's length.
        self._first_prompt_len: dict[int, int] = {}
        # Running totals, so usage() is O(1).
        self._num_active = 0
        self._active_fill = 0  # tokens in active blocks, each block once
        self._logical = 0  # tokens of GPU-resident sequences
        self.high_water = HighWater()  # in-step peaks: noted after every state-changing operation

    # ---- queries -------------------------------------------------------------------------------------------------
    def config(self) -> dict:
        return {
            "addressing": "blocks",  # how analysis replays this trace (kvscope.analysis.replay)
            "label": f"paged b{self.block_size}",
            "block_size": self.block_size,
            "num_blocks": self.num_blocks,
            "prefix_caching": self.prefix_caching,
            "cpu_blocks": self.num_swap_blocks,
            "block_bytes": self.block_bytes,
        } | {  # default configs stay as they were
            k: v
            for k, v in (
                ("hit_prefers_active", self.hit_prefers_active or None),
                ("eviction", self.eviction),
                ("cpu_cache_blocks", self.num_tier_blocks or None),
            )
            if v is not None
        }

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take now: free ones plus evictable cached-idle ones."""
        return len(self._free) + len(self._idle)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def block_table(self, seq: int) -> list[int]:
        return list(self._resident(seq).table)

    def num_tokens(self, seq: int) -> int:
        return self._get(seq).tokens

    def is_swapped(self, seq: int) -> bool:
        return self._get(seq).cpu_table is not None

    def __contains__(self, seq: int) -> bool:
        return seq in self._seqs

    def ref_counts(self) -> list[int]:
        return [b.ref for b in self._blocks]

    def block_state(self, block: int) -> str:
        """'active', 'cached_idle' or 'free'."""
        b = self._blocks[block]
        if b.ref > 0:
            return "active"
        return "cached_idle" if b.hash is not None else "free"

    def usage(self) -> Usage:
        bb = self.block_bytes
        reserved = self._num_active * bb
        used = self._active_fill * self.bytes_per_token
        return Usage(
            capacity=self.num_blocks * bb,
            reserved=reserved,
            used=used,
            logical=self._logical * self.bytes_per_token,
            internal=reserved - used,
            reservation=0,
            mapped_idle=0,
            cached_idle=len(self._idle) * bb,
            free=len(self._free) * bb,
        )

    def _note(self) -> None:
        """Record the state after an operation in the high-water marks (O(1): the running totals)."""
        bb = self.block_bytes
        reserved = self._num_active * bb
        used = self._active_fill * self.bytes_per_token
        self.high_water.note(
            reserved, used, self._logical * self.bytes_per_token, reserved - used, 0, 0, len(self._idle) * bb
        )

    # ---- admission -----------------------------------------------------------------------------------------------
    def can_admit(self, prompt_len: int, final_len: int, prompt_tokens: np.ndarray | None = None) -> bool:
        """Room for the prompt now? Without `prompt_tokens` (or prefix caching): conservatively, as if nothing hit.
        With them, as vLLM's allocate_slots decides: the blocks beyond the cache hit, plus the hit blocks that are
        cached-idle (reviving one takes it out of the free queue), must not exceed what an allocation can take."""
        need = self.blocks_for(prompt_len)
        if prompt_tokens is not None and self.prefix_caching:
            hits = self._lookup(np.asarray(prompt_tokens))
            need += sum(self._blocks[b].ref == 0 for _, b in hits) - len(hits)
        return need <= self.num_free_blocks

    def admit(self, seq: int, prompt_tokens: np.ndarray, final_len: int) -> int:
        """Register `seq`; with prefix caching, share the longest run of cached full prompt blocks (never the whole
        prompt: the last prompt token is always computed) and return the tokens served from the cache (PREFIX_HIT
        counts only those within the prompt of the sequence's first admission: see `_first_prompt_len`)."""
        if seq in self._seqs:
            raise ValueError(f"paged allocator: seq {seq} is already admitted")
        s = _Seq()
        self._seqs[seq] = s
        if not self.prefix_caching:
            return 0
        hit = self._share_cached_prefix(seq, s, np.asarray(prompt_tokens))
        self._note()
        return hit

    def _share_cached_prefix(self, seq: int, s: _Seq, prompt: np.ndarray) -> int:
        if self._tier is None:
            for h, block in self._lookup(prompt):  # chain order, head first, as vLLM's touch
                self._share(seq, s, block)
                s.hashes.append(h)
        else:
            self._share_tiered(seq, s, prompt)
        hit = len(s.table) * self.block_size
        s.tokens = hit
        self._logical += hit
        prompt_hit = min(hit, self._first_prompt_len.setdefault(seq, len(prompt)))
        if prompt_hit:
            self.recorder.emit(Kind.PREFIX_HIT, seq=seq, n=prompt_hit)
        return hit

    def _share_tiered(self, seq: int, s: _Seq, prompt: np.ndarray) -> None:
        """The longest prefix cached on the GPU or in the CPU tier, block by block in chain order: a GPU block is
        shared, a CPU one copied back into a new block (which may evict, and offload, another: looked up again at
        each block, so a block that this moved to the CPU is found there). Stops at the first block in neither, and
        never covers the last prompt token."""
        bs = self.block_size
        tier = self._tier
        assert tier is not None
        parent = _ROOT_HASH
        for i in range((len(prompt) - 1) // bs):
            h = block_hash(parent, prompt[i * bs : (i + 1) * bs])
            block = self._cached_block(h)
            if block is not None:
                self._share(seq, s, block)
            elif h in tier:
                self._reload(seq, s, h)
            else:
                break
            s.hashes.append(h)
            parent = h

    def _reload(self, seq: int, s: _Seq, h: bytes) -> None:
        """A CPU-tier hit: a new GPU block, the copy back queued, the block cached under its hash again."""
        assert self._tier is not None
        cpu = self._tier.pop(h)  # its slot is reused only after the copy back is queued (copies run in order)
        block = self._alloc(seq, s)
        block.fill = self.block_size
        self._active_fill += self.block_size
        self.pending_copies.append(Copy("swap_in", cpu, block.id))
        self._tier_free.append(cpu)
        self.tier_in_bytes += self.block_bytes
        self._register(seq, block, h)
        self.recorder.emit(
            Kind.BLOCK_RELOAD, seq=seq, block=block.id, addr=cpu, bytes=self.block_bytes, aux=hash_prefix(h)
        )

    def _offload(self, block_id: int, h: bytes) -> None:
        """A block just evicted from the GPU prefix cache goes to the CPU tier, whose least recently used block is
        dropped when it is full (BLOCK_TIER_DROP). A hash already there is only refreshed: the copy is the same."""
        tier = self._tier
        assert tier is not None
        if h in tier:
            tier.move_to_end(h)
            return
        if not self._tier_free:
            old, slot = tier.popitem(last=False)
            self.recorder.emit(Kind.BLOCK_TIER_DROP, addr=slot, bytes=self.block_bytes, aux=hash_prefix(old))
            self._tier_free.append(slot)
        cpu = self._tier_free.pop()
        tier[h] = cpu
        self.pending_copies.append(Copy("swap_out", block_id, cpu))
        self.tier_out_bytes += self.block_bytes
        self.recorder.emit(Kind.BLOCK_OFFLOAD, block=block_id, addr=cpu, bytes=self.block_bytes, aux=hash_prefix(h))

    # ---- growth --------------------------------------------------------------------------------------------------
    def _blocks_needed(self, s: _Seq, n: int) -> tuple[int, bool]:
        """(blocks to take, whether the last block must be copied first) to append n tokens to s."""
        room = len(s.table) * self.block_size - s.tokens
        cow = room > 0 and n > 0 and self._blocks[s.table[-1]].ref > 1
        need = -(-(n - room) // self.block_size) if n > room else 0
        return need + cow, cow

    def can_append(self, seq: int, n: int = 1) -> bool:
        return self._blocks_needed(self._resident(seq), n)[0] <= self.num_free_blocks

    def append(self, seq: int, tokens: np.ndarray) -> None:
        s = self._resident(seq)
        n = len(tokens)
        if n == 0:
            return
        need, cow = self._blocks_needed(s, n)
        if need > self.num_free_blocks:
            self.recorder.emit(Kind.OOM, seq=seq, n=n, bytes=need * self.block_bytes)
            raise KVOutOfMemory(
                f"paged allocator: seq {seq} needs {need} blocks for {n} tokens, "
                f"{len(self._free)} free + {len(self._idle)} cached-idle"
            )
        if cow:
            self._copy_on_write(seq, s)
        # Every new block first (evicting as needed), then the writes that fill and cache them: vLLM's allocate_slots
        # takes all of a request's new blocks before cache_full_blocks registers any.
        self._alloc_many(seq, s, need - cow)
        bs = self.block_size
        table = s.table
        ids = np.asarray(tokens).tolist() if self.prefix_caching else None
        pos = 0
        while pos < n:
            block = self._blocks[table[(s.tokens + pos) // bs]]
            k = min(bs - block.fill, n - pos)
            block.fill += k
            if ids is not None:
                s.partial.extend(ids[pos : pos + k])
                if block.fill == bs:
                    self._seal(seq, s, block)
            pos += k
        self._active_fill += n
        s.tokens += n
        self._logical += n
        self.recorder.emit(Kind.APPEND, seq=seq, n=n, aux=s.tokens)
        self._note()

    def append_decode(self, seqs: list[int], tokens: TokenIds) -> int:
        """`append(seq, token)` for each sequence in order (one token each: a decode step), leaving the same books
        and the same events in the same order; stops at the first one that does not fit (its OOM recorded, as
        append records it) and returns how many were appended. `tokens[i]` is read only when needed (prefix caching
        hashes token ids; an append of the general path).

        Most decode appends only add a token to a last block the sequence alone holds and that does not fill up:
        those touch two counters, and their APPEND rows are gathered and recorded together (`emit_appends`). Any
        other append (a new block, copy-on-write, a block that fills and gets hashed) goes through `append`, after
        the gathered rows, so the trace's order is append's. The high-water marks are noted before each of those
        and at the end: between two notes only used and logical rise and waste falls, so no peak is missed."""
        k = len(seqs)
        if k != len(tokens):
            raise ValueError(f"append_decode: {k} sequences but {len(tokens)} tokens")
        blocks = self._blocks
        states = self._seqs
        free = self._free
        caching = self.prefix_caching
        bs = self.block_size
        # A fast append needs room in an exclusively held last block (fill < block_size: for a block of ref 1 that
        # is tokens < blocks * block_size) that, with prefix caching, it does not fill up (fill < block_size - 1).
        limit = bs - 1 if caching else bs
        # A full last block (shared or not) takes a new block from the free queue as append would (no eviction, no
        # copy: the queue's head is a free block), unless with prefix caching that one token fills it too.
        crossing = not caching or bs > 1
        partials: list[list[int]] = []  # prefix caching: the partial-block lists of this run, in order
        held: list[int] = []  # APPEND aux (tokens held after) of the gathered appends
        allocs: list[int] = []  # BLOCK_ALLOC rows of the gathered appends: (index in the run, block, addr, bytes)
        waste = -1  # the most reserved - used reached right after a gathered new block (waste peaks there)
        first = 0  # seqs[first:done] are gathered and not recorded yet
        for done, seq in enumerate(seqs):
            # unknown, or holding no block (swapped out, or nothing yet): append takes it (and says why not)
            try:
                s = states[seq]
            except KeyError:
                last = None
            else:
                last = s.last
            if last is not None:
                fill = last.fill
                if fill >= limit or last.ref != 1:  # no room of its own in its last block
                    if fill == bs and crossing and free:  # full: the token goes to a new block, fill 0 so far
                        block = blocks[free.popleft()]
                        block.ref = 1
                        table = s.table
                        table.append(block.id)
                        s.last = last = block
                        fill = 0
                        self._num_active += 1
                        allocs += (done - first, block.id, len(table) - 1, self.block_bytes)
                        # the state right after this append: its waste is a candidate peak (appends without a new
                        # block only lower it, so the end of the run holds every other peak)
                        used = (self._active_fill + len(held) + 1) * self.bytes_per_token
                        w = self._num_active * self.block_bytes - used
                        if w > waste:
                            waste = w
                    else:
                        last = None  # the general path below
            if last is not None:
                last.fill = fill + 1
                t = s.tokens + 1
                s.tokens = t
                held.append(t)
                if caching:
                    partials.append(s.partial)
                continue
            if held:
                self._record_gathered(seqs[first:done], held, allocs, partials, tokens, first, waste)
                held, allocs, partials, waste = [], [], [], -1
            try:
                self.append(seq, tokens[done])
            except KVOutOfMemory:
                return done
            first = done + 1
        if held:
            self._record_gathered(seqs[first:], held, allocs, partials, tokens, first, waste)
        return k

    def _record_gathered(
        self,
        seqs: list[int],
        held: list[int],
        allocs: list[int],
        partials: list[list[int]],
        tokens: TokenIds,
        at: int,
        waste: int,
    ) -> None:
        """The books, peaks and rows of gathered decode appends (append_decode): tokens[at + i] went to seqs[i];
        `waste`: the highest waste right after one of their new blocks (-1: none took one)."""
        grown = len(seqs)
        if partials:  # prefix caching: the token ids join their blocks' partial lists
            for i, partial in enumerate(partials):
                partial.append(int(tokens[at + i][0]))
        self._active_fill += grown
        self._logical += grown
        self.recorder.emit_appends(seqs, held, allocs)
        self._note()
        hw = self.high_water
        if waste > hw.waste:  # paged: internal waste is all of the waste (no reservation, no mapped-idle)
            hw.waste = waste
        if waste > hw.internal:
            hw.internal = waste

    def fork(self, parent: int, child: int) -> None:
        """Child starts with the parent's tokens, sharing every block (copy-on-write on the first divergent write)."""
        p = self._resident(parent)
        if child in self._seqs:
            raise ValueError(f"paged allocator: fork target seq {child} already exists")
        c = _Seq(tokens=p.tokens, hashes=list(p.hashes), partial=list(p.partial))
        self._seqs[child] = c
        for block in p.table:
            self._share(child, c, block)
        self._logical += c.tokens
        self._note()

    # ---- release -------------------------------------------------------------------------------------------------
    def free(self, seq: int) -> None:
        s = self._get(seq)
        if s.cpu_table is not None:
            self._cpu_free.extend(reversed(s.cpu_table))
        else:
            self._release_table(seq, s)
            self._logical -= s.tokens
        del self._seqs[seq]
        self._note()

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix, as vLLM's reset_prefix_cache (its AllBlocksCleared event): refused (False,
        nothing changed) while any block is active; else every cached-idle block is evicted, least recently used
        first (one BLOCK_EVICT each: there is no all-cleared event), and stays where it was in vLLM's free queue,
        i.e. joins the free blocks behind the ones already free. Swapped-out sequences keep their hashes and register
        them again on swap-in (vLLM has no swapping)."""
        if self._num_active:
            return False
        while self._idle:
            block = self._blocks[self._idle.popitem(last=False)[0]]
            self._evict(block)
            block.fill = 0
            self._free.append(block.id)
        while self._tier:  # the CPU tier is forgotten too (nothing is offloaded on a reset)
            old, slot = self._tier.popitem(last=False)
            self.recorder.emit(Kind.BLOCK_TIER_DROP, addr=slot, bytes=self.block_bytes, aux=hash_prefix(old))
            self._tier_free.append(slot)
        self._note()
        return True

    # ---- swapping ------------------------------------------------------------------------------------------------
    def can_swap_out(self, seq: int) -> bool:
        s = self._resident(seq)
        return len(s.table) <= len(self._cpu_free) and all(self._blocks[b].ref == 1 for b in s.table)

    def swap_out(self, seq: int) -> None:
        """Move the sequence's blocks to the CPU pool and free them on the GPU. Raises SwapRefused (nothing changed)
        when it shares a block or the CPU pool lacks room."""
        s = self._resident(seq)
        shared = [b for b in s.table if self._blocks[b].ref > 1]
        if shared:
            raise SwapRefused(f"paged allocator: seq {seq} shares blocks {shared[:4]}; preempt it by recompute")
        if len(s.table) > len(self._cpu_free):
            raise SwapRefused(
                f"paged allocator: seq {seq} needs {len(s.table)} CPU blocks, {len(self._cpu_free)} free in the "
                f"swap pool; preempt it by recompute"
            )
        cpu = [self._cpu_free.pop() for _ in s.table]
        self.pending_copies.extend(Copy("swap_out", g, c) for g, c in zip(s.table, cpu, strict=True))
        moved = len(cpu)
        self._release_table(seq, s)
        self._logical -= s.tokens
        s.cpu_table = cpu
        self.recorder.emit(Kind.SWAP_OUT, seq=seq, n=moved, bytes=moved * self.block_bytes)
        self._note()

    def can_swap_in(self, seq: int) -> bool:
        s = self._get(seq)
        return s.cpu_table is not None and len(s.cpu_table) <= self.num_free_blocks

    def swap_in(self, seq: int) -> None:
        s = self._get(seq)
        if s.cpu_table is None:
            raise ValueError(f"paged allocator: seq {seq} is not swapped out")
        need = len(s.cpu_table)
        if need > self.num_free_blocks:
            self.recorder.emit(Kind.OOM, seq=seq, n=s.tokens, bytes=need * self.block_bytes)
            raise KVOutOfMemory(
                f"paged allocator: swapping seq {seq} in needs {need} blocks, "
                f"{len(self._free)} free + {len(self._idle)} cached-idle"
            )
        bs = self.block_size
        for i, cpu_block in enumerate(s.cpu_table):
            block = self._alloc(seq, s)
            block.fill = min(bs, s.tokens - i * bs)
            self.pending_copies.append(Copy("swap_in", cpu_block, block.id))
            if i < len(s.hashes):  # a full block: make it findable again
                self._register(seq, block, s.hashes[i])
        self._active_fill += s.tokens
        self._logical += s.tokens
        self._cpu_free.extend(reversed(s.cpu_table))
        s.cpu_table = None
        self.recorder.emit(Kind.SWAP_IN, seq=seq, n=need, bytes=need * self.block_bytes)
        self._note()

    # ---- block moves (each emits its event) ----------------------------------------------------------------------
    def _take(self) -> _Block:
        """A block for a new allocation: the free queue's head, i.e. a free block while there is one, else the least
        recently used cached-idle one, evicted (vLLM's get_new_blocks with _maybe_evict_cached_block)."""
        if self._free:
            return self._blocks[self._free.popleft()]
        block = self._blocks[self._idle.popitem(last=False)[0]]
        h = block.hash
        self._evict(block)
        if self._tier is not None and h is not None:
            self._offload(block.id, h)
        return block

    def _evict(self, block: _Block) -> None:
        """Drop a block (already out of `_idle`) from the hash index: only it; other blocks with its hash stay."""
        h = block.hash
        assert h is not None, f"block {block.id}: evicting a block that carries no hash"
        holders = self._cached[h]
        del holders[block.id]
        if not holders:
            del self._cached[h]
        self.recorder.emit(Kind.BLOCK_EVICT, block=block.id, aux=hash_prefix(h))
        block.hash = None

    def _alloc(self, seq: int, s: _Seq) -> _Block:
        block = self._take()
        block.ref = 1
        block.fill = 0
        s.table.append(block.id)
        s.last = block
        self._num_active += 1
        self.recorder.emit(Kind.BLOCK_ALLOC, seq=seq, block=block.id, addr=len(s.table) - 1, bytes=self.block_bytes)
        return block

    def _alloc_many(self, seq: int, s: _Seq, count: int) -> None:
        """`_alloc` count times; from the free queue alone (no eviction between them), their BLOCK_ALLOCs are
        recorded in one emit_rows call."""
        rec = self.recorder
        if count < 2 or len(self._free) < count or type(rec).emit is not Recorder.emit:
            for _ in range(count):
                self._alloc(seq, s)
            return
        blocks, free, table = self._blocks, self._free, s.table
        rows: list[int] = []
        for _ in range(count):
            block = blocks[free.popleft()]
            block.ref = 1
            block.fill = 0
            table.append(block.id)
            # t_ns, step (the recorder's), kind, seq, block, n, bytes, addr, aux, dur_ns
            rows += (0, 0, Kind.BLOCK_ALLOC, seq, block.id, 0, self.block_bytes, len(table) - 1, -1, 0)
        s.last = block
        self._num_active += count
        rec.emit_rows(rows)

    def _share(self, seq: int, s: _Seq, block_id: int) -> None:
        block = self._blocks[block_id]
        if block.ref == 0:  # a cached-idle block becomes active again
            del self._idle[block_id]
            self._num_active += 1
            self._active_fill += block.fill
        block.ref += 1
        s.table.append(block_id)
        s.last = block
        self.recorder.emit(Kind.BLOCK_SHARE, seq=seq, block=block_id, addr=len(s.table) - 1, aux=block.ref)

    def _copy_on_write(self, seq: int, s: _Seq) -> None:
        old = self._blocks[s.table[-1]]
        new = self._take()
        new.ref = 1
        new.fill = old.fill
        s.table[-1] = new.id
        s.last = new
        self._num_active += 1
        self._active_fill += new.fill
        self.pending_copies.append(Copy("block", old.id, new.id))
        self.recorder.emit(
            Kind.BLOCK_COW, seq=seq, block=new.id, addr=len(s.table) - 1, bytes=self.block_bytes, aux=old.id
        )
        old.ref -= 1  # stays >= 1: it was shared
        self.recorder.emit(Kind.BLOCK_FREE, seq=seq, block=old.id, aux=old.ref)

    def _seal(self, seq: int, s: _Seq, block: _Block) -> None:
        """A block just became full: hash it into the sequence's chain and make it findable."""
        h = block_hash(s.hashes[-1] if s.hashes else _ROOT_HASH, s.partial)
        s.hashes.append(h)
        s.partial.clear()
        self._register(seq, block, h)

    def _register(self, seq: int, block: _Block, h: bytes) -> None:
        block.hash = h
        self._cached.setdefault(h, {})[block.id] = None
        self.recorder.emit(Kind.BLOCK_CACHE, seq=seq, block=block.id, aux=hash_prefix(h))

    def _release_table(self, seq: int, s: _Seq) -> None:
        # Tail first (vLLM frees a request's blocks in reverse), so that of this sequence's blocks the chain tail goes
        # to the LRU tail first and is the first to be evicted.
        fresh: list[int] = []  # never-hashed blocks let go, in release order
        rec = self.recorder
        rows: list[int] | None = [] if type(rec).emit is Recorder.emit else None  # BLOCK_FREEs in one emit_rows
        for block_id in reversed(s.table):
            block = self._blocks[block_id]
            block.ref -= 1
            if rows is not None:  # t_ns, step (the recorder's), kind, seq, block, n, bytes, addr, aux, dur_ns
                rows += (0, 0, Kind.BLOCK_FREE, seq, block_id, 0, 0, -1, block.ref, 0)
            else:
                rec.emit(Kind.BLOCK_FREE, seq=seq, block=block_id, aux=block.ref)
            if block.ref == 0:
                self._num_active -= 1
                self._active_fill -= block.fill
                if block.hash is not None:
                    self._idle[block_id] = None
                else:
                    block.fill = 0
                    fresh.append(block_id)
        if rows:
            rec.emit_rows(rows)
        self._return_fresh(fresh)
        s.table = []
        s.last = None

    def _return_fresh(self, fresh: list[int]) -> None:
        """Never-hashed blocks back to the free queue, taken before any cached-idle block either way. With prefix
        caching vLLM 0.33 puts them at the queue's front in release order, so the last freed are handed out first;
        without it, at the tail (first in, first out; only block ids differ)."""
        if self.prefix_caching:
            self._free.extendleft(reversed(fresh))
        else:
            self._free.extend(fresh)

    # ---- lookups -------------------------------------------------------------------------------------------------
    def _lookup(self, prompt: np.ndarray) -> list[tuple[bytes, int]]:
        """(hash, block) of the longest cached run of the prompt's full blocks, never covering the last prompt token
        (it is always computed); stops at the first miss, as vLLM's find_longest_cache_hit. Changes nothing."""
        bs = self.block_size
        found: list[tuple[bytes, int]] = []
        parent = _ROOT_HASH
        for i in range((len(prompt) - 1) // bs):
            h = block_hash(parent, prompt[i * bs : (i + 1) * bs])
            block = self._cached_block(h)
            if block is None:
                break
            found.append((h, block))
            parent = h
        return found

    def _cached_block(self, h: bytes) -> int | None:
        """The block a lookup of hash h returns: the first registered under it, active or cached-idle (vLLM's
        get_cached_block); with `hit_prefers_active`, an active holder when there is one."""
        holders = self._cached.get(h)
        if not holders:
            return None
        first = next(iter(holders))
        if self.hit_prefers_active:
            return next((b for b in holders if self._blocks[b].ref > 0), first)
        return first

    def _get(self, seq: int) -> _Seq:
        try:
            return self._seqs[seq]
        except KeyError:
            raise ValueError(f"paged allocator: unknown seq {seq}") from None

    def _resident(self, seq: int) -> _Seq:
        s = self._get(seq)
        if s.cpu_table is not None:
            raise ValueError(f"paged allocator: seq {seq} is swapped out; swap it in first")
        return s

    # ---- invariants (O(blocks + table entries); for tests and debug runs) ---------------------------------------
    def check_invariants(self) -> None:
        bs = self.block_size
        holders = [0] * self.num_blocks
        logical = 0
        cpu_held: list[int] = []
        for seq, s in self._seqs.items():
            if s.cpu_table is not None:
                assert not s.table, f"swapped seq {seq} still holds GPU blocks {s.table}"
                assert len(s.cpu_table) == self.blocks_for(s.tokens), f"seq {seq}: CPU table length wrong"
                cpu_held += s.cpu_table
                continue
            logical += s.tokens
            assert len(s.table) == self.blocks_for(s.tokens), (
                f"seq {seq}: {len(s.table)} blocks for {s.tokens} tokens (block size {bs})"
            )
            assert len(set(s.table)) == len(s.table), f"seq {seq} holds a block twice: {s.table}"
            assert s.last is (self._blocks[s.table[-1]] if s.table else None), f"seq {seq}: its last block is stale"
            for i, b in enumerate(s.table):
                holders[b] += 1
                expected_fill = min(bs, s.tokens - i * bs)
                assert self._blocks[b].fill == expected_fill, (
                    f"seq {seq} block {b} (index {i}): fill {self._blocks[b].fill}, expected {expected_fill}"
                )
            if s.tokens % bs:
                assert self._blocks[s.table[-1]].hash is None, f"seq {seq}: its partly filled block carries a hash"
            if self.prefix_caching:
                full = s.tokens // bs
                assert len(s.hashes) == full, f"seq {seq}: {len(s.hashes)} hashes for {full} full blocks"
                assert len(s.partial) == s.tokens - full * bs, f"seq {seq}: partial token ids out of step"
                for i in range(full):
                    assert self._blocks[s.table[i]].hash == s.hashes[i], f"seq {seq}: block {i} hash differs"
        for blk in self._blocks:
            assert blk.ref == holders[blk.id], f"block {blk.id}: ref {blk.ref} but {holders[blk.id]} entries hold it"
        free, idle = set(self._free), set(self._idle)
        assert len(free) == len(self._free), "a block is twice in the free queue"
        assert not free & idle, f"blocks both free and cached-idle: {sorted(free & idle)}"
        for blk in self._blocks:
            state = "active" if blk.ref else ("idle" if blk.id in idle else "free" if blk.id in free else "lost")
            assert state != "lost", f"block {blk.id} is in no state (ref 0, not free, not cached-idle)"
            assert not (blk.ref and (blk.id in idle or blk.id in free)), f"active block {blk.id} is also free"
            if blk.id in free:
                assert blk.hash is None and blk.fill == 0, f"free block {blk.id} carries a hash or tokens"
            if blk.id in idle:
                assert blk.hash is not None and blk.fill == bs, f"cached-idle block {blk.id} is not full and hashed"
        cached_blocks = {b for hs in self._cached.values() for b in hs}
        assert cached_blocks == {b.id for b in self._blocks if b.hash is not None}, "hash index out of step"
        for h, hs in self._cached.items():
            assert all(self._blocks[b].hash == h for b in hs), "hash index points at a block with another hash"
        active = [b for b in self._blocks if b.ref]
        assert self._num_active == len(active), "active block count out of step"
        assert self._active_fill == sum(b.fill for b in active), "active fill out of step"
        assert self._logical == logical, "logical token count out of step"
        assert len(cpu_held) == len(set(cpu_held)), "a CPU block is held twice"
        assert not set(cpu_held) & set(self._cpu_free), "a held CPU block is also free"
        assert len(cpu_held) + len(self._cpu_free) == self.num_swap_blocks, "CPU blocks lost"
        if self._tier is not None:
            slots = list(self._tier.values())
            assert len(set(slots)) == len(slots), "a CPU tier block holds two hashes"
            assert not set(slots) & set(self._tier_free), "a CPU tier block is both held and free"
            assert sorted(slots + self._tier_free) == list(range(self.num_swap_blocks, self.num_cpu_blocks)), (
                "CPU tier blocks lost"
            )
        self.usage().check()


# ---- registry entry ----------------------------------------------------------------------------------------------
DEFAULT_SWAP_SPACE = 4 << 30  # vLLM's default swap_space


def swap_bytes(options: Mapping[str, Any], capacity_bytes: int) -> int:
    """The CPU swap pool: --swap-space, else vLLM's 4 GiB default capped at the KV memory; 0 unless preempting by
    swap."""
    if options.get("preemption") != "swap":
        return 0
    given = options.get("swap_space")
    return given if given is not None else min(DEFAULT_SWAP_SPACE, capacity_bytes)


def _build(context: BuildContext, options: Mapping[str, Any]) -> PagedAllocator:
    return PagedAllocator(
        context.spec,
        context.capacity_bytes,
        context.recorder,
        block_size=16 if options["block_size"] is None else options["block_size"],
        enable_prefix_caching=options["prefix_caching"],
        cpu_swap_bytes=swap_bytes(options, context.capacity_bytes),
        eviction=options.get("eviction"),
        cpu_cache_bytes=options.get("cpu_cache") or 0,
    )


ENTRY = register(
    AllocatorEntry(
        name="paged",
        description="vLLM's block pool: block tables, sharing, copy-on-write, prefix caching, swap or recompute",
        build=_build,
        addressing="blocks",
        options=(
            Option("block_size", "--block-size"),
            Option("prefix_caching", "--prefix-caching", False),
            Option("preemption", "--preemption swap", "recompute"),
            Option("swap_space", "--swap-space"),
            Option("eviction", "--eviction"),
            Option("cpu_cache", "--cpu-cache"),
        ),
        legacy_label=lambda config: f"paged b{config['block_size']}",
    )
)
