"""Row filters for the events page (no streamlit here: plain functions, tested on their own)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd

MAX_ID_RANGE = 1_000_000  # a range like 0-1e12 would build a huge set: refuse it


def parse_id_list(text: str) -> list[int] | None:
    """'3, 7-9' -> [3, 7, 8, 9]; empty text -> None (no filter). Raises ValueError naming the bad part."""
    text = (text or "").strip()
    if not text:
        return None
    ids: set[int] = set()
    for part in text.replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        lo_text, sep, hi_text = part.partition("-") if not part.startswith("-") else (part, "", "")
        try:
            lo = int(lo_text)
            hi = int(hi_text) if sep else lo
        except ValueError:
            raise ValueError(f"sequences: {part!r} is not a sequence id or a range like 7-9") from None
        if hi < lo:
            raise ValueError(f"sequences: range {part!r} ends before it starts")
        if hi - lo >= MAX_ID_RANGE:
            raise ValueError(f"sequences: range {part!r} is wider than {MAX_ID_RANGE:,} ids")
        ids.update(range(lo, hi + 1))
    return sorted(ids)


def filter_events(
    events: pd.DataFrame,
    *,
    kinds: Iterable[str] | None = None,
    seqs: Iterable[int] | None = None,
    steps: tuple[int, int] | None = None,
) -> pd.DataFrame:
    """Rows whose kind is in `kinds`, seq in `seqs`, and step within `steps` (inclusive); None or empty kinds
    means no filter on that column. Events outside steps (step -1) are kept only when no step range is given.
    With no filter at all, `events` itself comes back (not a copy: read it, do not modify it)."""
    # Masks over numpy arrays, one per given filter: a big trace has tens of millions of rows, so nothing is built
    # for a filter that is not given (and the kind test compares the category codes, not a string per row).
    keep: np.ndarray | None = None
    kinds = list(kinds or [])
    if kinds:
        keep = _and(keep, _kind_mask(events["kind"], kinds))
    if seqs is not None:
        keep = _and(keep, events["seq"].isin(list(seqs)).to_numpy())
    if steps is not None:
        lo, hi = steps
        step = events["step"].to_numpy()
        keep = _and(keep, (step >= lo) & (step <= hi))
    return events if keep is None else events[keep]


def _and(keep: np.ndarray | None, more: np.ndarray) -> np.ndarray:
    return more if keep is None else keep & more


def _kind_mask(kind: pd.Series, kinds: list[str]) -> np.ndarray:
    if isinstance(kind.dtype, pd.CategoricalDtype):
        wanted = np.flatnonzero(kind.cat.categories.astype(str).isin(kinds))
        return np.isin(kind.cat.codes.to_numpy(), wanted)
    return kind.astype(str).isin(kinds).to_numpy()
