"""What the lab replays: every request's prompt as a chain of block keys, in arrival order (kvscope.lab's contract).

Keys are dense ints (0..num_keys-1), one per distinct block content: for a Mooncake trace, its hash ids as given
(block size 512, the partly filled last block included: its id names its content); for a kvscope workload, the
prompt's full blocks as vLLM hashes them (a block's key is its content and its parent's key, so equal keys mean
equal prefixes), the trailing partial block left out (vLLM never caches it: its tokens are the block-size floor).
Workloads whose requests carry `prompt_blocks` (imported traces) are keyed from the ids without making tokens when
the block size divides theirs.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from kvscope.importers.mooncake import BLOCK_TOKENS, MooncakeTrace, load_mooncake
from kvscope.workload import Request

DEFAULT_BLOCK_SIZE = 16  # for kvscope workloads: vLLM's default block size


@dataclass
class BlockAccesses:
    source: str  # what was read (file name or workload name)
    kind: str  # "mooncake" or "workload"
    block_size: int
    request_ids: list[str]
    arrival_s: np.ndarray  # float64 [R], non-decreasing
    offsets: np.ndarray  # int64 [R + 1]: request r's blocks are keys[offsets[r]:offsets[r + 1]], head first
    keys: np.ndarray  # int64 [N]
    fill: np.ndarray  # int64 [N]: tokens in each block
    prompt_tokens: np.ndarray  # int64 [R]: the whole prompt, partial block included
    parent: np.ndarray  # int64 [num_keys]: the key before it in every chain, -1 for a chain head
    depth: np.ndarray  # int64 [num_keys]: its index in every chain
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_requests(self) -> int:
        return len(self.prompt_tokens)

    @property
    def num_blocks(self) -> int:
        return len(self.keys)

    @property
    def num_keys(self) -> int:
        return len(self.parent)

    @cached_property
    def chains(self) -> list[list[int]]:
        """Each request's keys as a Python list (the replay loop indexes them one by one)."""
        keys = self.keys.tolist()
        off = self.offsets.tolist()
        return [keys[off[r] : off[r + 1]] for r in range(self.num_requests)]

    @cached_property
    def first_use(self) -> np.ndarray:
        """bool [N]: the first access of its key (a cold miss whatever the policy)."""
        first = np.zeros(self.num_blocks, dtype=bool)
        _, idx = np.unique(self.keys, return_index=True)
        first[idx] = True
        return first

    @cached_property
    def next_use(self) -> np.ndarray:
        """int64 [N]: the next request using the block at each position (num_requests when none)."""
        n = self.num_blocks
        req = np.repeat(np.arange(self.num_requests, dtype=np.int64), np.diff(self.offsets))
        order = np.lexsort((np.arange(n), self.keys))  # by key, then position
        nxt = np.full(n, self.num_requests, dtype=np.int64)
        same = self.keys[order[1:]] == self.keys[order[:-1]]
        nxt[order[:-1][same]] = req[order[1:][same]]
        return nxt

    @cached_property
    def request_of(self) -> np.ndarray:
        return np.repeat(np.arange(self.num_requests, dtype=np.int64), np.diff(self.offsets))

    @cached_property
    def cum_fill(self) -> np.ndarray:
        out = np.zeros(self.num_blocks + 1, dtype=np.int64)
        np.cumsum(self.fill, out=out[1:])
        return out

    def describe(self) -> dict[str, Any]:
        unique = self.num_keys
        return {
            "source": self.source,
            "kind": self.kind,
            "block_size": self.block_size,
            "requests": self.num_requests,
            "blocks": self.num_blocks,
            "distinct_blocks": unique,
            "max_hit_rate": round(1 - unique / self.num_blocks, 4) if self.num_blocks else 0.0,
            "prompt_tokens": int(self.prompt_tokens.sum()),
            "block_tokens": int(self.fill.sum()),
        }


def _tree(keys: np.ndarray, offsets: np.ndarray, num_keys: int) -> tuple[np.ndarray, np.ndarray]:
    """parent and depth of every key from the chains (consistent by construction: keys name prefixes)."""
    parent = np.full(num_keys, -1, dtype=np.int64)
    depth = np.zeros(num_keys, dtype=np.int64)
    pos = np.arange(len(keys), dtype=np.int64)
    start = np.repeat(offsets[:-1], np.diff(offsets))
    j = pos - start
    inner = j > 0
    parent[keys[inner]] = keys[pos[inner] - 1]
    depth[keys] = j
    return parent, depth


def from_mooncake(trace: MooncakeTrace, source: str | None = None) -> BlockAccesses:
    """A Mooncake trace as given: its ids, 512-token blocks, the partial last block included."""
    order = np.argsort(trace.timestamp_ms, kind="stable")  # arrival order, file order among equal times
    lengths = np.diff(trace.offsets)[order]
    offsets = np.zeros(len(order) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    gather = np.concatenate([np.arange(trace.offsets[i], trace.offsets[i + 1]) for i in order.tolist()])
    raw = trace.hash_ids[gather]
    fill = trace.block_fill()[gather]
    _, keys = np.unique(raw, return_inverse=True)
    keys = keys.astype(np.int64).ravel()
    parent, depth = _tree(keys, offsets, int(keys.max()) + 1 if len(keys) else 0)
    return BlockAccesses(
        source=source or trace.path.name,
        kind="mooncake",
        block_size=trace.block_tokens,
        request_ids=[f"mc{i}" for i in order.tolist()],
        arrival_s=trace.timestamp_ms[order] / 1000.0,
        offsets=offsets,
        keys=keys,
        fill=fill.astype(np.int64),
        prompt_tokens=trace.input_length[order].astype(np.int64),
        parent=parent,
        depth=depth,
    )


def from_requests(requests: Sequence[Request], block_size: int, source: str = "workload") -> BlockAccesses:
    """A kvscope workload's prompts, full blocks of `block_size` tokens keyed as vLLM hashes them (content + parent).
    Requests are taken in arrival order (stable)."""
    if block_size < 1:
        raise ValueError(f"--block-size: must be a positive integer, got {block_size}")
    reqs = sorted(requests, key=lambda r: r.arrival)
    index: dict[Any, int] = {}
    keys: list[int] = []
    lengths: list[int] = []
    for r in reqs:
        full = r.prompt_len // block_size
        parent = -1
        blocks = r.prompt_blocks
        if blocks is not None and blocks.size % block_size == 0:
            per = blocks.size // block_size
            ids = blocks.ids
            for j in range(full):
                parent = index.setdefault((parent, ids[j // per], j % per), len(index))
                keys.append(parent)
        elif full:
            data = r.prompt_tokens().astype("<i8").tobytes()
            step = 8 * block_size
            for j in range(full):
                digest = hashlib.blake2b(data[j * step : (j + 1) * step], digest_size=16).digest()
                parent = index.setdefault((parent, digest), len(index))
                keys.append(parent)
        lengths.append(full)
    offsets = np.zeros(len(reqs) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    key_arr = np.asarray(keys, dtype=np.int64)
    parent_arr, depth = _tree(key_arr, offsets, len(index))
    return BlockAccesses(
        source=source,
        kind="workload",
        block_size=block_size,
        request_ids=[r.id for r in reqs],
        arrival_s=np.asarray([r.arrival for r in reqs], dtype=np.float64),
        offsets=offsets,
        keys=key_arr,
        fill=np.full(len(key_arr), block_size, dtype=np.int64),
        prompt_tokens=np.asarray([r.prompt_len for r in reqs], dtype=np.int64),
        parent=parent_arr,
        depth=depth,
    )


def is_mooncake_file(path: str | os.PathLike) -> bool:
    """Whether a file's first request line is a Mooncake request (has hash_ids) rather than a kvscope one."""
    p = Path(path)
    if not p.is_file():
        return False
    with p.open("rb") as f:
        for raw in f:
            if raw.strip():
                try:
                    row = json.loads(raw)
                except ValueError:
                    return False
                return isinstance(row, dict) and "hash_ids" in row
    return False


def load_accesses(source: str, block_size: int | None = None, requests: int | None = None) -> BlockAccesses:
    """A Mooncake trace file (block size 512), or a kvscope workload (a file or a named generator; block size
    `block_size`, default 16); the first `requests` requests if given."""
    if is_mooncake_file(source):
        if block_size is not None and block_size != BLOCK_TOKENS:
            raise ValueError(
                f"--block-size {block_size}: a Mooncake trace's blocks are {BLOCK_TOKENS} tokens; to replay it at "
                f"another block size, convert it first (kvscope workload import mooncake {source} -o W.jsonl)"
            )
        return from_mooncake(load_mooncake(source, limit=requests), Path(source).name)
    from kvscope.workload_gen import resolve_workload

    reqs, desc = resolve_workload(source, requests=requests)
    return from_requests(reqs, DEFAULT_BLOCK_SIZE if block_size is None else block_size, str(desc.get("name", source)))


def from_chains(
    chains: Sequence[Sequence[int]], arrival_s: Sequence[float] | None = None, block_size: int = 1
) -> BlockAccesses:
    """Hand-made accesses (tests, notebooks): each request a chain of block names (any ints), in arrival order.
    A name must always follow the same name (keys name prefixes)."""
    index: dict[int, int] = {}
    parent_of: dict[int, int] = {}
    keys: list[int] = []
    for r, chain in enumerate(chains):
        before = -1
        for name in chain:
            k = index.setdefault(int(name), len(index))
            if parent_of.setdefault(k, before) != before:
                raise ValueError(f"request {r}: block {name} follows another block than before; names must be prefixes")
            keys.append(k)
            before = k
    offsets = np.zeros(len(chains) + 1, dtype=np.int64)
    np.cumsum([len(c) for c in chains], out=offsets[1:])
    key_arr = np.asarray(keys, dtype=np.int64)
    parent, depth = _tree(key_arr, offsets, len(index))
    arrivals = np.arange(len(chains), dtype=np.float64) if arrival_s is None else np.asarray(arrival_s, dtype=float)
    return BlockAccesses(
        source="chains",
        kind="chains",
        block_size=block_size,
        request_ids=[f"r{i}" for i in range(len(chains))],
        arrival_s=arrivals,
        offsets=offsets,
        keys=key_arr,
        fill=np.full(len(key_arr), block_size, dtype=np.int64),
        prompt_tokens=np.asarray([len(c) * block_size for c in chains], dtype=np.int64),
        parent=parent,
        depth=depth,
    )
