"""Where each rank's KV lives under tensor parallelism (TP) and decode context parallelism (DCP): pure arithmetic.

Tensor parallelism over `tp` ranks (vLLM's rule): the KV heads are split evenly when tp divides them (rank r holds
heads r*h .. r*h+h-1, h = kv_heads / tp), and replicated when tp is a multiple of them (each rank holds one head,
head r // (tp / kv_heads), so tp / kv_heads consecutive ranks hold copies of the same head); anything else is refused,
as vLLM refuses it. The query heads must split evenly too.

Decode context parallelism reuses the TP ranks, as vLLM's does (`--dcp` does not add GPUs): the TP group is cut into
tp / dcp groups of dcp consecutive ranks; the ranks of one DCP group hold the same heads and split the tokens
round-robin, token i of every sequence on DCP rank i mod dcp. So dcp must divide the copies of a head
(tp / kv_heads): DCP turns duplicated KV into more context, it cannot split heads that are not duplicated
(vLLM: dcp <= tp / kv_heads for GQA models, dcp <= tp for MLA's single latent head).

Duplication factor = ranks holding each token's K/V for a given head = (tp / kv_heads) / dcp when heads are
replicated, else 1. Capacity in tokens of context the group holds: under TP every rank holds every token, so the
smallest rank's token slots; under DCP the ranks of a DCP group hold disjoint tokens, so the sum over the group's
ranks (the smallest such sum over groups).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from kvscope.errors import UserError
from kvscope.spec import KVSpec

MAX_RANKS = 1024  # as kvscope.plan's --tp bound: far beyond any deployment, a typo guard


@dataclass(frozen=True)
class ParallelConfig:
    """What the user asked for: `kvscope run --tp T --dcp D` (--dcp alone means --tp D)."""

    tp: int = 1
    dcp: int = 1

    @property
    def world_size(self) -> int:
        return self.tp

    @property
    def parallel(self) -> bool:
        return self.tp > 1


def parallel_config(tp: int | None, dcp: int | None) -> ParallelConfig:
    """The config from the command line's --tp / --dcp (None: not given); one-line UserError for a bad count."""
    for flag, value in (("--tp", tp), ("--dcp", dcp)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_RANKS):
            raise UserError(f"{flag}: must be an integer in 1..{MAX_RANKS:,}, got {value!r}")
    d = dcp or 1
    t = tp if tp is not None else d
    if t % d:
        raise UserError(
            f"--dcp {d}: must divide --tp {t} (decode context parallelism reuses the tensor-parallel ranks, as vLLM's)"
        )
    return ParallelConfig(tp=t, dcp=d)


@dataclass(frozen=True)
class RankLayout:
    """The ranks of one TP (x DCP) group for one model: heads per rank, copies, token shares, per-rank KV spec."""

    model: KVSpec  # the whole model
    tp: int
    dcp: int
    kv_heads_per_rank: int
    replicas: int  # ranks holding each KV head (1 when heads are split)

    @property
    def world_size(self) -> int:
        return self.tp

    @property
    def duplication(self) -> int:
        """Ranks holding the K/V of one (token, head): the copies DCP leaves."""
        return self.replicas // self.dcp

    def heads(self, rank: int) -> tuple[int, ...]:
        """The model's KV head ids rank `rank` holds."""
        if self.replicas > 1:
            return (rank // self.replicas,)
        h = self.kv_heads_per_rank
        return tuple(range(rank * h, rank * h + h))

    def dcp_rank(self, rank: int) -> int:
        return rank % self.dcp

    def dcp_group(self, rank: int) -> int:
        return rank // self.dcp

    def rank_spec(self) -> KVSpec:
        """One rank's shard: its KV heads (what its KV memory holds per token) and, for the simulated clock, its
        share of the query heads, MLP and vocabulary (hidden size unchanged). Every rank's shard has this shape."""
        m = self.model
        if self.tp == 1:
            return m
        name = f"{m.name}/tp{self.tp}" + (f"/dcp{self.dcp}" if self.dcp > 1 else "")
        return replace(
            m,
            name=name,
            num_kv_heads=self.kv_heads_per_rank,
            num_q_heads=m.q_heads // self.tp,
            hidden_size=m.hidden,
            intermediate_size=-(-m.ffn // self.tp),
            vocab_size=-(-m.vocab_size // self.tp),
        )

    def rank_meta(self, rank: int) -> dict:
        """meta['parallel'] of rank `rank`'s trace (the group's capacity is added once the allocators exist)."""
        return {
            "rank": rank,
            "world_size": self.tp,
            "tp": self.tp,
            "dcp": self.dcp,
            "dcp_rank": self.dcp_rank(rank),
            "dcp_group": self.dcp_group(rank),
            "kv_heads_total": self.model.num_kv_heads,
            "kv_heads_per_rank": self.kv_heads_per_rank,
            "kv_heads": list(self.heads(rank)),
            "kv_replicas": self.replicas,
            "kv_duplication": self.duplication,
            "model_spec": self.model.to_dict(),
        }


def plan_layout(model: KVSpec, config: ParallelConfig) -> RankLayout:
    """The layout of `config` for `model`, or one-line UserError when the model's heads cannot be placed so."""
    tp, dcp = config.tp, config.dcp
    kv, q = model.num_kv_heads, model.q_heads
    if kv % tp == 0:
        per, replicas = kv // tp, 1
    elif tp % kv == 0:
        per, replicas = 1, tp // kv
    else:
        raise UserError(
            f"--tp {tp}: {model.name}'s {kv} KV heads neither split evenly over {tp} ranks nor replicate evenly "
            f"(vLLM needs kv heads % tp == 0 or tp % kv heads == 0)"
        )
    if q % tp:
        raise UserError(f"--tp {tp}: {model.name}'s {q} query heads do not split over {tp} ranks")
    if replicas % dcp:
        need = kv * dcp
        raise UserError(
            f"--dcp {dcp}: at --tp {tp} each of {model.name}'s {kv} KV heads is held by {replicas} rank(s); DCP "
            f"splits the tokens of a head's copies, so it needs --tp a multiple of kv heads x dcp = {need}"
        )
    return RankLayout(model=model, tp=tp, dcp=dcp, kv_heads_per_rank=per, replicas=replicas)


# ---- token shares (DCP: token i of a sequence on DCP rank i mod dcp) -----------------------------------------------


def share(n: int, d: int, dcp: int) -> int:
    """Positions among 0 .. n-1 that DCP rank d of `dcp` holds."""
    return (n - d + dcp - 1) // dcp if n > 0 else 0


def share_of_range(start: int, n: int, d: int, dcp: int) -> int:
    """Positions among start .. start+n-1 that DCP rank d holds."""
    return share(start + n, d, dcp) - share(start, d, dcp)


def first_offset(start: int, d: int, dcp: int) -> int:
    """Index, in a chunk that starts at position `start`, of DCP rank d's first position: its tokens are
    chunk[first_offset :: dcp]."""
    return (d - start) % dcp


# ---- capacity ----------------------------------------------------------------------------------------------------


def capacity_tokens_total(rank_tokens: list[int], dcp: int) -> int:
    """Tokens of context the group holds, from each rank's token slots (rank order): the smallest, over DCP groups of
    `dcp` consecutive ranks, of the group's sum (dcp 1: the smallest rank's slots, every rank holding every
    token)."""
    if not rank_tokens:
        return 0
    groups = [rank_tokens[i : i + dcp] for i in range(0, len(rank_tokens), dcp)]
    return min(sum(g) for g in groups)


__all__ = [
    "MAX_RANKS",
    "ParallelConfig",
    "RankLayout",
    "capacity_tokens_total",
    "first_offset",
    "parallel_config",
    "plan_layout",
    "share",
    "share_of_range",
]
