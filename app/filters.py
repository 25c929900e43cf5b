"""Row filters for the events page (no streamlit here: plain functions, tested on their own)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd

from kvscope.events import COLUMNS

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


HEAD_PIECE = 1 << 16  # rows read at a time while looking for the first matching rows


def filter_trace(
    trace,
    *,
    kinds: Iterable[str] | None = None,
    seqs: Iterable[int] | None = None,
    steps: tuple[int, int] | None = None,
    limit: int | None = None,
) -> tuple[int, pd.DataFrame]:
    """(how many events match, the first `limit` of them, every one when None): filter_events(trace.events, ...)
    with a fresh index, read from the trace's store instead, so that the DataFrame of every event (gigabytes for a
    big trace) is never built. The count takes each kind's own columns; the rows, the store's pieces in row
    order, up to `limit`."""
    store = trace.store
    present = np.flatnonzero(store.counts).tolist()
    if any(int(store.lookup[k]) < 0 for k in present):  # a kind this kvscope does not know: the frame's way
        matched = filter_events(trace.events, kinds=kinds, seqs=seqs, steps=steps)
        head = matched if limit is None else matched.head(limit)
        return len(matched), head.reset_index(drop=True)
    wanted_names = set(kinds or [])
    wanted = [k for k in present if not wanted_names or store.names[k] in wanted_names]
    seq_list = None if seqs is None else np.asarray(sorted(set(seqs)), np.int64)

    def keep(values: dict[str, np.ndarray]) -> np.ndarray | None:
        mask: np.ndarray | None = None
        if seq_list is not None:
            mask = _and(mask, np.isin(values["seq"], seq_list))
        if steps is not None:
            step = values["step"]
            mask = _and(mask, (step >= steps[0]) & (step <= steps[1]))
        return mask

    total = 0
    for k in wanted:
        columns = {c: store.values(c, [int(store.lookup[k])]) for c in ("seq", "step") if _needs(c, seq_list, steps)}
        mask = keep(columns)
        total += int(store.counts[k]) if mask is None else int(mask.sum())
    codes = {int(store.lookup[k]): k for k in wanted}  # Kind value -> the store's dictionary position
    pieces: list[pd.DataFrame] = []
    got = 0
    size = HEAD_PIECE if limit is not None and limit < HEAD_PIECE else 1 << 21
    for piece in store.pieces(list(codes), [c for c in COLUMNS if c != "kind"], size=size):
        mask = keep(piece)
        rows = np.flatnonzero(mask) if mask is not None else np.arange(len(piece["code"]))
        if limit is not None:
            rows = rows[: limit - got]
        if len(rows):
            pieces.append(_frame(store, codes, piece, rows))
            got += len(rows)
        if limit is not None and got >= limit:
            break
    if not pieces:
        return total, _frame(store, codes, {c: np.zeros(0, np.int64) for c in ["code", *COLUMNS]}, np.zeros(0, int))
    return total, pd.concat(pieces, ignore_index=True) if len(pieces) > 1 else pieces[0]


def _needs(column: str, seqs: np.ndarray | None, steps: tuple[int, int] | None) -> bool:
    return (column == "seq" and seqs is not None) or (column == "step" and steps is not None)


def _frame(store, codes: dict[int, int], piece: dict[str, np.ndarray], rows: np.ndarray) -> pd.DataFrame:
    """These rows of a store piece as the events frame has them: its columns, dtypes and kind categories."""
    position = np.zeros(max([*codes, 0]) + 2, np.int16)
    for value, k in codes.items():
        position[value] = k
    data: dict[str, object] = {}
    for name in COLUMNS:
        if name == "kind":
            data[name] = pd.Categorical.from_codes(position[piece["code"][rows]], categories=store.names)
        else:
            data[name] = piece[name][rows].astype(store.dtypes[name])
    return pd.DataFrame(data)
