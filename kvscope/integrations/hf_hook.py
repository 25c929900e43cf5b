"""What kvscope does when one of HF transformers' continuous-batching methods has run: the callbacks behind
kvscope.integrations.hf_transformers (which wraps the methods and says which callback each one calls, and why).

Every callback runs on HF's generation thread, inside `guard`, so a bug here never breaks HF's generation: the
first error is kept, recording stops, and the error is raised when the recording ends. `arguments` are the wrapped
method's arguments by name (without self).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from itertools import islice
from typing import Any

from kvscope import runmeta
from kvscope.events import Kind
from kvscope.instrument import Run, start
from kvscope.integrations.block_ledger import BlockLedger
from kvscope.spec import KVSpec

SOURCE = "hf-transformers"
CANNOT_SEE = [
    "tokens held are HF's request positions (position_offset), not writes observed in the cache tensors",
    "a block spans every layer of the model; HF allocates all cache tensors up front, so device memory does not "
    "move with the blocks",
    "activations and the I/O tensors HF sizes together with the cache are outside the KV pool",
    "the CPU offload pool's own blocks: only swap-outs and swap-ins of the GPU pool are recorded",
    "step time is host wall time of one iteration of HF's generation loop (scheduling, forward, sampling, update); "
    "no separate kernel time",
    "a prompt served whole from the prefix cache recomputes its last token: it counts as held one step early",
]
ASYNC_NOTE = [
    "with async batching (on in this run) an iteration prepares batch k+1 before it finishes batch k, so a request "
    "finishing in it may already hold the position of a token it will not generate (not checked on a GPU)"
]
_DTYPES = {"torch.bfloat16": "bfloat16", "torch.float16": "float16", "torch.float32": "float32"}
_CHILD = re.compile(r"^(?P<parent>.+)__child#\d+$")  # HF's ids for parallel samples that could not fork
_NUMBERED = re.compile(r"^req_(\d{1,15})$")  # HF's own request ids (ContinuousBatchingManager.add_request)
_CACHE_FIELDS = ("group_cache_managers", "_block_manager", "block_size", "num_blocks", "key_cache", "dtype", "device")
_MANAGER_FIELDS = ("_uninit_block_ids", "_init_block_ids", "_hash_to_id", "_id_to_block", "num_blocks")


def model_problem(config: Any) -> str | None:
    """Why the hook cannot record a model with this config (None: it can): only full-attention layers."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layer_types = getattr(text, "layer_types", None)
    if layer_types is None and getattr(text, "sliding_window", None) is not None:
        layer_types = ["sliding_attention"]
    other = sorted({t for t in layer_types or () if t != "full_attention"})
    if other:
        return f"the model has {', '.join(other)} layers: kvscope's HF hook records full-attention models only"
    return None


class HFHook:
    """One recording. `run` (kvscope.instrument.Run) and `ledger` exist once HF has built its paged cache."""

    def __init__(self, path: str | os.PathLike | None, meta: dict[str, Any] | None, label: str | None) -> None:
        self.path, self.meta, self.label = path, dict(meta or {}), label
        self.run: Run | None = None
        self.ledger: BlockLedger | None = None
        self.cache: Any = None
        self.ids: dict[str, int] = {}  # HF request id -> kvscope seq (see `seq`)
        self._taken: set[int] = set()
        self._next = 0
        self.pending_admit: set[int] = set()  # seqs whose next scheduling is an admission
        self.hits: dict[int, int] = {}  # seq -> prefix-hit tokens of its coming admission
        self.scheduled: list[Any] = []  # the FutureRequestStates of the batch being prepared
        self.step_ran = False
        self.offloading = False
        self.mismatches: list[str] = []
        self.refused: str | None = None
        self.ignored_caches = 0
        self.error: BaseException | None = None

    def trace(self) -> Any:
        if self.run is None:
            raise ValueError("nothing was recorded: no paged cache was built inside the recording")
        return self.run.trace()

    def watching(self, cache: Any) -> bool:
        return self.error is None and cache is not None and cache is self.cache

    def guard(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 - kept, and raised when the recording ends
            if self.error is None:
                self.error = e
            return None

    def seq(self, request_id: str) -> int:
        """kvscope's seq for an HF request id: N for HF's own ids "req_N" (generate_batch numbers its inputs so,
        even when it reorders them for prefix sharing), the next unused number for any other id (forked samples,
        ids given by the caller)."""
        seq = self.ids.get(request_id)
        if seq is None:
            numbered = _NUMBERED.match(request_id)
            seq = int(numbered[1]) if numbered and int(numbered[1]) not in self._taken else self._next
            self.ids[request_id] = seq
            self._taken.add(seq)
            self._next = max(self._next, seq + 1)  # other ids above HF's numbers, so a later req_N keeps N
            while self._next in self._taken:
                self._next += 1
        return seq

    @property
    def _run(self) -> Run:
        assert self.run is not None  # callbacks run only while watching a bound cache
        return self.run

    @property
    def _ledger(self) -> BlockLedger:
        assert self.ledger is not None
        return self.ledger

    # ---- PagedAttentionCache.__init__: open the trace with the cache's geometry ------------------------------------
    def bind(self, cache: Any, cb_config: Any) -> None:
        if self.cache is not None or self.refused is not None:
            self.ignored_caches += 1
            return
        absent = [f for f in _CACHE_FIELDS if not hasattr(cache, f)]
        absent += [f"_block_manager.{f}" for f in _MANAGER_FIELDS if not hasattr(cache._block_manager, f)]
        if absent:
            self.refused = f"this transformers' PagedAttentionCache lacks {', '.join(absent)}: cannot record it"
            return
        if len(cache.group_cache_managers) != 1 or int(getattr(cache, "num_sliding_attention_groups", 0) or 0) > 0:
            self.refused = model_problem(cache.config) or "the model has several layer groups: cannot record it"
            return
        dtype = _DTYPES.get(str(cache.dtype))
        if dtype is None:
            self.refused = f"cache dtype {cache.dtype} is not one kvscope sizes (bfloat16, float16, float32)"
            return
        bs, num_blocks = int(cache.block_size), int(cache.num_blocks)
        spec = _spec(cache, dtype)
        device = str(getattr(cache.device, "type", cache.device))
        meta = {
            "model": f"{spec.name} ({spec.num_layers} layers)",
            "device_name": _device_name(cache.device, device),
            "versions": runmeta.versions(device) | {"transformers": _transformers_version()},
            "engine_config": _engine_config(cache, cb_config),
        } | self.meta
        self.run = start(
            self.path,
            source=SOURCE,
            addressing="blocks",
            label=self.label or f"hf paged b{bs}",
            spec=spec,
            allocator="hf-paged",
            cannot_see=CANNOT_SEE + (ASYNC_NOTE if getattr(cb_config, "use_async_batching", False) is True else []),
            device=device,
            meta=meta,
            block_size=bs,
            num_blocks=num_blocks,
            prefix_caching=bool(getattr(cache, "use_prefix_sharing", False)),
        )
        self.ledger = BlockLedger(self.run, num_blocks, bs)
        self.cache = cache

    # ---- steps: one iteration of the generation loop that ran a batch ---------------------------------------------
    def begin_step(self) -> None:
        self._run.begin_step()
        self.step_ran = False

    def end_step(self) -> None:
        if not self.step_ran:  # the loop waited for requests: no batch, no step
            return
        if str(getattr(self.cache.device, "type", "")) == "cuda":
            import torch

            self._run.emit(Kind.MEM_TORCH, bytes=int(torch.cuda.memory_reserved(self.cache.device)))
        self._run.end_step(batch=len(self.scheduled), **self._books(check=True))

    def prepared(self, ready: bool) -> None:
        """prepare_next_batch returned: the batch is scheduled and its positions advanced; this step's forward
        writes its tokens' K/V. (Allocation and append count as one operation for the in-step peaks, as in
        kvscope's own allocators: the instant between them, blocks taken for tokens not yet written, is not one.)"""
        if not ready:
            return
        for future in self.scheduled:
            state = future.state
            seq = self.seq(state.request_id)
            self._ledger.append(seq, int(future.query_length))
            if self._run.held(seq) != state.position_offset:
                self._mismatch(
                    f"seq {seq} holds {self._run.held(seq)} tokens, HF's position is {state.position_offset}"
                )
        self.step_ran = True
        self._note()

    def _books(self, check: bool = False) -> dict[str, int]:
        """HF's books (BlockManager: blocks in use, cached-idle, free) with the ledger's token fill, in bytes."""
        ledger, bm, run = self._ledger, self.cache._block_manager, self._run
        cached = len(bm._init_block_ids)
        in_use = int(bm.num_blocks) - len(bm._uninit_block_ids) - cached
        if in_use != ledger.active or cached != ledger.cached_idle:
            if check:
                self._mismatch(
                    f"HF has {in_use} blocks in use and {cached} cached-idle, kvscope's shadow {ledger.active} and "
                    f"{ledger.cached_idle}"
                )
            in_use, cached = ledger.active, ledger.cached_idle
        bb = run.block_bytes
        return {
            "capacity": ledger.num_blocks * bb,
            "reserved": in_use * bb,
            "used": ledger.used * run.bytes_per_token,
            "reservation": ledger.empty * bb,  # blocks HF took ahead of the tokens that will fill them
            "cached_idle": cached * bb,
            # A prompt served whole from the cache holds its last token one step early (CANNOT_SEE).
            "logical": max(ledger.logical, ledger.used) * run.bytes_per_token,
        }

    def _note(self) -> None:
        self._run.note(**self._books())

    def _mismatch(self, what: str) -> None:
        self.mismatches.append(f"step {self._run.steps}: {what}")

    # ---- requests (Scheduler, OffloadingManager) ------------------------------------------------------------------
    def arrived(self, state: Any) -> None:
        """Scheduler.add_waiting_request: a new request, or one back in the queue after a preemption."""
        rid = state.request_id
        if rid in self.ids:  # re-queued: a recompute needs a new admission, a swapped-out request a swap-in
            if not state.is_cpu_offloaded:
                self.pending_admit.add(self.ids[rid])
            return
        seq = self.seq(rid)
        child = _CHILD.match(rid)
        if child and child["parent"] in self.ids:  # a parallel sample HF could not fork: prefilled on its own later
            self._run.fork(seq, self.ids[child["parent"]], tokens=0)
        else:
            wanted = state.max_new_tokens  # None: no limit but EOS
            self._run.arrive(seq, len(state.initial_tokens), wanted if isinstance(wanted, int) and wanted > 0 else None)
        self.pending_admit.add(seq)

    def scheduled_batch(self, scheduled: list[Any]) -> None:
        """Scheduler._process_candidates returned the batch: a request's first scheduling since it (re)entered the
        queue is its admission, after the prefix hits and allocations made for it."""
        self.scheduled = list(scheduled)
        for future in scheduled:
            seq = self.seq(future.state.request_id)
            if seq in self.pending_admit:
                self.pending_admit.discard(seq)
                self._run.admit(seq, len(future.state.initial_tokens), hit=self.hits.pop(seq, 0))

    def finishing(self, scheduler: Any, request_id: str) -> None:
        """Scheduler.finish_request, before it frees the blocks: a finish, or a preemption while offloading."""
        seq, state = self.ids.get(request_id), scheduler.active_requests.get(request_id)
        if seq is None or state is None:
            return
        if not self.offloading:
            self._run.finish(seq)
            return
        swap = bool(state.is_cpu_offloaded)
        self._run.preempt(seq, swap=swap)
        if swap:
            self._run.swap_out(seq, len(self._table(request_id)))

    def swapped_in(self, request_ids: list[str]) -> None:
        """OffloadingManager.restore_scheduled_requests copied these requests' K/V back into their new blocks."""
        for rid in request_ids:
            seq = self.seq(rid)
            self._run.swap_in(seq, len(self._ledger.tables.get(seq, ())))
            self._ledger.refill(seq)

    # ---- blocks (PagedAttentionCache, BlockManager) ---------------------------------------------------------------
    def _table(self, request_id: str) -> list[int]:
        return self.cache.group_cache_managers[0].block_table.get(request_id, [])

    def table_changed(self, name: str, arguments: dict[str, Any], out: Any) -> None:
        """After allocate_blocks / free_blocks / search_prefix_match / mark_shareable_blocks_as_complete, which
        change one request's block table: sync the shadow (and the prefix hit, or the blocks just cached)."""
        if name == "mark_shareable_blocks_as_complete" and arguments.get("num_complete_blocks") == 0:
            return  # HF returns at once (most decode steps): nothing to sync, and this runs for every request
        state = arguments.get("state")
        rid = state.request_id if state is not None else arguments["request_id"]
        seq, table = self.seq(rid), self._table(rid)
        self._ledger.sync(seq, table)
        if name == "search_prefix_match" and out:
            hit = min(int(out), len(arguments["prompt_ids"]) - 1)  # HF's scheduler always computes the last token
            if hit > 0:
                self._ledger.prefix_hit(seq, hit)
                self.hits[seq] = hit
        elif name == "mark_shareable_blocks_as_complete":
            self._scan_cached(seq, table)

    def _scan_cached(self, seq: int, table: list[int]) -> None:
        """BLOCK_CACHE for the request's blocks HF has just registered in its hash table (in chain order)."""
        ledger, bm = self._ledger, self.cache._block_manager
        i = ledger.cached_prefix.get(seq, 0)
        while i < len(table):
            block = table[i]
            if not ledger.is_cached(block):
                entry = bm._id_to_block.get(block)
                h = None if entry is None else entry.hash
                if h is None or bm._hash_to_id.get(h) != block:
                    break
                ledger.cache(seq, block, h)
            i += 1
        ledger.cached_prefix[seq] = i

    def forked(self, parent_id: str, children: list[str], out: tuple[list[int], list[int]]) -> None:
        """PagedAttentionCache.fork_request: children share the parent's full blocks and get copies of the rest."""
        copies = dict(zip(out[1], out[0], strict=True))  # copy destination -> source block
        parent = self.seq(parent_id)
        for child_id in children:
            child = self.seq(child_id)
            self._run.fork(child, parent)
            self._ledger.sync(child, self._table(child_id), copies)
            self._ledger.cached_prefix[child] = self._ledger.cached_prefix.get(parent, 0)
        self._note()

    def eviction_candidates(self, manager: Any, n_blocks: int) -> list[tuple[int, Any]]:
        """Before BlockManager.has_enough_free_blocks: HF pops idle cached blocks from the end of _init_block_ids
        when the free ones are too few, so the blocks it may evict are the last ones (with their hashes)."""
        short = n_blocks - len(manager._uninit_block_ids)
        last = islice(reversed(manager._init_block_ids), max(0, min(short, len(manager._init_block_ids))))
        return [(b, manager._id_to_block[b].hash) for b in last]

    def evicted(self, manager: Any, candidates: list[tuple[int, Any]]) -> None:
        for block, h in candidates:
            if block not in manager._init_block_ids:
                self._ledger.evict(block, h)


def _spec(cache: Any, dtype: str) -> KVSpec:
    text = cache.config
    name = str(getattr(text, "model_type", "") or "hf-model")
    layers, heads, head_dim = len(cache.key_cache), int(cache.num_key_value_heads), int(cache.head_dim)
    try:
        return KVSpec(
            name,
            layers,
            heads,
            head_dim,
            dtype,
            num_q_heads=int(getattr(text, "num_attention_heads", 0) or 0),
            hidden_size=int(getattr(text, "hidden_size", 0) or 0),
            intermediate_size=int(getattr(text, "intermediate_size", 0) or 0),
            vocab_size=int(getattr(text, "vocab_size", 32000) or 32000),
        )
    except ValueError:  # a geometry KVSpec does not model (tensor-parallel heads): the KV part is what counts
        return KVSpec(name, layers, heads, head_dim, dtype)


def _engine_config(cache: Any, cb: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"engine": "transformers generate_batch (continuous batching)"}
    out["attn_implementation"] = str(getattr(cache.config, "_attn_implementation", "") or "")
    out["max_tokens_per_step"] = int(cache.max_batch_tokens)
    out["chunked_prefill"] = True  # HF's scheduler always splits a prompt to fill the step's token budget
    if cb is not None:
        # Victims that fit in the CPU pool are swapped, the others recomputed ("soft reset").
        out["preemption"] = "swap, then recompute" if (cb.cpu_offload_space or 0) > 0 else "recompute"
        if isinstance(cb.max_requests_per_batch, int):
            out["max_batch"] = cb.max_requests_per_batch
        for key in ("scheduler_type", "use_async_batching", "use_cuda_graph", "safety_margin", "allow_block_sharing"):
            value = getattr(cb, key, None)
            out[key] = value if isinstance(value, bool | int | float | str) or value is None else str(value)
    return out


def _device_name(device: Any, kind: str) -> str:
    if kind == "cuda":
        import torch

        return str(torch.cuda.get_device_name(device))
    return runmeta.device_name(kind)


def _transformers_version() -> str:
    import transformers

    return str(transformers.__version__)
