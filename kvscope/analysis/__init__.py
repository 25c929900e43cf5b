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
- driver.driver_calls(trace) -> step, kind, dur_us (one row per timed VMM driver/OS call)
- compare.compare_runs(traces) -> one row per trace: label + the summary figures

Extensions (also guaranteed):
- memory.waste_breakdown(trace) -> long form: step, t_s, category (used, internal, reservation, mapped_idle,
  cached_idle, free), bytes; memory_timeline also has sharing_saved, nvml_bytes, torch_bytes
- fragmentation.unit_states(trace) -> the allocator's state names in order; block_states extra columns: paged
  table_index, hashed, hash; vmm buffer, offset. state_matrix also has step_end, unit_end (step_bin / unit_bin are
  the first step / unit of a bin)
- sharing.fork_tree also has t_s, tokens, root, depth; prefix_tree: node ids 0..N-1 (parent -1 for a chain's first
  block) plus tokens, hash, stores, evictions, cached, first_step; sharing_edges also has table_index
- throughput_timeline also has tokens, decode_tokens_per_s, driver_calls
- request_lifetimes also has root, first_token_step, admit_s, first_token_s, finish_s, max_tokens_held,
  generated, swaps, status (finished, rejected, running, waiting); requests.generated_tokens(trace) -> int
- driver.driver_calls also has call (cuMemMap, ...), page, bytes, t_s; driver.driver_stats(trace) -> per kind:
  count, total_ms, median_us, p90_us, p99_us, max_us
- snapshot helpers the surfaces use instead of computing their own: memory.step_range(trace) -> (first, last);
  memory.peak_step(trace, column='reserved') -> int | None (first step where the timeline column peaks; None when
  never > 0); memory.memory_at(trace, step) -> dict | None (that step's timeline row); summary.last_step(trace) ->
  int; summary.event_counts(trace) -> kind, events (kinds that occur, in the schema's order)

Conventions: `t_s` is the end of a step on the run's clock (simulated on --device sim runs, host time otherwise);
"the state at the end of step s" is the state when the engine recorded that step's ACCT_* samples. Results are
cached on the Trace (trace._cache, keys 'analysis.*'); returned DataFrames are copies, safe to modify.
"""
