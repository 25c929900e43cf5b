"""Property tests: random admit / append / fork / free (and, for VMM, ensure_room and injected driver failures:
map, set access and unmap, the last tearing page-groups apart) against a model of the token counts. After every
step: the allocator's own invariants, Usage.check(), live rows never overlap, the books equal what the backend holds
(backend_books() == backend.state()) and what the trace replays to (analysis PageReplay); at the end everything is
released (VMM: after close(), no page, mapping or reservation left in the backend).

VMM page sharing (issue 11): forks during decode map shared pages, appends copy shared partly filled pages first,
prompts (all zeros here) share full page-groups with prefix sharing, and an `execute` rule drains the pending copies
as the executor does, after checking that every copy reads and writes mapped rows. Then also: each page's mapping
count equals the backend's, no page in the pool is mapped anywhere, no idle slot maps a page a live slot holds, and
used bytes are the distinct pages' tokens (<= logical)."""

from __future__ import annotations

from collections import Counter

import numpy as np
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from test_vmm_faults import ReplayCheck, mapped_places  # tests/ is on sys.path (rootdir conftest)

from kvscope.alloc.base import Copy, KVOutOfMemory
from kvscope.alloc.static import VARIANTS, StaticAllocator
from kvscope.alloc.vmm import VMMAllocator
from kvscope.backends.base import BackendError
from kvscope.backends.sim import SimMemory
from kvscope.events import Kind
from kvscope.recorder import Recorder
from kvscope.spec import get_spec

SPEC = get_spec("tiny")
BPT = SPEC.bytes_per_token
WARMUP = st.lists(st.tuples(st.integers(0, 24), st.integers(0, 100)), max_size=6)
PAGE = 1024  # tiny: 8 tokens a page per layer buffer, 2 in the megacache: growth (and a dry pool) comes often


def toks(n: int) -> np.ndarray:
    return np.zeros(n, dtype=np.int64)


class _Machine(RuleBasedStateMachine):
    """Shared rules; subclasses build `self.alloc` in an @initialize rule."""

    alloc: StaticAllocator | VMMAllocator

    def _setup(self, alloc, warmup: list[tuple[int, int]]) -> None:
        """Start busy: admit the warm-up requests (prompt, tokens to generate), then free every other one, so that
        runs begin with holes in the arena / idle slots holding pages."""
        self.alloc = alloc
        self.tokens: dict[int, int] = {}  # the model: seq -> tokens held
        self.next_seq = 0
        max_len = alloc.max_len
        for prompt, extra in warmup:
            prompt = min(prompt, max_len)
            self._admit(prompt, min(max(prompt, 1) + extra, max_len))
        for seq in sorted(self.tokens)[::2]:
            self.alloc.free(seq)
            del self.tokens[seq]

    def _new_seq(self) -> int:
        self.next_seq += 1
        return self.next_seq

    def _expect_oom_unchanged(self, call, strict: bool) -> bool:
        """Run `call`; on KVOutOfMemory check that nothing changed (strict) or that nothing but idle pages moved
        to the pool (an injected driver failure, which may also raise the backend's own error), and return False."""
        before = self.alloc.usage()
        held_before = before.reserved - self._unfinished_bytes()
        copies = len(self.alloc.pending_copies)
        try:
            call()
        except (KVOutOfMemory, BackendError) as e:
            assert strict is False or isinstance(e, KVOutOfMemory), f"a backend error without a fault: {e!r}"
            after = self.alloc.usage()
            if strict:
                assert after == before
            else:
                # Teardowns a second failure cut short (strays) stay held; nothing else may be taken.
                assert after.used == before.used and after.reserved - self._unfinished_bytes() <= held_before
            assert len(self.alloc.pending_copies) == copies
            return False
        return True

    def _strict(self) -> bool:
        """Whether can_admit / can_append must predict the outcome exactly."""
        return True

    def _unfinished_bytes(self) -> int:
        """Bytes held by teardowns a driver failure cut short (VMM strays)."""
        return 0

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), n=st.integers(1, 40))
    def append(self, data, n):
        seq = data.draw(st.sampled_from(sorted(self.tokens)))
        can, strict = self.alloc.can_append(seq, n), self._strict()
        ok = self._expect_oom_unchanged(lambda: self.alloc.append(seq, toks(n)), strict)
        if strict:
            assert ok == can
        if ok:
            self.tokens[seq] += n
        assert self.alloc.num_tokens(seq) == self.tokens[seq]

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def append_all_that_fits(self, data):
        """Grow one sequence as far as memory and max_len allow: drives the pool dry, so that idle slots must give
        up pages and later requests hit out-of-memory."""
        seq = data.draw(st.sampled_from(sorted(self.tokens)))
        n = self.alloc.max_len - self.tokens[seq]
        while n > 0 and not self.alloc.can_append(seq, n):
            n -= 1
        if n > 0 and self._expect_oom_unchanged(lambda: self.alloc.append(seq, toks(n)), self._strict()):
            self.tokens[seq] += n

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(sorted(self.tokens)))
        child = self._new_seq()
        forks_before = self._forks_recorded()
        copies = len(self.alloc.pending_copies)
        if self._expect_oom_unchanged(lambda: self.alloc.fork(parent, child), self._strict()):
            self.tokens[child] = self.tokens[parent]
            if getattr(self.alloc, "page_sharing", False):
                assert len(self.alloc.pending_copies) == copies, "a sharing fork copies nothing"
            else:
                copy = self.alloc.pending_copies[-1]
                assert copy == Copy(
                    "rows", self.alloc.token_base(parent), self.alloc.token_base(child), self.tokens[parent]
                )
        else:
            assert child not in self.alloc.live_sequences()
        assert self._forks_recorded() == forks_before == 0, "the engine owns FORK, never the allocator"

    def _forks_recorded(self) -> int:
        kinds = self.alloc.recorder.to_table().column("kind").to_pylist()
        return kinds.count(Kind.FORK.name.lower())

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def free(self, data):
        seq = data.draw(st.sampled_from(sorted(self.tokens)))
        del self.tokens[seq]  # free always frees; without deferred reclamation a failed unmap is raised after
        strict = self._strict()
        try:
            self.alloc.free(seq)
        except BackendError:
            assert not strict, "free raised without an injected fault"

    @rule(data=st.data())
    def admit(self, data):
        max_len = self.alloc.max_len
        prompt = data.draw(st.integers(0, min(max_len, 24)), label="prompt")
        self._admit(prompt, data.draw(st.integers(max(prompt, 1), max_len), label="final_len"))

    def _admit(self, prompt: int, final: int) -> None:
        seq = self._new_seq()
        can, strict = self.alloc.can_admit(prompt, final), self._strict()
        hits: list[int] = []
        ok = self._expect_oom_unchanged(lambda: hits.append(self.alloc.admit(seq, toks(prompt), final)), strict)
        if strict:
            # can_admit cannot know prefix hits (it gets no tokens): it may only say no where sharing says yes.
            assert ok == can or (ok and getattr(self.alloc, "prefix_sharing", False))
        if not ok:
            assert seq not in self.alloc.live_sequences()
            return
        hit = hits[0]
        assert 0 <= hit < max(prompt, 1) or hit == 0, f"prefix hit {hit} of a {prompt}-token prompt"
        self.tokens[seq] = hit
        # The prefill: admit took room for the prompt, so this never runs out of memory (mapping ahead is best
        # effort); an injected non-memory failure of a map ahead is still raised.
        if prompt - hit:
            ok = self._expect_oom_unchanged(lambda: self.alloc.append(seq, toks(prompt - hit)), strict)
            assert ok or not strict, "the prefill failed without an injected fault"
            if ok:
                self.tokens[seq] = prompt

    @rule(prompt=st.integers(0, 8), over=st.integers(1, 8), shorter=st.booleans())
    def admit_a_bad_final_length(self, prompt, over, shorter):
        final = prompt - over if shorter else self.alloc.max_len + over
        before = self.alloc.usage()
        try:
            self.alloc.admit(self._new_seq(), toks(prompt), final)
        except ValueError:
            assert self.alloc.usage() == before
            return
        raise AssertionError(f"admit(prompt={prompt}, final_len={final}) did not raise ValueError")

    @invariant()
    def books_balance(self):
        self.alloc.check_invariants()
        u = self.alloc.usage()
        u.check()
        assert u.logical == sum(self.tokens.values()) * BPT
        assert u.used == u.logical or getattr(self.alloc, "page_sharing", False)
        assert sorted(self.alloc.live_sequences()) == sorted(self.tokens)
        for seq, n in self.tokens.items():
            assert self.alloc.num_tokens(seq) == n

    @invariant()
    def live_rows_never_overlap(self):
        spans = sorted((self.alloc.token_base(s), self._rows_of(s)) for s in self.tokens)
        for (base, rows), (next_base, _) in zip(spans, spans[1:], strict=False):
            assert base + rows <= next_base, f"rows [{base}, {base + rows}) overlap the next at {next_base}"

    def _rows_of(self, seq: int) -> int:
        raise NotImplementedError


class StaticMachine(_Machine):
    @initialize(variant=st.sampled_from(VARIANTS), rows=st.integers(1, 200), max_len=st.integers(1, 80), warmup=WARMUP)
    def setup(self, variant, rows, max_len, warmup):
        self._setup(StaticAllocator(SPEC, rows * BPT, Recorder(), max_len=max_len, variant=variant), warmup)

    def _rows_of(self, seq: int) -> int:
        return self.alloc.reserved_rows(seq)

    def teardown(self):
        for seq in list(self.tokens):
            self.alloc.free(seq)
        u = self.alloc.usage()
        u.check()
        assert u.reserved == 0 and u.free == u.capacity
        assert self.alloc.largest_free_range() == self.alloc.num_rows


class VMMMachine(_Machine):
    @initialize(
        deferred=st.booleans(),
        eager=st.sampled_from([0, 1]),
        megacache=st.booleans(),
        groups=st.integers(1, 16),
        max_batch=st.integers(2, 5),
        max_len=st.integers(1, 100),
        warmup=WARMUP,
        sharing=st.sampled_from(["off", "fork", "prefix"]),
    )
    def setup(self, deferred, eager, megacache, groups, max_batch, max_len, warmup, sharing):
        self.backend = SimMemory(PAGE)
        nbuf = 1 if megacache else 2 * SPEC.num_layers
        alloc = VMMAllocator(
            SPEC, groups * nbuf * PAGE, Recorder(), backend=self.backend, max_batch=max_batch, max_len=max_len,
            page_size=PAGE, megacache=megacache, eager_pages=eager, deferred_reclaim=deferred,
            page_sharing=sharing != "off", prefix_sharing=sharing == "prefix",
        )  # fmt: skip
        self.replay = ReplayCheck(alloc)
        self._setup(alloc, warmup)

    def _strict(self) -> bool:
        # A hole a failed copy-on-write left is mended by the next operation on its sequence before anything else,
        # so that operation may change the books and still fail: exactness returns once no hole is left.
        return not self.backend.faults_pending and not self.alloc._holes

    def _unfinished_bytes(self) -> int:
        """Strays, and the fresh pages holes a failed copy-on-write left hold beside the shared page."""
        a = self.alloc
        on_slots = {p for pages in a._slot_pages for p in pages}  # a page a slot maps too is that slot's
        stray = {p for g in a._strays.values() for p in g.pages[: g.mapped]} - on_slots
        extra = sum(1 for h in a._holes.values() if h.current >= 0 and h.current != h.original)
        return (len(stray) + extra) * a.page_size

    def _rows_of(self, seq: int) -> int:
        return self.alloc.rows_per_slot

    @rule(op=st.sampled_from(["map", "set_access", "unmap"]), nth=st.integers(1, 6), oom=st.sampled_from([None, False]))
    def inject_fault(self, op, nth, oom):
        self.backend.inject_fault(op, nth, oom=oom)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), ahead=st.integers(0, 40))
    def ensure_room(self, data, ahead):
        seq = data.draw(st.sampled_from(sorted(self.tokens)))
        want = self.tokens[seq] + ahead
        if want > self.alloc.max_len:
            return
        strict = self._strict()
        if self._expect_oom_unchanged(lambda: self.alloc.ensure_room(seq, want), strict) and strict:
            # The room is there now (a copy-on-write the append will make may still need pages).
            assert self.alloc.can_append(seq, ahead) or self.alloc._cow_places(self.alloc._seqs[seq])

    @rule()
    def execute(self):
        """The executor drains the pending copies: each reads and writes rows mapped with access right now."""
        a = self.alloc
        states = {va: rw for va, _size, _h, rw in self.backend.state().mappings}
        for c in a.pending_copies:
            if c.n == 0:
                continue
            for row in (c.src, c.src + c.n - 1, c.dst, c.dst + c.n - 1):
                for buf in range(a.num_buffers):
                    va = a.buffer_addresses()[buf] + row * a.buffer_row_bytes
                    page_va = va - (va - a.buffer_addresses()[buf]) % a.page_size
                    assert states.get(page_va), f"copy {c} touches row {row} of buffer {buf}, not mapped with access"
        a.pending_copies.clear()

    @invariant()
    def backend_agrees(self):
        """Every page the allocator thinks mapped is mapped, exactly where it says (strays included: groups whose
        teardown an injected unmap failure cut short; holes a failed copy-on-write left); the backend has no
        others. Each page's mapping count is the backend's, and a page in the pool is mapped nowhere."""
        a = self.alloc
        for slot in range(a.max_batch):
            for i, pid in mapped_places(a, slot):
                group, buf = divmod(i, a.num_buffers)
                va = a.buffer_addresses()[buf] + slot * a.slot_bytes + group * a.page_size
                assert self.backend.mapped_handle(va) == a._handles[pid]
        assert a.backend_books() == self.backend.state()
        assert self.backend.live_handles == a.num_pages
        maps = Counter(h for _va, _size, h, _rw in self.backend.state().mappings)
        assert [maps[a._handles[p]] for p in range(a.num_pages)] == a.page_refs(), "mapping counts differ"
        assert not [p for p in a._pool if maps[a._handles[p]]], "a page in the pool is still mapped"

    @invariant()
    def trace_agrees(self):
        """The trace replays (analysis PageReplay) to the pages, places and slot owners the books have."""
        self.replay.check()

    def teardown(self):
        self.backend.clear_faults()
        for seq in list(self.tokens):
            self.alloc.free(seq)
        u = self.alloc.usage()
        u.check()
        assert u.used == 0 and u.reservation == 0 and u.internal == 0
        self.alloc.close()
        self.alloc.check_invariants()
        self.replay.check()
        assert (self.backend.live_handles, self.backend.live_mappings, self.backend.live_reservations) == (0, 0, 0)
        assert self.backend.calls["create"] == self.backend.calls["release"]


TestStaticAllocatorProperties = StaticMachine.TestCase
TestStaticAllocatorProperties.settings = settings(settings(), stateful_step_count=40)
TestVMMAllocatorProperties = VMMMachine.TestCase
TestVMMAllocatorProperties.settings = settings(settings(), stateful_step_count=40)
