#!/usr/bin/env bash
# Records the sample runs on a CUDA GPU (they were made on an H100 with this exact script; see README.md here).
# Usage: bash sample_runs/record.sh [OUT_DIR]   (default: sample_runs/)
set -uo pipefail
out=${1:-sample_runs}
mkdir -p "$out"
common=(--device cuda --model llama-3-8b --max-len 2048 --max-batch 128 --quiet)

# 1-3. One shared ShareGPT-like workload (200 requests, Poisson 20 req/s), each allocator with 6 GiB of KV memory.
kvscope workload sharegpt --requests 200 --rate 20 --seed 1 -o "$out/sharegpt-200.jsonl"
kvscope run --workload "$out/sharegpt-200.jsonl" --allocator static --kv-memory 6GiB "${common[@]}" -o "$out/static.kvtrace"
kvscope run --workload "$out/sharegpt-200.jsonl" --allocator paged --kv-memory 6GiB "${common[@]}" -o "$out/paged.kvtrace"
kvscope run --workload "$out/sharegpt-200.jsonl" --allocator vmm --kv-memory 6GiB --megacache "${common[@]}" \
  -o "$out/vmm.kvtrace"

# 4. Sharing: 4 parallel samples per request and a 512-token system prompt, paged with prefix caching.
kvscope workload alpaca --requests 150 --n 4 --system-prompt-len 512 --rate 30 --seed 2 -o "$out/sharing-150.jsonl"
kvscope run --workload "$out/sharing-150.jsonl" --allocator paged --prefix-caching --kv-memory 4GiB "${common[@]}" \
  -o "$out/paged-sharing.kvtrace"

# 5. VMM growth and reclamation under pressure: per-layer 2 MiB pages (1,024-token growth steps for Llama-3-8B),
#    deferred reclamation handing mapped pages from finished requests to new ones, and preemptions when pages run out.
kvscope run --workload "$out/sharegpt-200.jsonl" --allocator vmm --kv-memory 6GiB "${common[@]}" \
  -o "$out/vmm-reclaim.kvtrace"
ls -la "$out"

# 6. Sharing (issue 11, recorded on an H200): beam search (4 beams) on VMM with page sharing and on paged, and 4
#    parallel samples on VMM; an 8-layer Llama-3-8B shape with 2 GiB of KV.
small=(--device cuda --model llama-3-8b --layers 8 --kv-memory 2GiB --max-len 2048 --max-batch 128 --quiet)
kvscope workload beam --width 4 --requests 32 --seed 3 -o "$out/beam-32.jsonl"
kvscope workload alpaca --n 4 --requests 32 --seed 3 -o "$out/parallel-32.jsonl"
kvscope run --workload "$out/beam-32.jsonl" --allocator vmm --megacache "${small[@]}" -o "$out/vmm-megacache-beam4.kvtrace"
kvscope run --workload "$out/beam-32.jsonl" --allocator paged "${small[@]}" -o "$out/paged-beam4.kvtrace"
kvscope run --workload "$out/parallel-32.jsonl" --allocator vmm --megacache "${small[@]}" \
  -o "$out/vmm-megacache-parallel4.kvtrace"

# 7. Prefix sharing on VMM (issue 11): admitted prompts map the full pages a live sequence with the same system prompt
#    already holds.
kvscope run --allocator vmm --megacache --prefix-caching -w shared-prefix --requests 64 --device cuda \
  --model llama-3-8b --layers 8 --kv-memory 4GiB --quiet -o "$out/vmm-megacache-prefix.kvtrace"
ls -la "$out"
