"""The compact step plan (StepPlan.decodes + others, kvscope.engine.step): `work`, built on demand for the executors
that need token ids, is the batch one Work per sequence as the scheduler used to hand it over (batch order, each
decode's token its last generated one at its position), and its counters add up over it."""

from __future__ import annotations

import numpy as np
import pytest

from kvscope.engine.api import RunConfig, record_run
from kvscope.engine.executor import SimExecutor
from kvscope.engine.step import RUNNING, StepPlan
from kvscope.workload_gen import resolve_workload

CASES = [
    ("sharegpt", {"kv_memory": 2 << 20, "model": "tiny"}),  # OOMs and preemptions mid-batch
    ("sharegpt", {"kv_memory": 2 << 20, "model": "tiny", "chunked_prefill": True, "max_tokens_per_step": 96}),
    ("shared-prefix", {"prefix_caching": True, "kv_memory": 8 << 20, "model": "tiny"}),
    ("parallel", {"kv_memory": 2 << 20, "model": "tiny", "swap_space": 1 << 20, "preemption": "swap"}),
    ("beam", {"block_size": 4, "model": "tiny", "kv_memory": 1 << 20}),
]


@pytest.mark.parametrize(("workload", "cfg"), CASES)
def test_work_is_the_batch_in_order_with_each_decodes_last_token(
    monkeypatch: pytest.MonkeyPatch, workload: str, cfg: dict
) -> None:
    seen = {"plans": 0, "decodes": 0, "others": 0}
    running_of: list = []
    original = SimExecutor.execute

    def execute(self: SimExecutor, plan: StepPlan):  # runs after schedule(), before complete()
        work = plan.work
        assert len(work) == plan.batch_size == len(plan.decodes) + len(plan.others)
        assert plan.work is work  # built once
        assert sum(len(w.tokens) for w in work) == plan.tokens
        assert sum(w.start + len(w.tokens) for w in work) == plan.kv_tokens_read
        assert sum(len(w.tokens) for w in work if w.prefill) == plan.prefill_tokens
        # batch order: the order the sequences have in `running` (the plan takes them, then appends resumed and
        # admitted ones to it, in the order it adds them)
        running = running_of[0].running
        place = {id(s): k for k, s in enumerate(running)}
        assert all(id(w.seq) in place for w in work)
        assert [place[id(w.seq)] for w in work] == sorted(place[id(w.seq)] for w in work)
        decodes = {id(s) for s in plan.decodes}
        for w in work:
            s = w.seq
            assert s.status == RUNNING
            assert w.start + len(w.tokens) == s.held
            if id(s) in decodes:
                g = s.generated
                assert (w.start, w.prefill, w.samples) == (s.held - 1, False, True)
                assert np.array_equal(w.tokens, s.output_ids()[g - 1 : g]) and len(w.tokens) == 1
        assert [w.seq for w in work if id(w.seq) in decodes] == plan.decodes
        seen["plans"] += 1
        seen["decodes"] += len(plan.decodes)
        seen["others"] += len(plan.others)
        return original(self, plan)

    from kvscope.engine import engine as engine_module

    original_init = engine_module.Scheduler.__init__

    def init(self, *args, **kwargs) -> None:
        original_init(self, *args, **kwargs)
        running_of[:] = [self]

    monkeypatch.setattr(engine_module.Scheduler, "__init__", init)
    monkeypatch.setattr(SimExecutor, "execute", execute)
    reqs, desc = resolve_workload(workload, requests=40, seed=5)
    record_run(reqs, RunConfig(allocator="paged", device="sim", **cfg), workload=desc)
    assert seen["plans"] > 0 and seen["decodes"] > 0 and seen["others"] > 0


def test_an_empty_plan() -> None:
    plan = StepPlan()
    assert plan.work == [] and plan.batch_size == 0 and plan.sampled() == [] and plan.tokens == 0
