"""One dict of headline numbers per trace: what `kvscope summary`, the report header and compare_runs show.

Keys (all JSON-serializable: str, int, float, bool or None):

run         allocator, label, allocator_config, device, device_name, model, bytes_per_token, truncated, events
requests    requests (workload requests; forked samples are not requests), sequences (requests + forks), finished
            (requests whose every sample finished: n of them when the workload says n, and none rejected),
            finished_sequences, rejected (requests), unfinished (requests admitted but not finished), forks
tokens      generated_tokens (by semantics: see kvscope.analysis.requests.generated_tokens), prompt_tokens (prompt
            tokens of admitted requests, once each), prefill_tokens_computed / decode_tokens_computed (STEP_PREFILL
            / STEP_DECODE sums: recomputation after preemption included), recomputed_tokens (prefill tokens computed
            beyond each admitted prompt once less its first-admission prefix hits: the price of recompute preemption)
steps/time  steps, wall_time_s (host), run_time_s (the run's clock: simulated on sim runs), clock ('sim'|'host'),
            tokens_per_s (generated_tokens / run_time_s)
memory      capacity_bytes, peak_used_bytes, peak_reserved_bytes, peak_waste_bytes, peak_logical_bytes,
            peak_cached_idle_bytes: maxima over every instant of the run (in-step peaks: a request that finishes
            in a step counts in it; waste only while some sequence holds tokens); peaks ('at any instant', or 'at
            step ends (older trace)' for traces without in-step samples); peak_used_end_of_step_bytes and
            peak_reserved_end_of_step_bytes (maxima of the end-of-step samples alone); retained_end_bytes (bytes
            still reserved after the last step: VMM pages kept mapped by deferred reclamation, not waste);
            mean_waste_fraction (mean over steps that end with tokens held of waste / reserved);
            mean_used_fraction (mean used / capacity); peak_nvml_bytes, peak_torch_bytes (None without samples)
sharing     sharing_saved_bytes_peak (max over steps of logical - used), sharing_saving_mean (the PagedAttention
            paper's saving: 1 - units held with sharing / units the same sequences would hold without it, both summed
            over the run's steps; units are blocks, VMM page-groups or token rows; None when no step holds tokens:
            kvscope.analysis.sharing.sharing_savings), prefix_hit_tokens (prompt tokens served
            from the prefix cache at requests' first admissions: hits at re-admissions after a preemption and at
            late admissions of forked samples excluded),
            prefix_hit_rate (prefix_hit_tokens / prompt_tokens)
pressure    preemptions, preemptions_recompute, preemptions_swap, swapped_out_bytes, ooms, evictions
driver      driver_calls, driver_ms (timed VMM driver/OS calls)
tiers       cpu_tier_hit_tokens, cpu_tier_hit_blocks, cpu_tier_offloaded_blocks, cpu_tier_dropped_blocks, pcie_bytes
            (the prefix cache's CPU tier, --cpu-cache), miss_cold_tokens, miss_evicted_tokens, miss_gap_tokens,
            miss_floor_tokens (why first-admission prompt tokens missed: kvscope.analysis.prefix_misses; 0 without)
latency     ttft_p50_s, ttft_p90_s, ttft_p99_s, tpot_p50_s, tpot_p90_s, tpot_p99_s, queue_p50_s, queue_p90_s,
            queue_p99_s, latency_requests (kvscope.analysis.latency: the definitions and clocks)
batch       max_batch, mean_batch, batch_limited_by (memory, max-batch, token budget, arrivals), batch_limited_share,
            batch_waiting_share, batch_limit_steps_*, engine_max_batch, engine_max_tokens_per_step
            (kvscope.analysis.batch: the rule)
parallel    world_size (1 for a single-GPU run), rank, kv_duplication (ranks holding each token's K/V of a head),
            capacity_tokens (this trace's token slots), capacity_tokens_total (tokens of context the run's ranks
            hold together: the same tokens on every rank under TP, the sum over ranks under DCP; a single trace's
            own slots) (kvscope.analysis.ranks: the definitions)

An imported KV-event stream (vLLM's BlockStored / BlockRemoved, KV_BATCH rows) gets instead the run keys
allocator, label, allocator_config, truncated, events and kvscope.analysis.cache's
figures: source, messages, kv_events, blocks_stored, blocks_removed, cleared, cached_blocks_peak,
restored_after_eviction, ... (cache.cache_summary); the engine keys above are left out, not zero.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pandas as pd

from kvscope.analysis._events import (
    DRIVER_KINDS,
    cached,
    count,
    requests_meta,
    select,
    step_clock,
    step_cuts,
    values,
)
from kvscope.analysis.batch import batch_summary
from kvscope.analysis.cache import has_kv_events, kv_trace_summary
from kvscope.analysis.latency import latency_summary
from kvscope.analysis.memory import has_in_step_peaks, memory_timeline
from kvscope.analysis.prefix_misses import prefix_miss_summary
from kvscope.analysis.ranks import parallel_summary
from kvscope.analysis.requests import first_admission_hits, request_lifetimes
from kvscope.analysis.sharing import sharing_saving_mean
from kvscope.events import Kind


def summarize(trace) -> dict[str, Any]:
    """Headline numbers of one trace (see the module docstring for every key)."""
    # Latency and batch figures come from their own modules (kvscope.analysis.latency, .batch).
    return dict(cached(trace, "summary", lambda: _figures(trace)))


def _figures(trace) -> dict[str, Any]:
    if has_kv_events(trace):  # an imported KV-event stream: its own figures; the engine's do not apply to it
        return kv_trace_summary(trace) | parallel_summary(trace)
    return (
        _build(trace)
        | latency_summary(trace)
        | batch_summary(trace)
        | prefix_miss_summary(trace)
        | parallel_summary(trace)
    )


def last_step(trace) -> int:
    """The last engine step (steps - 1; 0 for a trace without steps): where unfinished requests' bars end."""
    return max(int(summarize(trace).get("steps") or 0) - 1, 0)


def event_counts(trace) -> pd.DataFrame:
    """One row per event kind that occurs in the trace, in the schema's kind order: kind (str), events (count)."""

    def build() -> pd.DataFrame:
        counts = [(name, n) for name, n in trace.kind_counts() if n > 0]  # the kind dictionary's order
        kinds = pd.Index([c[0] for c in counts], dtype=object).astype(str)
        return pd.DataFrame({"kind": kinds, "events": np.array([c[1] for c in counts], np.int64)})

    return cached(trace, "event_counts", build).copy()


def _build(trace) -> dict[str, Any]:
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvscope-summary") as pool:
        return _build_with(trace, pool)


def _build_with(trace, pool: ThreadPoolExecutor) -> dict[str, Any]:
    meta = trace.meta
    tl = memory_timeline(trace)
    step_cuts(trace)  # (what both threads below read: built once, here)
    # The sharing saving is one pass over every lifecycle event, mostly numpy that lets go of the GIL: it runs on
    # the other core while this thread reads the requests. Its result is the same as computed in line.
    sharing_mean = pool.submit(sharing_saving_mean, trace)
    lt = request_lifetimes(trace)
    clock = step_clock(trace)

    roots = lt[lt["parent"] < 0]
    n_meta = len(requests_meta(trace))
    arrived = int(select(trace, Kind.ARRIVE)["seq"].nunique())
    finished_roots = _finished_requests(lt, requests_meta(trace))
    admitted_roots = roots[roots["admit_step"] >= 0]

    steps = int(select(trace, Kind.STEP)["step"].nunique())
    if steps == 0:
        run_end = select(trace, Kind.RUN_END)
        steps = int(run_end["n"].iloc[-1]) if len(run_end) else len(clock)

    t_max = trace.store.max("t_ns")
    wall_time_s = float(t_max / 1e9) if t_max is not None else 0.0
    run_time_s = float(clock["t_s"].max()) if len(clock) else 0.0
    clock_kind = str(clock["clock"].iloc[0]) if len(clock) else "host"
    generated = int(lt["generated"].sum()) if len(lt) else 0

    prompt_tokens = int(admitted_roots.loc[admitted_roots["prompt_len"] > 0, "prompt_len"].sum())
    # Forked sequences share the request's prompt: only requests count.
    prefill = int(select(trace, Kind.STEP_PREFILL)["n"].sum())
    decode = int(select(trace, Kind.STEP_DECODE)["n"].sum())
    life = select(trace, Kind.PREFIX_HIT, Kind.PREEMPT, Kind.FORK)
    hits_first = first_admission_hits(life[life["seq"] >= 0])
    prefix_hit_tokens = int(hits_first.sum()) if len(hits_first) else 0

    preempt = select(trace, Kind.PREEMPT)
    reserved = tl["reserved"].to_numpy(dtype=np.float64)
    has_reserved = (reserved > 0) & (tl["used"].to_numpy() > 0)  # waste is measured while requests hold memory
    waste_frac = float(tl["waste_frac"].to_numpy()[has_reserved].mean()) if has_reserved.any() else 0.0
    capacity = int(tl["capacity"].max()) if len(tl) else 0

    def peak(col: str) -> int:
        return int(tl[col].max()) if len(tl) else 0

    def peak_sample(col: str) -> int | None:
        return int(tl[col].max()) if len(tl) and tl[col].notna().any() else None

    # What _figures adds next (cached on the trace), computed here while the sharing saving is still running on the
    # other core rather than after waiting for it: the same results, in less time.
    latency_summary(trace)
    batch_summary(trace)
    return {
        "allocator": str(meta.get("allocator", "unknown")),
        "label": trace.label,
        "allocator_config": dict(meta.get("allocator_config") or {}),
        "device": str(meta.get("device", "unknown")),
        "device_name": str(meta.get("device_name", "")),
        "model": str(meta.get("model") or (meta.get("spec") or {}).get("name", "unknown")),
        "bytes_per_token": int(trace.bytes_per_token),
        "truncated": bool(trace.truncated),
        "events": trace.num_events,
        "requests": n_meta or arrived,
        "sequences": len(lt),
        "finished": len(finished_roots),
        "finished_sequences": int((lt["status"] == "finished").sum()),
        "rejected": int((roots["status"] == "rejected").sum()),
        "unfinished": int(len(admitted_roots) - len(np.intersect1d(admitted_roots["seq"], finished_roots))),
        "forks": int(select(trace, Kind.FORK)["seq"].nunique()),
        "generated_tokens": generated,
        "prompt_tokens": prompt_tokens,
        "prefill_tokens_computed": prefill,
        "decode_tokens_computed": decode,
        "recomputed_tokens": max(0, prefill - (prompt_tokens - prefix_hit_tokens)),
        "steps": steps,
        "wall_time_s": wall_time_s,
        "run_time_s": run_time_s,
        "clock": clock_kind,
        "tokens_per_s": generated / run_time_s if run_time_s > 0 else 0.0,
        "capacity_bytes": capacity,
        "peak_used_bytes": peak("peak_used"),
        "peak_reserved_bytes": peak("peak_reserved"),
        "peak_waste_bytes": peak("peak_waste"),
        "peak_logical_bytes": peak("peak_logical"),
        "peak_cached_idle_bytes": peak("peak_cached_idle"),
        "peaks": "at any instant" if has_in_step_peaks(trace) else "at step ends (older trace)",
        "peak_used_end_of_step_bytes": peak("used"),
        "peak_reserved_end_of_step_bytes": peak("reserved"),
        "retained_end_bytes": int(tl["reserved"].iloc[-1]) if len(tl) else 0,
        "mean_waste_fraction": waste_frac,
        "mean_used_fraction": float(tl["token_usage_frac"].mean()) if len(tl) else 0.0,
        "peak_nvml_bytes": peak_sample("nvml_bytes"),
        "peak_torch_bytes": peak_sample("torch_bytes"),
        "sharing_saved_bytes_peak": max(0, peak("sharing_saved")),
        "sharing_saving_mean": sharing_mean.result(),
        "prefix_hit_tokens": prefix_hit_tokens,
        "prefix_hit_rate": prefix_hit_tokens / prompt_tokens if prompt_tokens else 0.0,
        "preemptions": len(preempt),
        "preemptions_recompute": int((preempt["aux"] != 1).sum()),
        "preemptions_swap": int((preempt["aux"] == 1).sum()),
        "swapped_out_bytes": int(select(trace, Kind.SWAP_OUT)["bytes"].sum()),
        "ooms": count(trace, Kind.OOM),
        "evictions": count(trace, Kind.BLOCK_EVICT),
        "driver_calls": trace.store.count([int(k) for k in DRIVER_KINDS]),
        "driver_ms": float(values(trace, "dur_ns", *DRIVER_KINDS).sum() / 1e6),
    }


def _finished_requests(lt, meta) -> np.ndarray:
    """Root seqs of requests whose every sample finished (as many as the request's n) and none was rejected."""
    if lt.empty:
        return np.zeros(0, np.int64)
    status = lt["status"].astype(str)
    fam = (
        pd.DataFrame({"done": (status == "finished").astype("int64"), "rejected": status == "rejected", "size": 1})
        .groupby(lt["root"].to_numpy())
        .agg({"done": "sum", "rejected": "any", "size": "sum"})
    )
    want = fam["size"]
    if len(meta) and "n" in meta.columns:
        n = pd.to_numeric(meta.set_index("seq")["n"], errors="coerce").reindex(fam.index)
        want = n.fillna(fam["size"]).astype("int64")
    ok = (fam["done"] >= want) & (fam["done"] > 0) & ~fam["rejected"]
    return fam.index[ok].to_numpy()
