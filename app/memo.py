"""Figures the pages draw, built once per trace contents and shared by every session.

Whole-run figures: the fragmentation map samples the replayed state across the whole run (it took 10 s on a
50,000-request trace before the analysis learnt to sweep it), and its page used to rebuild it on every rerun; the
figure is kept here per trace and zoom window, whatever the analysis memoises itself.

Stepped figures (the block grid, block tables and sharing graph at one step): kept for the last few steps drawn,
and the next step (in the direction the slider last moved) is built in a background thread while the user
looks at the one on screen, so an arrow-key move finds its figures ready and costs only sending them to the browser.

Entries are keyed by LoadedTrace.cache_id (path + mtime + size, or an upload's digest), so a re-recorded file is
recomputed. The figures are the catalog's (kvscope.present.views): the dashboard draws what the report draws.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor

import plotly.graph_objects as go
import streamlit as st
from kvscope.app import state
from kvscope.app.state import LoadedTrace

from kvscope.present import views
from kvscope.present.views import View
from kvscope.trace import Trace

Window = tuple[int, int] | None  # an inclusive (first, last) range, None for all of it


# ---- the whole-run map ------------------------------------------------------------------------------------------
@st.cache_resource(max_entries=32, show_spinner=False)
def _fragmentation_map(cache_id: str, steps: Window, units: Window, _trace: Trace) -> go.Figure:
    # cache_id names the trace's contents; the figure is only read afterwards (st.plotly_chart serialises it).
    return views.fragmentation_map(_trace, steps, units)


def fragmentation_map(lt: LoadedTrace, steps: Window = None, units: Window = None) -> go.Figure:
    """The fragmentation map of `lt`, zoomed to `steps` x `units`, from the cache when it was drawn before."""
    with st.spinner("Drawing the whole-run map (it samples the replayed state across the run)…"):
        return _fragmentation_map(lt.cache_id, _window(steps), _window(units), lt.trace)


def _window(window: Window) -> Window:
    # Slider values come as tuples or lists of numpy or Python ints: one spelling, so equal windows share an entry.
    return None if window is None else (int(window[0]), int(window[1]))


# ---- figures at one step -----------------------------------------------------------------------------------------
class FigureCache:
    """The last `size` figures built, each a Future: a figure being built (by a page or by the prefetch thread) is
    built once, and whoever asks for it meanwhile waits for that build instead of starting another."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._items: OrderedDict[Hashable, Future[go.Figure]] = OrderedDict()

    def _claim(self, key: Hashable) -> tuple[Future[go.Figure], bool]:
        """(the entry for `key`, whether the caller created it and must build it)."""
        with self._lock:
            future = self._items.get(key)
            if future is not None:
                self._items.move_to_end(key)
                return future, False
            future = Future()
            self._items[key] = future
            while len(self._items) > self.size:
                self._items.popitem(last=False)
            return future, True

    def get(self, key: Hashable, build: Callable[[], go.Figure]) -> go.Figure:
        """The figure for `key`, built here (in the caller's thread) unless it is cached or being built."""
        future, mine = self._claim(key)
        if mine:
            self._build(key, future, build)
        return future.result()

    def prefetch(self, key: Hashable, build: Callable[[], go.Figure], worker: ThreadPoolExecutor) -> None:
        """Build the figure for `key` on `worker` unless it is cached or being built."""
        future, mine = self._claim(key)
        if mine:
            worker.submit(self._build, key, future, build)

    def _build(self, key: Hashable, future: Future[go.Figure], build: Callable[[], go.Figure]) -> None:
        try:
            future.set_result(build())
        except BaseException as e:
            # Not a figure: forget the entry, so that the next ask builds again (a MemoryError may not recur), and
            # hand the error to whoever waits on it (the page shows it as if it had built the figure itself).
            with self._lock:
                if self._items.get(key) is future:
                    del self._items[key]
            if isinstance(e, Exception):
                future.set_exception(e)
            else:  # KeyboardInterrupt, SystemExit: stop here
                future.cancel()
                raise

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._items


STEPPED = FigureCache(size=24)  # two stepped views x (the step drawn + the one prefetched) x a few pages and traces
# One thread: prefetches queue up behind each other and never replay the same trace twice at once.
PREFETCH = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvscope-prefetch")


def _key(lt: LoadedTrace, view: View, step: int) -> tuple[str, str, int]:
    return (lt.cache_id, view.key, int(step))


def stepped_figure(lt: LoadedTrace, view: View, step: int) -> go.Figure:
    """view.figure(lt.trace, step), from the cache when it was built (or prefetched) before."""
    return STEPPED.get(_key(lt, view, step), lambda: view.figure(lt.trace, int(step)))


def prefetch_steps(lt: LoadedTrace, stepped: Iterable[View], steps: Iterable[int]) -> None:
    """Build these views at these steps in the background (nearest first, as given), for the next slider move."""
    shown = [view for view in stepped if view.applies(lt.trace)]
    for step in steps:
        for view in shown:
            STEPPED.prefetch(_key(lt, view, step), _builder(lt.trace, view, int(step)), PREFETCH)


def _builder(trace: Trace, view: View, step: int) -> Callable[[], go.Figure]:
    return lambda: view.figure(trace, step)


def neighbours(step: int, previous: int | None, first: int, last: int) -> list[int]:
    """The step a slider move from `step` most likely lands on: one step on in the direction of the last move
    (`previous` -> `step`; forwards when unknown), if within [first, last]. Only that one: the prefetch competes
    with the page's own work for the interpreter, so building the step behind as well slowed the next move down."""
    ahead = -1 if previous is not None and previous > step else 1
    return [step + ahead] if first <= step + ahead <= last else []


def show_stepped(lt: LoadedTrace, view: View, key: str, step: int) -> None:
    """state.show_view for a stepped view, through the cache: the figure at `step` with its caption, or why the
    view does not apply."""
    if not view.applies(lt.trace):
        st.info(view.absent, icon="ℹ️")
        return
    st.caption(view.caption)
    state.show_figure(stepped_figure(lt, view, step), key=key)


def prefetch_around(lt: LoadedTrace, stepped: Iterable[View], step: int, *, slider: str) -> None:
    """After a stepped page part has drawn `step`: prefetch its views at the neighbouring steps. `slider` names the
    step slider (the direction of its last move is remembered in the session, per trace)."""
    memory = f"{slider}:shown:{lt.key}"
    previous = st.session_state.get(memory)
    st.session_state[memory] = int(step)
    first, last = state.step_bounds(lt)
    prefetch_steps(lt, stepped, neighbours(int(step), previous, first, last))
