"""Block books for an engine kvscope only watches: the block tables it exposes, turned into kvscope's block events
and running totals of what the blocks hold.

A hooked engine (HF transformers' paged cache) keeps block tables and reference counts but no per-block token
fill; kvscope's books need one (used bytes are tokens actually held). So the ledger keeps a shadow of every
sequence's block table: after each engine call that may change a table, `sync(seq, table)` compares the two
position by position and emits BLOCK_FREE for a block that left a position, then BLOCK_ALLOC (a block no one holds
and not in the prefix cache), BLOCK_SHARE (held by others, or cached-idle and revived) or BLOCK_COW (a copy the
engine made of another block) for the block that took it. Token fill follows the sequence's APPENDs (`append`), a
shared cached block being full. Totals are O(1) to read, so the in-step peaks can be noted after any operation.

Tokens a sequence holds (and the prefill / decode split) are the instrument Run's; the ledger only adds which
blocks they sit in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from kvscope.instrument import Run


class BlockLedger:
    def __init__(self, run: Run, num_blocks: int, block_size: int) -> None:
        self.run = run
        self.bs = block_size
        self.num_blocks = num_blocks
        self.tables: dict[int, list[int]] = {}  # seq -> its block table, as last synced
        self.holders: list[set[int]] = [set() for _ in range(num_blocks)]
        self.fill = [0] * num_blocks  # tokens in the block (kept while it is cached-idle: it still holds them)
        self.hashed = [False] * num_blocks  # in the prefix cache
        self.counted: dict[int, int] = {}  # seq -> its tokens in `logical` (resident sequences only)
        self.cached_prefix: dict[int, int] = {}  # seq -> leading table positions known to be in the prefix cache
        # Running totals, in blocks or tokens.
        self.active = 0  # blocks with a holder
        self.used = 0  # tokens in active blocks, each block once
        self.empty = 0  # active blocks holding no token yet (taken ahead of the tokens that will fill them)
        self.cached_idle = 0  # blocks with no holder, in the prefix cache
        self.logical = 0  # tokens of resident sequences, without sharing

    # ---- tables ---------------------------------------------------------------------------------------------------
    def sync(self, seq: int, table: Sequence[int], copies: Mapping[int, int] | None = None) -> None:
        """Bring the shadow table of `seq` to `table`, emitting the block events between them; `copies` maps a block
        the engine filled by copying (a fork's copy of a partly filled block) to its source."""
        old = self.tables.get(seq, [])
        new = list(table)
        if old == new:
            return
        copies = copies or {}
        common = min(len(old), len(new))
        changed = [i for i in range(common) if old[i] != new[i]]
        for i in changed:  # a block replaced in place (the engine deduplicated it against a cached one)
            self._release(seq, old[i])
            self._acquire(seq, new[i], i, copies.get(new[i]))
        for i in range(len(new), len(old)):
            self._release(seq, old[i])
        if not old and new:
            self.counted[seq] = self.run.held(seq)
            self.logical += self.counted[seq]
        for i in range(len(old), len(new)):
            self._acquire(seq, new[i], i, copies.get(new[i]))
        if new:
            self.tables[seq] = new
            self.cached_prefix[seq] = min(self.cached_prefix.get(seq, 0), changed[0] if changed else len(new))
        else:
            self.tables.pop(seq, None)
            self.cached_prefix.pop(seq, None)
            self.logical -= self.counted.pop(seq, 0)

    def _acquire(self, seq: int, block: int, index: int, source: int | None) -> None:
        holders = self.holders[block]
        if source is not None:
            self.run.block_cow(seq, block, source, index)
            holders.clear()
            self.hashed[block] = False
            self._activate(block, self.fill[source])
        elif not holders and not self.hashed[block]:
            self.run.block_alloc(seq, block, index)
            self._activate(block, 0)
        else:
            if not holders:  # cached-idle, revived
                self.cached_idle -= 1
                self._activate(block, self.fill[block])
            self.run.block_share(seq, block, index, ref=len(holders) + 1)
        holders.add(seq)

    def _activate(self, block: int, fill: int) -> None:
        self.active += 1
        self.fill[block] = fill
        self.used += fill
        self.empty += fill == 0

    def _release(self, seq: int, block: int) -> None:
        holders = self.holders[block]
        holders.discard(seq)
        self.run.block_free(seq, block, ref=len(holders))
        if holders:
            return
        self.active -= 1
        self.used -= self.fill[block]
        self.empty -= self.fill[block] == 0
        if self.hashed[block]:
            self.cached_idle += 1
        else:
            self.fill[block] = 0

    # ---- the prefix cache -----------------------------------------------------------------------------------------
    def cache(self, seq: int, block: int, block_hash: int) -> None:
        """The block (full, held by `seq`) entered the prefix cache."""
        self.run.block_cache(seq, block, block_hash)
        self.hashed[block] = True

    def evict(self, block: int, block_hash: int) -> None:
        """A cached-idle block left the prefix cache: free."""
        self.run.block_evict(block, block_hash)
        if self.hashed[block] and not self.holders[block]:
            self.cached_idle -= 1
            self.fill[block] = 0
        self.hashed[block] = False

    def is_cached(self, block: int) -> bool:
        return self.hashed[block]

    # ---- tokens ---------------------------------------------------------------------------------------------------
    def append(self, seq: int, tokens: int) -> None:
        """APPEND `tokens` to `seq` (the Run's books) and fill the blocks they land in."""
        before = self.run.held(seq)
        self.run.append(seq, tokens)
        self._fill(seq, before, before + tokens)
        if seq in self.counted:
            self.counted[seq] += tokens
            self.logical += tokens

    def prefix_hit(self, seq: int, tokens: int) -> None:
        """PREFIX_HIT: `seq` starts holding `tokens` served from its shared cached blocks (already full)."""
        self.run.prefix_hit(seq, tokens)
        if seq in self.counted:
            self.logical += tokens - self.counted[seq]
            self.counted[seq] = tokens

    def refill(self, seq: int) -> None:
        """The sequence's tokens were copied back into its (new) blocks: a swap-in."""
        self._fill(seq, 0, self.run.held(seq))

    def _fill(self, seq: int, start: int, end: int) -> None:
        table = self.tables.get(seq, [])
        bs = self.bs
        for i in range(start // bs, min(len(table), -(-end // bs))):
            block = table[i]
            tokens = min(bs, end - i * bs)
            if tokens > self.fill[block]:
                self.empty -= self.fill[block] == 0
                self.used += tokens - self.fill[block]
                self.fill[block] = tokens
