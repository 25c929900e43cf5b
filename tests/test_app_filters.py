"""The events page's store-read filter (kvscope.app.filters.filter_trace) against the DataFrame one."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from kvscope.app.filters import filter_events, filter_trace

from kvscope.trace import load_trace

SAMPLES = Path(__file__).resolve().parent.parent / "sample_runs"


@pytest.mark.parametrize("name", ["paged.kvtrace", "vmm.kvtrace", "static.kvtrace"])
def test_filter_trace_matches_filter_events(name):
    trace = load_trace(SAMPLES / name)
    events = trace.events
    seqs = sorted(set(events["seq"].head(2000).tolist()))[:5]
    steps = (int(events["step"].max()) // 4, int(events["step"].max()) // 2)
    for kinds, seq, window in [
        (None, None, None),
        (["append"], None, None),
        (None, seqs, None),
        (None, None, steps),
        (["admit", "finish", "step"], seqs, steps),
        (["no_such_kind"], None, None),
    ]:
        want = filter_events(events, kinds=kinds, seqs=seq, steps=window).reset_index(drop=True)
        for limit in (None, 7, 5000):
            count, got = filter_trace(trace, kinds=kinds, seqs=seq, steps=window, limit=limit)
            assert count == len(want)
            pd.testing.assert_frame_equal(got, want if limit is None else want.head(limit))
