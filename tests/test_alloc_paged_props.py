"""Property tests for the paged allocator: a Hypothesis state machine drives random admit / append / fork / free /
swap / preempt sequences (token ids from a tiny alphabet so prefix hashes collide and cached blocks get reused) and,
after every step, checks the allocator against an independent model:

- the K/V content: a simulated GPU and CPU memory where the executor's copies (copy-on-write, swaps) are applied and
  each appended token is written through the block table; every sequence must read back exactly its own tokens
  (this catches a wrong share, a missed copy-on-write, a bad prefix hit or a lost swap);
- ref counts equal the number of block-table entries holding each block; block-table lengths = ceil(tokens / bs);
- Usage adds up, and matches the model's own used / logical counts;
- replaying the emitted block events reproduces the allocator's ref counts and block states, and every eviction
  takes the least recently idled cached block (a freed sequence's chain tail first) and only when no free block is left
  (a prefix-cache reset evicts every cached-idle block, least recently used first);
- a prefix hit shares, for each hash, the first block registered under it (as vLLM's lookup), idle or not;
- at the end, freeing everything releases every block (reserved == 0, all blocks free or cached-idle).
"""

from __future__ import annotations

import numpy as np
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kvscope.alloc.base import KVOutOfMemory
from kvscope.alloc.paged import PagedAllocator, SwapRefused
from kvscope.events import Kind
from kvscope.recorder import Recorder
from kvscope.spec import get_spec
from kvscope.trace import trace_from_recorder

SPEC = get_spec("tiny")
BPT = SPEC.bytes_per_token
ALPHABET = st.integers(0, 1)  # two token ids: hashes collide often


class TeeRecorder(Recorder):
    """An in-memory Recorder that also keeps (kind, seq, block, aux) tuples for cheap incremental replay."""

    def __init__(self) -> None:
        super().__init__(None)
        self.log: list[tuple[int, int, int, int]] = []

    def emit(self, kind, seq=-1, block=-1, n=0, bytes=0, addr=-1, aux=-1, dur_ns=0) -> None:  # noqa: A002
        super().emit(kind, seq, block, n, bytes, addr, aux, dur_ns)
        self.log.append((int(kind), seq, block, aux))


class EventReplay:
    """Block ref counts and hashed-ness rebuilt from events alone, as a trace reader would."""

    def __init__(self, num_blocks: int) -> None:
        self.ref = [0] * num_blocks
        self.hashed = [False] * num_blocks
        self.idle: dict[int, None] = {}  # cached-idle blocks in the order they went idle: the eviction order
        self.hash_of: dict[int, int] = {}  # hashed block -> its hash (aux)
        self.registered: dict[int, dict[int, None]] = {}  # hash -> blocks carrying it, in registration order
        self.pos = 0

    def feed(self, log: list[tuple[int, int, int, int]], reset: bool = False) -> None:
        """Replay the events not seen yet; `reset`: they come from reset_prefix_cache (evictions with free blocks)."""
        for kind, _seq, block, aux in log[self.pos :]:
            self.pos += 1  # before checking: after a failure, teardown must not replay the same event again
            if kind in (Kind.BLOCK_ALLOC, Kind.BLOCK_COW):
                assert self.ref[block] == 0 and not self.hashed[block], f"{Kind(kind).name} of a taken block {block}"
                self.ref[block] = 1
            elif kind == Kind.BLOCK_SHARE:
                assert aux == self.ref[block] + 1, f"BLOCK_SHARE aux {aux} after ref {self.ref[block]}"
                self.ref[block] = aux
                self.idle.pop(block, None)  # a prefix hit on a cached-idle block makes it active again
            elif kind == Kind.BLOCK_FREE:
                assert aux == self.ref[block] - 1 >= 0, f"BLOCK_FREE aux {aux} after ref {self.ref[block]}"
                self.ref[block] = aux
                if aux == 0 and self.hashed[block]:
                    self.idle[block] = None
            elif kind == Kind.BLOCK_CACHE:
                assert self.ref[block] > 0, "a block is cached while nobody holds it"
                self.hashed[block] = True
                self.hash_of[block] = aux
                self.registered.setdefault(aux, {})[block] = None
            elif kind == Kind.BLOCK_EVICT:
                assert self.ref[block] == 0 and self.hashed[block], f"evicted block {block} was not cached-idle"
                assert reset or self.num_free() == 0, "evicted a cached block while free blocks were left"
                assert block == next(iter(self.idle)), f"evicted {block}, LRU is {next(iter(self.idle))}"
                del self.idle[block]
                self.hashed[block] = False
                holders = self.registered[self.hash_of.pop(block)]
                del holders[block]  # only this block: another one with the same hash stays findable

    def first_registered(self, block: int) -> int:
        """The block a lookup of `block`'s hash returns: the first one registered under it and not evicted since."""
        return next(iter(self.registered[self.hash_of[block]]))

    def num_free(self) -> int:
        return sum(r == 0 and not h for r, h in zip(self.ref, self.hashed, strict=True))

    def state(self, block: int) -> str:
        if self.ref[block]:
            return "active"
        return "cached_idle" if self.hashed[block] else "free"


class PagedMachine(RuleBasedStateMachine):
    prefix_caching = False

    @initialize(
        block_size=st.sampled_from([1, 2, 3, 4]),
        num_blocks=st.integers(3, 12),
        cpu_blocks=st.integers(0, 8),
        first_prompts=st.lists(st.lists(ALPHABET, min_size=1, max_size=12), min_size=1, max_size=3),
    )
    def setup(self, block_size: int, num_blocks: int, cpu_blocks: int, first_prompts: list[list[int]]) -> None:
        self.bs = block_size
        self.rec = TeeRecorder()
        self.alloc = PagedAllocator(
            SPEC,
            num_blocks * block_size * BPT,
            self.rec,
            block_size=block_size,
            enable_prefix_caching=self.prefix_caching,
            cpu_swap_bytes=cpu_blocks * block_size * BPT,
        )
        self.replay = EventReplay(num_blocks)
        self.tokens: dict[int, list[int]] = {}  # the model: each live sequence's token ids
        self.swapped: set[int] = set()
        self.gpu: dict[int, list[int | None]] = {}  # simulated K/V content per GPU block
        self.cpu: dict[int, list[int | None]] = {}
        self.next_seq = 0
        for prompt in first_prompts:  # runs start with requests in flight (a run of zero steps tests nothing)
            self.admit(prompt)

    # ---- the executor's side: apply queued copies, then write the new tokens through the block table ----------
    def drain_copies(self) -> None:
        memories = {"block": (self.gpu, self.gpu), "swap_out": (self.gpu, self.cpu), "swap_in": (self.cpu, self.gpu)}
        for c in self.alloc.pending_copies:
            src, dst = memories[c.kind]
            dst[c.dst] = list(src[c.src])
        self.alloc.pending_copies.clear()

    def write(self, seq: int, first: int, ids: list[int]) -> None:
        table = self.alloc.block_table(seq)
        for i, tok in enumerate(ids, start=first):
            block = self.gpu.setdefault(table[i // self.bs], [None] * self.bs)
            block[i % self.bs] = tok

    def grow(self, seq: int, ids: list[int]) -> bool:
        """append as the engine does; on OOM check atomicity and report False."""
        before = (self.alloc.usage(), self.alloc.block_table(seq), self.alloc.ref_counts(), len(self.rec.log))
        try:
            self.alloc.append(seq, np.array(ids, dtype=np.int64))
        except KVOutOfMemory:
            after = (self.alloc.usage(), self.alloc.block_table(seq), self.alloc.ref_counts())
            assert after == before[:3], "a failed append changed the allocator"
            assert [k for k, *_ in self.rec.log[before[3] :]] == [Kind.OOM], "a failed append must emit exactly one OOM"
            return False
        self.drain_copies()
        self.write(seq, len(self.tokens[seq]), ids)
        self.tokens[seq] += ids
        return True

    def resident(self) -> list[int]:
        return sorted(s for s in self.tokens if s not in self.swapped)

    # ---- rules -------------------------------------------------------------------------------------------------
    @rule(prompt=st.lists(ALPHABET, min_size=1, max_size=12))
    def admit(self, prompt: list[int]) -> None:
        prompt = prompt[: max(1, self.alloc.num_blocks * self.bs // 2)]  # small pools: keep prompts admissible
        if not self.alloc.can_admit(len(prompt), len(prompt) + 4):
            return
        seq = self.next_seq
        self.next_seq += 1
        self.replay.feed(self.rec.log)  # the hash index as it stands at the lookup
        hit = self.alloc.admit(seq, np.array(prompt), len(prompt) + 4)
        assert hit % self.bs == 0 and 0 <= hit <= (len(prompt) - 1) // self.bs * self.bs
        assert hit == 0 or self.prefix_caching
        hits = self.alloc.block_table(seq)
        assert hits == [self.replay.first_registered(b) for b in hits], "a hit is not the first-registered block"
        self.tokens[seq] = prompt[:hit]
        assert self.alloc.num_tokens(seq) == hit
        if not self.grow(seq, prompt[hit:]):
            self.preempt_seq(seq)  # the engine gives up on a prefill that does not fit

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), suffix=st.lists(ALPHABET, max_size=4))
    def admit_shared_prefix(self, data, suffix: list[int]) -> None:
        """A request that starts like a live one (a shared system prompt, a follow-up turn)."""
        ids = self.tokens[data.draw(st.sampled_from(sorted(self.tokens)))]
        cut = data.draw(st.integers(0, len(ids)))
        if ids[:cut] + suffix:
            self.admit(ids[:cut] + suffix)

    @precondition(lambda self: self.resident())
    @rule(data=st.data(), ids=st.lists(ALPHABET, min_size=1, max_size=6))
    def append(self, data, ids: list[int]) -> None:
        seq = data.draw(st.sampled_from(self.resident()))
        fits = self.alloc.can_append(seq, len(ids))
        assert self.grow(seq, ids) == fits, "can_append disagrees with append"

    @precondition(lambda self: self.resident())
    @rule(data=st.data())
    def fork(self, data) -> None:
        parent = data.draw(st.sampled_from(self.resident()))
        child = self.next_seq
        self.next_seq += 1
        self.alloc.fork(parent, child)
        self.tokens[child] = list(self.tokens[parent])

    @precondition(lambda self: self.resident())
    @rule(data=st.data(), ids=st.lists(ALPHABET, min_size=1, max_size=3), parent_first=st.booleans())
    def fork_and_diverge(self, data, ids: list[int], parent_first: bool) -> None:
        """Parallel sampling: fork, then both write (the first writer into a shared partial block copies it)."""
        parent = data.draw(st.sampled_from(self.resident()))
        child = self.next_seq
        self.next_seq += 1
        self.alloc.fork(parent, child)
        self.tokens[child] = list(self.tokens[parent])
        for seq in (parent, child) if parent_first else (child, parent):
            self.grow(seq, ids)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def preempt_or_finish(self, data) -> None:
        self.preempt_seq(data.draw(st.sampled_from(sorted(self.tokens))))

    def released_tail_first(self, table: list[int], since: int) -> None:
        freed = [b for k, _, b, _ in self.rec.log[since:] if k == Kind.BLOCK_FREE]
        assert freed == table[::-1], f"blocks {table} released in order {freed}, not chain tail first"

    def preempt_seq(self, seq: int) -> None:
        table = [] if seq in self.swapped else self.alloc.block_table(seq)
        since = len(self.rec.log)
        self.alloc.free(seq)
        self.released_tail_first(table, since)
        del self.tokens[seq]
        self.swapped.discard(seq)

    @rule()
    def reset_prefix_cache(self) -> None:
        """vLLM's reset_prefix_cache: refused while a block is active, else every cached-idle block becomes free."""
        self.replay.feed(self.rec.log)
        active = any(self.alloc.block_state(b) == "active" for b in range(self.alloc.num_blocks))
        before = (self.alloc.usage(), len(self.rec.log))
        assert self.alloc.reset_prefix_cache() == (not active)
        if active:
            assert (self.alloc.usage(), len(self.rec.log)) == before, "a refused reset changed something"
            return
        if before[0].cached_idle:
            event("reset evicted cached blocks")
        self.replay.feed(self.rec.log, reset=True)
        assert not self.replay.idle and self.alloc.usage().cached_idle == 0
        assert [k for k, *_ in self.rec.log[before[1] :]] == [Kind.BLOCK_EVICT] * (
            before[0].cached_idle // self.alloc.block_bytes
        )

    @precondition(lambda self: self.resident())
    @rule(data=st.data())
    def swap_out(self, data) -> None:
        self.swap_out_seq(data.draw(st.sampled_from(self.resident())))

    def swap_out_seq(self, seq: int) -> None:
        table = self.alloc.block_table(seq)
        can = self.alloc.can_swap_out(seq)
        before = (self.alloc.usage(), self.alloc.ref_counts(), len(self.rec.log))
        try:
            self.alloc.swap_out(seq)
        except SwapRefused:
            assert not can
            assert (self.alloc.usage(), self.alloc.ref_counts(), len(self.rec.log)) == before
            return
        assert can
        self.released_tail_first(table, before[2])
        self.swapped.add(seq)
        self.drain_copies()

    @precondition(lambda self: self.swapped)
    @rule(data=st.data())
    def swap_in(self, data) -> None:
        self.try_swap_in(data.draw(st.sampled_from(sorted(self.swapped))))

    @precondition(lambda self: len(self.resident()) >= 2)
    @rule(data=st.data(), ids=st.lists(ALPHABET, min_size=1, max_size=6))
    def swap_round_trip(self, data, ids: list[int]) -> None:
        """Swap a sequence out, let another one grow into the freed blocks, swap the first back in."""
        seq, other = data.draw(st.permutations(self.resident()))[:2]
        self.swap_out_seq(seq)
        self.grow(other, ids)
        if seq in self.swapped:
            self.try_swap_in(seq)

    def try_swap_in(self, seq: int) -> None:
        can = self.alloc.can_swap_in(seq)
        try:
            self.alloc.swap_in(seq)
        except KVOutOfMemory:
            assert not can and self.alloc.is_swapped(seq)
            return
        assert can
        self.swapped.discard(seq)
        self.drain_copies()

    # ---- checks after every step ---------------------------------------------------------------------------------
    @invariant()
    def books_agree(self) -> None:
        if not hasattr(self, "alloc"):
            return
        self.books_ok = False  # teardown skips its checks after a failed one, so the first error is the one reported
        a = self.alloc
        a.check_invariants()
        holders = [0] * a.num_blocks
        used_blocks: set[int] = set()
        for seq in self.resident():
            table = a.block_table(seq)
            ids = self.tokens[seq]
            assert a.num_tokens(seq) == len(ids)
            assert len(table) == -(-len(ids) // self.bs), f"seq {seq}: table length vs tokens"
            for b in table:
                holders[b] += 1
            used_blocks.update(table)
            stored = [tok for b in table for tok in self.gpu[b]][: len(ids)]
            assert stored == ids, f"seq {seq} reads back {stored}, holds {ids}"
        for seq in self.swapped:
            assert a.is_swapped(seq) and a.num_tokens(seq) == len(self.tokens[seq])
        assert a.ref_counts() == holders, "ref counts differ from block-table entries"
        u = a.usage()
        u.check()
        assert u.reserved == len(used_blocks) * a.block_bytes
        assert u.logical == sum(len(self.tokens[s]) for s in self.resident()) * BPT
        self.replay.feed(self.rec.log)
        assert self.replay.ref == a.ref_counts(), "replayed events disagree with the allocator's ref counts"
        assert [self.replay.state(b) for b in range(a.num_blocks)] == [a.block_state(b) for b in range(a.num_blocks)]
        assert u.cached_idle == sum(self.replay.state(b) == "cached_idle" for b in range(a.num_blocks)) * a.block_bytes
        self.books_ok = True

    def teardown(self) -> None:
        if not getattr(self, "books_ok", False):
            return
        for seq in sorted(self.tokens):
            self.alloc.free(seq)
        self.alloc.check_invariants()
        u = self.alloc.usage()
        assert (u.reserved, u.used, u.logical) == (0, 0, 0)
        assert u.cached_idle + u.free == u.capacity
        assert all(self.alloc.block_state(b) != "active" for b in range(self.alloc.num_blocks))
        if not self.prefix_caching:
            assert u.cached_idle == 0
        # The in-memory trace holds the same events the replay consumed.
        self.replay.feed(self.rec.log)
        assert self.replay.ref == [0] * self.alloc.num_blocks
        events = trace_from_recorder(self.rec).events
        for kind in ("block_cow", "block_evict", "prefix_hit", "swap_out", "swap_in", "oom", "append"):
            if (events["kind"] == kind).any():
                event(f"reached {kind}")  # shown by --hypothesis-show-statistics
        assert len(events) == len(self.rec.log)
        assert not (events["kind"] == "fork").any(), "the engine owns FORK, never the allocator"
        assert list(events["block"]) == [b for _, _, b, _ in self.rec.log]


class PagedPrefixMachine(PagedMachine):
    prefix_caching = True


# Profile settings from conftest; one bug at a time (teardown after a failed step can raise a second, derived error).
TestPaged = PagedMachine.TestCase
TestPaged.settings = settings(report_multiple_bugs=False)
TestPagedPrefixCaching = PagedPrefixMachine.TestCase
TestPagedPrefixCaching.settings = settings(report_multiple_bugs=False)
