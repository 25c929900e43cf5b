"""Record HF transformers' continuous batching (`generate_batch`, its paged KV cache) into a kvscope trace.

    from kvscope.integrations import hf_transformers

    with hf_transformers.record("hf.kvtrace", model=model) as hook:
        model.generate_batch(prompts, generation_config=..., continuous_batching_config=...)
    trace = hook.trace()

Nothing in transformers is changed: inside the `with`, a few methods of its continuous-batching classes are wrapped
(class attributes, put back exactly as they were on exit) so that each call also tells kvscope what it did
(kvscope.integrations.hf_hook). Written against transformers 5.17 (transformers/generation/continuous_batching);
`record` checks that the methods it wraps exist, the hook that the attributes it reads do, and a version without
them is refused in one line. What is wrapped, and why there:
- PagedAttentionCache.__init__: the pool's geometry (blocks, block size, the model's KV shape): the trace opens.
- PagedAttentionCache.allocate_blocks / free_blocks / search_prefix_match (prefix-cache hits) /
  mark_shareable_blocks_as_complete (blocks hashed into the prefix cache, or deduplicated against a cached one) /
  fork_request (parallel samples): after each, the request's block table is compared with kvscope's shadow of it
  (kvscope.integrations.block_ledger), which emits the block events in between.
- BlockManager.has_enough_free_blocks: where HF evicts idle cached blocks to make room.
- Scheduler.add_waiting_request (arrivals), _process_candidates (admissions; the batch and its tokens),
  finish_request (finishes, and preemptions while the offloading manager runs); OffloadingManager.offload_requests
  (preemption: CPU swap or "soft reset", i.e. recompute) and restore_scheduled_requests (swap-ins).
- ContinuousBatchProcessor.prepare_next_batch (the batch's tokens are held once it returns) and
  ContinuousBatchingManager._generation_loop_body: one iteration of HF's loop that ran a batch is one step.
The books at each step's end are HF's own (BlockManager: blocks in use, cached-idle, free); tokens held are HF's
request positions. `hook.mismatches` lists any step where kvscope's shadow disagreed with HF's counts (the shadow's
numbers are then recorded): a bug to report, expected to stay empty.

Models whose layers are not all full attention (sliding windows, hybrids: several layer groups) are refused, and a
second paged cache built inside one recording is not recorded (`hook.ignored_caches`): one generate_batch per
`with`.
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from kvscope.errors import UserError, one_line
from kvscope.integrations.hf_hook import CANNOT_SEE, SOURCE, HFHook, model_problem

__all__ = ["CANNOT_SEE", "SOURCE", "HFHook", "model_problem", "record"]

_MISSING = object()
_ACTIVE: list[HFHook] = []  # the recording in progress (at most one: the wrappers are process-wide)
_WRAPPED = {  # class -> (its module in transformers.generation.continuous_batching, the methods wrapped)
    "PagedAttentionCache": ("cache", ("__init__", "allocate_blocks", "free_blocks", "search_prefix_match",
                                      "mark_shareable_blocks_as_complete", "fork_request")),
    "BlockManager": ("cache_manager", ("has_enough_free_blocks",)),
    "Scheduler": ("scheduler", ("add_waiting_request", "finish_request", "_process_candidates")),
    "OffloadingManager": ("offloading_manager", ("offload_requests", "restore_scheduled_requests")),
    "ContinuousBatchProcessor": ("continuous_api", ("prepare_next_batch",)),
    "ContinuousBatchingManager": ("continuous_api", ("_generation_loop_body",)),
}  # fmt: skip
_TABLE_METHODS = ("allocate_blocks", "free_blocks", "search_prefix_match", "mark_shareable_blocks_as_complete")


def _classes() -> dict[str, type]:
    """transformers' continuous-batching classes the hook wraps; a UserError when they are not all there."""
    try:
        import transformers

        modules = {
            m: importlib.import_module(f"transformers.generation.continuous_batching.{m}") for m, _ in _WRAPPED.values()
        }
    except ImportError as e:
        raise UserError(
            f"HF transformers' continuous batching is not importable ({e}): pip install 'kvscope[hf]'"
        ) from None
    out: dict[str, type] = {}
    for name, (module, methods) in _WRAPPED.items():
        cls = getattr(modules[module], name, None)
        absent = [m for m in methods if cls is None or not callable(getattr(cls, m, None))]
        if absent or not isinstance(cls, type):
            raise UserError(
                f"transformers {transformers.__version__}: {name} lacks {', '.join(absent) or 'itself'}; kvscope's "
                f"hook was written against transformers 5.17's continuous batching"
            )
        out[name] = cls
    return out


class _Patches:
    """Class attributes replaced for the recording and put back exactly as they were (own or inherited)."""

    def __init__(self) -> None:
        self._saved: list[tuple[type, str, Any]] = []

    def wrap(self, cls: type, name: str, wrapper: Callable[[Callable], Callable]) -> None:
        own = cls.__dict__.get(name, _MISSING)
        setattr(cls, name, wrapper(getattr(cls, name)))
        self._saved.append((cls, name, own))

    def restore(self) -> None:
        while self._saved:
            cls, name, own = self._saved.pop()
            if own is _MISSING:
                delattr(cls, name)
            else:
                setattr(cls, name, own)


Owner = Callable[[Any], Any]  # the wrapped object -> the paged cache it belongs to


def _calling(
    hook: HFHook,
    owner: Owner,
    before: Callable[[Any, dict[str, Any]], Any] | None = None,
    after: Callable[[Any, dict[str, Any], Any, Any], None] | None = None,
) -> Callable[[Callable], Callable]:
    """A wrapper factory: the original method runs as always; when the object belongs to the recorded cache,
    `before(obj, arguments)` runs first and `after(obj, arguments, result, what before returned)` once it returned,
    both inside hook.guard. Arguments are matched to names by position (cheaper than inspect's bind per call)."""

    def wrap(original: Callable) -> Callable:
        names = list(inspect.signature(original).parameters)[1:]

        def method(obj: Any, *args: Any, **kwargs: Any) -> Any:
            if not hook.watching(owner(obj)):
                return original(obj, *args, **kwargs)
            arguments = dict(zip(names, args, strict=False)) | kwargs
            pre = hook.guard(before, obj, arguments) if before is not None else None
            out = original(obj, *args, **kwargs)
            if after is not None:
                hook.guard(after, obj, arguments, out, pre)
            return out

        method.__name__, method.__qualname__, method.__doc__ = (
            original.__name__,
            original.__qualname__,
            original.__doc__,
        )
        return method

    return wrap


def _install(hook: HFHook, classes: dict[str, type], patches: _Patches) -> None:
    def cache_of(obj: Any) -> Any:  # schedulers, batch processors and offloading managers hold `.cache`
        return getattr(obj, "cache", None)

    def cache_init(original: Callable) -> Callable:
        names = list(inspect.signature(original).parameters)[1:]

        def __init__(cache: Any, *args: Any, **kwargs: Any) -> None:
            original(cache, *args, **kwargs)
            cb_config = (dict(zip(names, args, strict=False)) | kwargs).get("continuous_batching_config")
            hook.guard(hook.bind, cache, cb_config)

        return __init__

    def offloading(original: Callable) -> Callable:  # the flag must drop even if HF raises
        def offload_requests(manager: Any, *args: Any, **kwargs: Any) -> Any:
            hook.offloading = hook.watching(cache_of(manager))
            try:
                return original(manager, *args, **kwargs)
            finally:
                hook.offloading = False

        return offload_requests

    def own(cache: Any) -> Any:
        return cache

    def block_manager_cache(bm: Any) -> Any:
        return hook.cache if hook.cache is not None and bm is hook.cache._block_manager else None

    def loop_cache(manager: Any) -> Any:
        return cache_of(getattr(manager, "batch_processor", None))

    def table(name: str) -> Callable[[Callable], Callable]:
        return _calling(hook, own, after=lambda cache, a, out, _: hook.table_changed(name, a, out))

    def fork(cache: Any, a: dict[str, Any], out: Any, _: Any) -> None:
        hook.forked(a["source_request_id"], list(a["destination_request_ids"]), out)

    def swapping(manager: Any, a: dict[str, Any]) -> list[str]:
        return [f.state.request_id for f in a["requests_in_batch"] if f.state.is_cpu_offloaded]

    cache, scheduler, offload = classes["PagedAttentionCache"], classes["Scheduler"], classes["OffloadingManager"]
    patches.wrap(cache, "__init__", cache_init)
    for name in _TABLE_METHODS:
        patches.wrap(cache, name, table(name))
    patches.wrap(cache, "fork_request", _calling(hook, own, after=fork))
    patches.wrap(
        classes["BlockManager"],
        "has_enough_free_blocks",
        _calling(
            hook,
            block_manager_cache,
            before=lambda bm, a: hook.eviction_candidates(bm, a["n_blocks"]),
            after=lambda bm, a, out, candidates: hook.evicted(bm, candidates or []),
        ),
    )
    patches.wrap(scheduler, "add_waiting_request", _calling(hook, cache_of, lambda s, a: hook.arrived(a["state"])))
    patches.wrap(scheduler, "finish_request", _calling(hook, cache_of, lambda s, a: hook.finishing(s, a["request_id"])))
    patches.wrap(
        scheduler,
        "_process_candidates",
        _calling(hook, cache_of, after=lambda s, a, out, _: hook.scheduled_batch(out[0])),
    )
    patches.wrap(offload, "offload_requests", offloading)
    patches.wrap(
        offload,
        "restore_scheduled_requests",
        _calling(hook, cache_of, swapping, after=lambda m, a, out, swapped: hook.swapped_in(swapped or [])),
    )
    patches.wrap(
        classes["ContinuousBatchProcessor"],
        "prepare_next_batch",
        _calling(hook, cache_of, lambda p, a: hook.scheduled.clear(), lambda p, a, ready, _: hook.prepared(ready)),
    )
    patches.wrap(
        classes["ContinuousBatchingManager"],
        "_generation_loop_body",
        _calling(hook, loop_cache, lambda m, a: hook.begin_step(), lambda m, a, out, _: hook.end_step()),
    )


@contextmanager
def record(
    path: str | os.PathLike | None = None,
    *,
    model: Any = None,
    meta: dict[str, Any] | None = None,
    label: str | None = None,
) -> Iterator[HFHook]:
    """Record the continuous-batching run inside the `with` (one generate_batch: one paged cache) into `path`
    (None: in memory, `hook.trace()`). `model`, if given, is checked first (full-attention layers only); `meta`
    adds to the trace's metadata (workload, requests, model name, ...); `label` names the run (default
    "hf paged b<block size>"). Raises a UserError (one line) for a model, cache or transformers version the hook
    cannot record, and a RuntimeError if the hook itself failed (the trace is then left cut off)."""
    classes = _classes()
    if model is not None:
        problem = model_problem(model.config)
        if problem:
            raise UserError(problem)
    if _ACTIVE:
        raise UserError("a kvscope recording of HF transformers is already active in this process")
    hook, patches = HFHook(path, meta, label), _Patches()
    _ACTIVE.append(hook)
    ok = False
    try:
        _install(hook, classes, patches)
        yield hook
        ok = True
    finally:
        patches.restore()
        _ACTIVE.clear()
        if hook.run is not None and ok and hook.error is None:
            hook.run.close()
        elif hook.run is not None:
            hook.run.abort()
    if hook.error is not None:
        raise RuntimeError(f"kvscope's HF hook failed: {one_line(repr(hook.error))}") from hook.error
    if hook.refused is not None:
        raise UserError(hook.refused)
    if hook.run is None:
        raise UserError(
            "no paged cache was built inside the recording: call generate_batch inside `with record(...)` (a "
            "persistent manager made before it is not seen)"
        )
