"""What the surfaces show for a parallel run's ranks: the section's title and caption and its rows, formatted from
kvscope.analysis.ranks.group_summary (nothing is computed here)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kvscope.units import format_bytes

TITLE = "Ranks"
CAPTION = (
    "One bar per rank: its KV memory stack at the end of the step where the ranks' used bytes summed are highest "
    "(diamond: the rank's peak used at any instant). Under tensor parallelism every rank holds every token for its "
    "own KV heads (copies of a head when TP exceeds the KV heads); under decode context parallelism the ranks that "
    "hold copies of a head split the tokens round-robin (token i on DCP rank i mod dcp)."
)
FIGURE_TITLE = "KV memory per rank"
DCP_NOTE = (
    "Under DCP a rank's trace counts each sequence's tokens as the rank holds them: its memory views are exact, while "
    "its generated tokens, tokens/s, time per output token and recomputed tokens describe its share, not the group's."
)


def section_title(summary: Mapping[str, Any]) -> str:
    tp, dcp = summary["tp"], summary["dcp"]
    return f"{TITLE}: TP {tp}" + (f" x DCP {dcp}" if dcp > 1 else "") + f", {summary['world_size']} ranks"


def group_rows(summary: Mapping[str, Any]) -> list[tuple[str, str]]:
    caps = summary["capacity_tokens"]
    per_rank = f"{min(caps):,}" if len(set(caps)) == 1 else f"{min(caps):,} .. {max(caps):,}"
    recorded = summary.get("capacity_tokens_total_recorded")
    total = f"{summary['capacity_tokens_total']:,}"
    if isinstance(recorded, int) and recorded != summary["capacity_tokens_total"]:
        total += f" (the run recorded {recorded:,})"
    rows = [
        ("world size (ranks)", f"{summary['world_size']:,}"),
        ("tensor parallel", f"{summary['tp']:,}"),
        ("decode context parallel", f"{summary['dcp']:,}"),
        ("KV heads per rank", f"{summary['kv_heads_per_rank']:,} of {summary['kv_heads_total']:,}"),
        ("KV duplication (ranks holding each token of a head)", f"{summary['kv_duplication']:,}x"),
        ("token slots per rank", per_rank),
        ("tokens of context the group holds", total),
        ("peak used, largest rank", format_bytes(summary["peak_used_bytes_max"])),
        ("peak used, all ranks", format_bytes(summary["peak_used_bytes_total"])),
        ("imbalance (largest rank's peak used / mean - 1)", f"{100 * summary['imbalance']:.2f}%"),
    ]
    return rows


__all__ = ["CAPTION", "DCP_NOTE", "FIGURE_TITLE", "TITLE", "group_rows", "section_title"]
