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
"""
