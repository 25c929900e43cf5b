"""Importers: other systems' data -> kvscope traces (or workloads).

vllm_events: vLLM's KV-cache event stream (the msgpack KVEventBatches its ZMQ publisher sends, or their JSON-lines
form) decoded into typed batches; kv_trace writes them as trace rows (the KV_* kinds of kvscope.events); live
subscribes to a running publisher and writes as messages arrive. Each importer's trace says in meta["source"] which
system produced it and, in meta["kv_events"], what that source cannot see.
"""
