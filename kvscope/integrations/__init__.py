"""Hooks into third-party engines: their runs recorded as kvscope traces, without changing the engine.

hf_transformers   HF transformers' continuous batching (`generate_batch`, its paged KV cache): `record(path)` around
                  the generation records block allocations, frees, sharing and the prefix cache per request, and
                  step timing. Needs the optional extra: pip install 'kvscope[hf]'.
hf_hook           what the hook does after each of transformers' wrapped methods (its callbacks).
block_ledger      the block books a hook keeps for an engine that exposes block tables but no token fill.
All of them record through kvscope.instrument, the API for instrumenting any engine.

Each trace says in meta["source"] which system produced it and in meta["cannot_see"] what the hook cannot see.
"""
