"""Event kinds and the trace record schema (contract).

Every state change of an allocator or the engine becomes one row of ten int64-ish columns. Column meaning per kind
is written below, next to the kind, so that readers of a trace (kvscope's analysis, or pandas/duckdb without kvscope)
know exactly what each number is. Unused columns hold their default: -1 for ids (`seq`, `block`, `addr`, `aux`), 0 for
amounts (`n`, `bytes`, `dur_ns`).

Bumping FORMAT_VERSION is a deliberate, everywhere-at-once change: readers refuse newer versions.

Format versions (the file is an Arrow IPC stream either way, readable by pyarrow, pandas, polars, duckdb):
  1  schema metadata `kvscope.meta` (run metadata, JSON) and `kvscope.format_version`; no checksums.
  2  adds checksums that plain Arrow readers ignore: the schema metadata's `kvscope.meta_crc32` is the CRC-32 of the
     `kvscope.meta` bytes, and every record batch message carries custom metadata `kvscope.crc32`, the CRC-32 of
     the batch's values (`batch_crc32`: see there for exactly which bytes). In-step peak kinds (ACCT_PEAK_*).
  3  a run that closed cleanly may end with a digest (kvscope.digest): after the batch holding RUN_END, a record
     batch of no rows whose custom metadata `kvscope.digest` holds whole-run results as JSON (the summary, the
     fragmentation map) with the CRC-32 of the stream before it. Plain Arrow readers see an empty batch; the events
     and their columns are as in version 2, and readers of version 3 read versions 1 and 2 as before.
"""

from __future__ import annotations

import zlib
from enum import IntEnum
from typing import TypedDict

import pyarrow as pa

FORMAT_VERSION = 3
META_KEY = b"kvscope.meta"  # schema metadata key holding the run metadata as JSON
VERSION_KEY = b"kvscope.format_version"
META_CRC_KEY = b"kvscope.meta_crc32"  # schema metadata: CRC-32 of the META_KEY value, decimal (version >= 2)
BATCH_CRC_KEY = b"kvscope.crc32"  # record batch message custom metadata: batch_crc32, decimal (version >= 2)


class Kind(IntEnum):
    """What happened. The integer is the dictionary index in the trace's `kind` column; append only."""

    # ---- sequence lifecycle ------------------------------------------------------------------------------------
    ARRIVE = 0  # seq; n=prompt tokens; aux=output tokens wanted
    ADMIT = 1  # seq; n=prompt tokens to hold (incl. recomputed output after a preemption); aux=prefix-cache hit tokens
    FORK = 2  # seq=child; aux=parent; n=tokens the child starts with (shared or copied)
    PREEMPT = 3  # seq; n=tokens it held; aux=0 recompute, 1 swap
    SWAP_OUT = 4  # seq; n=blocks moved to CPU; bytes
    SWAP_IN = 5  # seq; n=blocks moved back to the GPU; bytes
    FINISH = 6  # seq; n=tokens held at the end (P + O - 1); its memory is released in the same step
    APPEND = 7  # seq; n=tokens added; aux=tokens held after the append
    PREFIX_HIT = 8  # seq; n=prompt tokens served from the prefix cache (never recomputed ones)
    REJECT = 9  # seq; n=tokens it would need; the request can never fit (longer than max_len or the whole pool)
    # ---- paged blocks (vLLM) -----------------------------------------------------------------------------------
    BLOCK_ALLOC = 10  # block; seq=owner; addr=index in its block table; bytes=block bytes; free -> active, ref 1
    BLOCK_SHARE = 11  # block; seq=new holder; addr=index in its block table; aux=ref after (also a cache touch)
    BLOCK_FREE = 12  # block; seq=holder letting go; aux=ref after; at 0: free, or cached-idle if hashed
    BLOCK_COW = 13  # block=new copy; aux=source block; seq=the writer; addr=index in its block table; bytes
    BLOCK_CACHE = 14  # block; aux=hash (int64 prefix of the chained block hash); seq; like vLLM's BlockStored
    BLOCK_EVICT = 15  # block; aux=hash; a cached-idle block dropped from the cache -> free; like vLLM's BlockRemoved
    # the CPU tier of the prefix cache (--cpu-cache, Pensieve's second tier; kvscope.alloc.paged)
    BLOCK_OFFLOAD = 16  # after a BLOCK_EVICT: block=the evicted GPU block, copied to CPU tier block addr; aux=hash;
    #                     bytes=block bytes copied device -> host
    BLOCK_RELOAD = 17  # a prefix hit in the CPU tier: block=the new GPU block (its BLOCK_ALLOC just before) it is
    #                    copied into from CPU tier block addr; seq; aux=hash; bytes copied host -> device
    BLOCK_TIER_DROP = 18  # the CPU tier drops its least recently used block (full, or a reset): addr=CPU tier block;
    #                       aux=hash; bytes
    # ---- VMM (vAttention) --------------------------------------------------------------------------------------
    VMM_RESERVE = 20  # n=virtual buffers; bytes=virtual bytes reserved in all; dur_ns
    PAGE_CREATE = 21  # block=page id; bytes=page bytes; dur_ns (cuMemCreate)
    PAGE_MAP = 22  # block=page id; seq; aux=slot; addr=byte offset in the slot's region; n=buffer; dur_ns
    PAGE_ACCESS = 23  # like PAGE_MAP, for the set-access call after a map; dur_ns
    PAGE_UNMAP = 24  # like PAGE_MAP; the page goes back to the pool; dur_ns
    PAGE_RELEASE = 25  # block=page id; bytes; dur_ns (cuMemRelease at teardown or pool shrink)
    SLOT_ALLOC = 26  # seq; addr=slot
    SLOT_FREE = 27  # seq; addr=slot; n=pages left mapped (deferred reclamation keeps them as mapped-idle)
    RECLAIM = 28  # seq; addr=slot; n=mapped-idle pages the new request takes over without any driver call
    # ---- static reservation (FasterTransformer / Orca) ---------------------------------------------------------
    STATIC_RESERVE = 30  # seq; addr=first token slot in the arena; n=tokens reserved; bytes
    STATIC_RELEASE = 31  # seq; addr; n; bytes
    # ---- engine steps ------------------------------------------------------------------------------------------
    STEP = 40  # n=sequences in the batch; dur_ns=step wall time; aux=simulated clock in ns (-1 on real devices)
    STEP_PREFILL = 41  # n=prefill tokens computed this step
    STEP_DECODE = 42  # n=decode tokens computed this step
    STEP_KERNEL = 43  # dur_ns=GPU time of the step's forward pass (CUDA events); bytes=KV bytes read by attention
    MAP_AHEAD = 44  # VMM mapping for the next step on a background thread: n=page-groups, bytes, dur_ns=driver time
    #                 off the critical path; aux=ns the engine thread waited for it (the part back on the path)
    MAP_SYNC = 45  # VMM mapping done on the engine thread (admissions, misses): dur_ns=driver time on the critical path
    STEP_ATTENTION = 46  # dur_ns=GPU time of the step's attention kernels alone (CUDA events around each layer's
    #                      attention); bytes=KV bytes they read; n=layers timed; aux=1 if the step replayed a CUDA graph
    # ---- memory accounting, one sample per kind at the end of every step (the allocator's own books) -----------
    ACCT_CAPACITY = 50  # bytes the allocator manages
    ACCT_RESERVED = 51  # bytes taken for KV (blocks allocated, pages mapped, slots reserved); cached-idle excluded
    ACCT_USED = 52  # bytes holding real token states (a shared block counted once)
    ACCT_LOGICAL = 53  # bytes all sequences' tokens would need without any sharing
    ACCT_INTERNAL = 54  # waste: unfilled slots of partly filled blocks / pages / reservations beyond the final length
    ACCT_RESERVATION = 55  # waste: reserved for tokens not generated yet (static: up to the final length; eager VMM)
    ACCT_MAPPED_IDLE = 56  # waste: VMM pages mapped to slots with no live request (deferred reclamation)
    ACCT_CACHED_IDLE = 57  # idle cached prefix blocks (ref 0, hashed): neither waste nor free
    ACCT_FREE = 58  # bytes not taken: capacity = reserved + cached_idle + free
    MEM_NVML = 60  # bytes=device memory used as NVML reports it (sampled on a thread)
    MEM_TORCH = 61  # bytes=torch.cuda.memory_reserved()
    OOM = 70  # seq; n=tokens asked for; bytes; the allocator could not serve the request at that moment
    RUN_END = 80  # the run closed cleanly; n=steps run
    # ---- in-step peaks, one sample per kind right after each step's ACCT_* samples (format version 2) ---------
    # bytes = the most the quantity reached at any instant of the step (after any allocator operation), where the
    # ACCT_* samples are the values at the step's end, after its releases. Waste and its split count only instants
    # when some sequence holds tokens (see kvscope.alloc.base.HighWater).
    ACCT_PEAK_RESERVED = 90
    ACCT_PEAK_USED = 91
    ACCT_PEAK_LOGICAL = 92
    ACCT_PEAK_WASTE = 93  # reserved - used
    ACCT_PEAK_INTERNAL = 94
    ACCT_PEAK_RESERVATION = 95
    ACCT_PEAK_MAPPED_IDLE = 96
    ACCT_PEAK_CACHED_IDLE = 97
    # ---- beam search and VMM page sharing (issue 11) -----------------------------------------------------------
    PRUNE = 120  # seq; n=tokens it held; beam search dropped this beam (no candidate of it kept): its memory is
    #              released in the same step, like a FINISH that generated nothing more
    PAGE_COW = 121  # VMM copy-on-write of a shared page before a write: block=new page; aux=the shared page it copies;
    #                 seq=the writer; addr=byte offset in its slot's region; n=buffer; bytes=page bytes
    # ---- imported KV-cache events (vLLM's KVEventBatch stream; kvscope.importers, issue 9) ---------------------
    # vLLM's events name blocks by hash, never by block id, and no request: these rows have seq=-1 unless said.
    # `step` is the message's sequence number (its position in a file); t_ns is the batch's ts (vLLM's clock)
    # minus meta["kv_events"]["ts_origin_s"]. A "node" is one (group, hash) pair, numbered 0, 1, ... in the order
    # the trace first meets it; a "name id" numbers strings (mediums, LoRA names, cache-spec kinds) the same way.
    KV_BATCH = 100  # one message: n=events in it; aux=data_parallel_rank (-1 none); addr=1 if it came through the
    #                 publisher's replay socket (a gap filled), else 0
    KV_NAME = 101  # a string first met: block=name id; n=its UTF-8 length; addr=chunk index; aux=UTF-8 bytes
    #                [8*addr, 8*addr+8) little-endian, zero-padded (one row per 8 bytes)
    KV_HASH = 102  # a node first met: block=node; addr=group_idx (-1 none); an integer hash has n=0 and aux=its 64
    #                bits as int64 (hash = aux mod 2**64); a bytes hash has n=its length and one row per 8 bytes,
    #                seq=chunk index, aux=those bytes big-endian, zero-padded
    KV_STORE = 103  # a BlockStored event, before its blocks: n=blocks; aux=parent node (-1: parent_block_hash null);
    #                 addr=medium name id (-1 none); block=lora_id (-1 none); seq=lora_name id (-1 none);
    #                 bytes=block_size in tokens (not bytes); dur_ns=kv_cache_spec_kind name id (-1 none)
    KV_WINDOW = 104  # after a KV_STORE whose kv_cache_spec_sliding_window is set: n=that window in tokens
    KV_STORED = 105  # one block of a BlockStored event: block=node; aux=parent node (-1 none); n=its tokens;
    #                  addr=medium name id (-1 none)
    KV_REMOVED = 106  # one block of a BlockRemoved event: block=node; addr=medium name id (-1 none)
    KV_CLEARED = 107  # AllBlocksCleared: every cached block of every medium is gone
    KV_TOKEN = 108  # only when token ids are kept: block=node; addr=position in the block; aux=token id
    KV_GAP = 109  # messages a live stream skipped: addr=first missing sequence number; n=how many;
    #               aux=how many of them the replay socket returned (their KV_BATCH rows follow with addr=1)


KIND_NAMES: list[str] = [""] * (max(Kind) + 1)
for _k in Kind:
    KIND_NAMES[_k] = _k.name.lower()
# Unassigned codes keep a readable placeholder so that the dictionary is dense and stable.
KIND_NAMES = [name or f"unused_{i}" for i, name in enumerate(KIND_NAMES)]
KIND_BY_NAME = {k.name.lower(): k for k in Kind}

ACCT_FIELDS: dict[Kind, str] = {
    Kind.ACCT_CAPACITY: "capacity",
    Kind.ACCT_RESERVED: "reserved",
    Kind.ACCT_USED: "used",
    Kind.ACCT_LOGICAL: "logical",
    Kind.ACCT_INTERNAL: "internal",
    Kind.ACCT_RESERVATION: "reservation",
    Kind.ACCT_MAPPED_IDLE: "mapped_idle",
    Kind.ACCT_CACHED_IDLE: "cached_idle",
    Kind.ACCT_FREE: "free",
}

PEAK_FIELDS: dict[Kind, str] = {
    Kind.ACCT_PEAK_RESERVED: "reserved",
    Kind.ACCT_PEAK_USED: "used",
    Kind.ACCT_PEAK_LOGICAL: "logical",
    Kind.ACCT_PEAK_WASTE: "waste",
    Kind.ACCT_PEAK_INTERNAL: "internal",
    Kind.ACCT_PEAK_RESERVATION: "reservation",
    Kind.ACCT_PEAK_MAPPED_IDLE: "mapped_idle",
    Kind.ACCT_PEAK_CACHED_IDLE: "cached_idle",
}

INT_COLUMNS: dict[str, pa.DataType] = {
    "t_ns": pa.int64(),
    "step": pa.int32(),
    "seq": pa.int64(),
    "block": pa.int64(),
    "n": pa.int64(),
    "bytes": pa.int64(),
    "addr": pa.int64(),
    "aux": pa.int64(),
    "dur_ns": pa.int64(),
}
KIND_TYPE = pa.dictionary(pa.int16(), pa.string())
COLUMNS = ["t_ns", "step", "kind", "seq", "block", "n", "bytes", "addr", "aux", "dur_ns"]


def arrow_schema(metadata: dict[bytes, bytes] | None = None) -> pa.Schema:
    fields = [pa.field(c, KIND_TYPE if c == "kind" else INT_COLUMNS[c], nullable=False) for c in COLUMNS]
    return pa.schema(fields, metadata=metadata)


def batch_crc32(batch: pa.RecordBatch) -> int:
    """The checksum stored with each record batch (format version >= 2): zlib.crc32 run over, column by column in
    the batch's order, the little-endian bytes of the values (int64 / int32 as stored; for the dictionary-encoded
    `kind`, its integer indices and then its dictionary's strings, each UTF-8 and followed by a NUL byte).

    Over values rather than the IPC body, so that it does not depend on compression or padding and any Arrow
    reader can recompute it. The caller validates the batch first (no nulls, offsets in bounds): this reads the
    buffers as they are."""
    crc = 0
    for column in batch.columns:
        if pa.types.is_dictionary(column.type):
            crc = zlib.crc32(column.indices.to_numpy(zero_copy_only=True), crc)
            names = column.dictionary.to_pylist()
            crc = zlib.crc32("".join(f"{name}\0" for name in names).encode(), crc)
        else:
            crc = zlib.crc32(column.to_numpy(zero_copy_only=True), crc)
    return crc


class EventRecord(TypedDict):
    """One row of a trace, as `Trace.events.to_dict('records')` gives it."""

    t_ns: int
    step: int
    kind: str
    seq: int
    block: int
    n: int
    bytes: int
    addr: int
    aux: int
    dur_ns: int


class RunMeta(TypedDict, total=False):
    """Run metadata stored as JSON in the trace's schema metadata (key `kvscope.meta`)."""

    kvscope_version: str
    format_version: int
    allocator: str  # static | paged | vmm
    allocator_config: dict  # the allocator's own settings (block_size, page_size, variant, ...)
    device: str  # sim | cpu | cuda
    device_name: str  # e.g. "NVIDIA H100 80GB HBM3" or the CPU's name
    versions: dict  # torch, triton, cuda driver, cuda-bindings, nvml, python
    spec: dict  # KVSpec.to_dict()
    model: str
    engine_config: dict  # max_batch, max_tokens_per_step, chunked_prefill, preemption, kv_memory, ...
    workload: dict  # name/path, generator parameters, seed, request count
    requests: dict  # columns: seq (list[int]), id (list[str]), arrival, prompt_len, output_len, n
    seed: int
    start_time: str  # ISO 8601, UTC
    command: str
