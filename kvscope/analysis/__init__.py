"""Analysis: pure functions, Trace -> DataFrames (one analysis per module; no plotting here).

Every surface (CLI summary, HTML report, dashboard, magic, widgets) calls these, so all show the same numbers.

API (contract between analysis, figures and surfaces; columns listed are guaranteed, more may be added):
- summary.summarize(trace) -> dict: allocator, device, model, bytes_per_token, requests, finished, steps,
  generated_tokens, peak_used_bytes, peak_reserved_bytes, mean_waste_fraction, preemptions,
  sharing_saved_bytes_peak, prefix_hit_tokens, ... (see summary.py)
- memory.memory_timeline(trace) -> one row per step: step, t_s, capacity, reserved, used, logical, internal,
  reservation, mapped_idle, cached_idle, free, waste, waste_frac (waste / reserved), block_usage_frac (the
  vLLM-style figure: reserved / capacity), token_usage_frac (used / capacity)
- fragmentation.block_states(trace, step) -> one row per block / page / arena segment at the end of `step`:
  unit (block or page id, or segment start), state (paged: free, active, shared, cached_idle; vmm: pool,
  mapped_used, mapped_idle; static: free, used, reservation, internal), fill (tokens), capacity_tokens,
  ref_count, seqs (comma-separated sequence ids), slot
- fragmentation.state_matrix(trace, max_units, max_steps) -> long form: step_bin, unit_bin, state, fraction
- sharing.sharing_edges(trace, step) -> seq, block, ref_count; sharing.fork_tree(trace) -> child, parent, step;
  sharing.prefix_tree(trace) -> node, parent, block, depth, hits; sharing.prefix_stats(trace) -> dict
- throughput.throughput_timeline(trace) -> step, t_s, dur_s, batch, prefill_tokens, decode_tokens, tokens_per_s,
  kernel_ms, kv_bytes_read, achieved_tbps, preemptions, driver_ms
- requests.request_lifetimes(trace) -> seq, request_id, parent, arrival_s, arrive_step, admit_step, finish_step,
  prompt_len, output_len, preemptions, prefix_hit_tokens
- requests.request_phases(trace) -> seq, phase (waiting, running, swapped), start_step, end_step (exclusive), open;
  requests.request_occupancy(trace) -> step, t_s, waiting, running, swapped (sequences in each phase during the
  step: the ONE definition of waiting / running every surface shows, in requests' docstring)
- requests.request_timestamps(trace, clock=None) -> seq, arrive_s, admit_s, first_token_s, end_s, clock
- steps.step_durations(trace, clock=None) -> step, start_s, end_s, dur_s, clock; steps.run_clock(trace) -> 'sim' |
  'host'; steps.run_end_s(trace, clock=None) -> float
- pressure.incidents(trace) -> step, t_s, kind (preempt, swap_out, swap_in, oom, reject, block_evict), seq, tokens,
  blocks, bytes, block, mode
- driver.driver_calls(trace) -> step, kind, dur_us (one row per timed VMM driver/OS call)
- compare.compare_runs(traces) -> one row per trace: label + the summary figures; compare.comparison_verdict(traces)
  -> Verdict (memory, throughput, latency sentences; warnings when setups differ); compare.compare_timelines(traces)
  -> label, step, t_s, reserved, used, batch, tokens_per_s, waiting
- latency.request_latency(trace) -> seq, request_id, arrival_s, admit_s, first_token_s, finish_s, generated, queue_s,
  ttft_s, tpot_s, clock; latency.latency_summary(trace) -> ttft/tpot/queue p50/p90/p99 (summarize has them)
- batch.batch_limits(trace) -> step, batch, waiting, head_tokens, tokens, limit (arrivals, max-batch, token budget,
  memory, unknown); batch.batch_summary(trace) -> max_batch, mean_batch, batch_limited_by, ... (summarize has them)
- block_tables.block_tables(trace, step) (import it from its module: the name is the module's) -> seq, root,
  request_id, index, unit, kind (own, shared, cow), ref_count, fill, capacity_tokens, cow_source, group, group_size;
  fragmentation.fill_matrix(trace, max_units, max_steps) -> step_bin, step_end, unit_bin, unit_end, tokens, slots,
  fill (state_matrix and fill_matrix take steps=, units=)
- cache (imported KV-event streams: vLLM's BlockStored / BlockRemoved): cache.cached_blocks(trace) -> step, t_s,
  medium, cached, total; cache.cache_rates(trace, bin_s=None) -> t_s, medium, stored, removed, bin_s, stored_per_s,
  removed_per_s; cache.cache_tree(trace) -> node, parent, depth, tokens, group, hash (uint64), hash_hex, stores,
  removals, restores, cached, first_step, first_t_s, stored; cache.restored_blocks(trace) -> node, medium, step,
  t_s, removed_step, removed_t_s, gap_s, tokens; cache.block_lifetimes(trace) -> node, medium, store_step,
  store_t_s, end_step, end_t_s, end, lifetime_s; cache.cache_summary(trace) -> dict (summarize's keys for them)

Extensions (also guaranteed):
- memory.waste_breakdown(trace) -> long form: step, t_s, category (used, internal, reservation, mapped_idle,
  cached_idle, free), bytes; memory_timeline also has sharing_saved, nvml_bytes, torch_bytes
- fragmentation.unit_states(trace) -> the allocator's state names in order; block_states extra columns: paged
  table_index, hashed, hash; vmm buffer, offset. state_matrix also has step_end, unit_end (step_bin / unit_bin are
  the first step / unit of a bin)
- sharing.fork_tree also has t_s, tokens, root, depth; prefix_tree: node ids 0..N-1 (parent -1 for a chain's first
  block) plus tokens, hash, stores, evictions, cached, first_step; sharing_edges also has table_index
- throughput_timeline also has tokens, decode_tokens_per_s, driver_calls
- request_lifetimes also has root, first_token_step, reject_step, admit_s, first_token_s, finish_s,
  max_tokens_held, generated, swaps, status (finished, rejected, running, waiting); requests.generated_tokens(trace)
  -> int; requests.lifetime_phases(lifetimes, last_step=None) -> request_phases' columns from a lifetimes frame alone
  (no preemptions or swaps: for callers without a trace)
- replay (the per-unit replays behind fragmentation, one module per addressing family: blocks, pages, rows):
  replay.replay_class(trace), replay.timeline(trace), replay.pool_geometry(trace) -> PoolGeometry (addressing,
  units, block_size, page_size, capacity_bytes). A trace whose allocator_config declares no addressing (and is not
  a legacy trace of a built-in allocator), or lacks the sizes its addressing needs, raises replay.ReplayError (a
  ValueError, one line) from block_states, state_matrix and unit_states
- driver.driver_calls also has call (cuMemMap, ...), page, bytes, t_s; driver.driver_stats(trace) -> per kind:
  count, total_ms, median_us, p90_us, p99_us, max_us
- snapshot helpers the surfaces use instead of computing their own: memory.step_range(trace) -> (first, last);
  memory.peak_step(trace, column='reserved') -> int | None (first step where the timeline column peaks; None when
  never > 0); memory.memory_at(trace, step) -> dict | None (that step's timeline row); summary.last_step(trace) ->
  int; summary.event_counts(trace) -> kind, events (kinds that occur, in the schema's order)

Conventions: `t_s` is the end of a step on the run's clock (simulated on --device sim runs, host time otherwise);
"the state at the end of step s" is the state when the engine recorded that step's ACCT_* samples, and a request's
phase in step s is its queue while step s runs. Results are cached on the Trace (trace._cache, keys 'analysis.*');
returned DataFrames are copies, safe to modify. The functions above are also importable from kvscope.analysis itself.
"""

from kvscope.analysis.batch import batch_limits, batch_summary
from kvscope.analysis.cache import (
    block_lifetimes,
    cache_rates,
    cache_summary,
    cache_tree,
    cached_blocks,
    restored_blocks,
)
from kvscope.analysis.compare import compare_runs, compare_timelines, comparison_verdict
from kvscope.analysis.driver import driver_calls, driver_stats
from kvscope.analysis.fragmentation import block_states, fill_matrix, state_matrix, unit_states
from kvscope.analysis.latency import latency_summary, request_latency
from kvscope.analysis.memory import memory_at, memory_timeline, peak_step, step_range, waste_breakdown
from kvscope.analysis.pressure import incidents
from kvscope.analysis.replay import PoolGeometry, ReplayError, pool_geometry
from kvscope.analysis.requests import (
    generated_tokens,
    lifetime_phases,
    request_lifetimes,
    request_occupancy,
    request_phases,
    request_timestamps,
)
from kvscope.analysis.sharing import fork_tree, prefix_stats, prefix_tree, sharing_edges
from kvscope.analysis.steps import run_clock, run_end_s, step_durations
from kvscope.analysis.summary import event_counts, last_step, summarize
from kvscope.analysis.throughput import throughput_timeline

__all__ = [
    "PoolGeometry",
    "ReplayError",
    "block_lifetimes",
    "batch_limits",
    "batch_summary",
    "block_states",
    "cache_rates",
    "cache_summary",
    "cache_tree",
    "cached_blocks",
    "compare_runs",
    "compare_timelines",
    "comparison_verdict",
    "driver_calls",
    "driver_stats",
    "event_counts",
    "fill_matrix",
    "fork_tree",
    "generated_tokens",
    "incidents",
    "last_step",
    "latency_summary",
    "lifetime_phases",
    "memory_at",
    "memory_timeline",
    "peak_step",
    "pool_geometry",
    "prefix_stats",
    "prefix_tree",
    "request_latency",
    "request_lifetimes",
    "request_occupancy",
    "request_phases",
    "request_timestamps",
    "restored_blocks",
    "run_clock",
    "run_end_s",
    "sharing_edges",
    "state_matrix",
    "step_durations",
    "step_range",
    "summarize",
    "throughput_timeline",
    "unit_states",
    "waste_breakdown",
]
