"""What the demo is doing, on stderr: bars and a status line on a terminal, a plain line per stage otherwise.

A full run takes minutes and its first seconds go to writing shards and starting worker processes (each
imports torch), during which no bar can move; a log file or CI output gets no bars at all. So every stage
says what it starts, with the time since the start: on a terminal in a status line above the bars, elsewhere
as one line each.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any, Callable, Optional

from tqdm.auto import tqdm

__all__ = ["Progress"]


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class Progress:
    """The demo's progress report.

    Args:
        enabled: ``None``: bars and a status line when ``stream`` is a terminal, one plain line per stage
            otherwise (``demo: <stage> [<seconds since start> s]``); ``True``: bars and status line;
            ``False``: nothing.
        stream: where to write; default ``sys.stderr`` as it is when the object is made.
        clock: seconds, for the elapsed time.

    Example::

        progress = Progress()
        progress.stage("writing shards")  # "demo: writing shards [0.0 s]" when stderr is a file or a pipe
        progress.start_bars({"update": (54, "run")})
        progress.event("update", seed=0)  # one bar step (nothing without a terminal)
        progress.event("stage", seed=0, text="done")  # "demo: seed 0: done [12.3 s]"
        progress.close()
    """

    def __init__(self, enabled: Optional[bool] = None, *, stream: Optional[IO[str]] = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.stream: IO[str] = sys.stderr if stream is None else stream
        if enabled is False:
            self.mode = "off"
        elif enabled or _isatty(self.stream):
            self.mode = "bars"
        else:
            self.mode = "lines"
        self._clock = clock
        self._start = clock()
        self._status: Any = None
        self._bars: dict[str, Any] = {}

    @property
    def bars(self) -> bool:
        """Whether bars are shown (nested readers such as the shard reader follow this)."""
        return self.mode == "bars"

    def elapsed(self) -> float:
        """Seconds since the object was made."""
        return self._clock() - self._start

    def stage(self, message: str) -> None:
        """A stage starts: a plain line, or the status line's new text."""
        if self.mode == "lines":
            print(f"demo: {message} [{self.elapsed():.1f} s]", file=self.stream, flush=True)
        elif self.mode == "bars":
            if self._status is None:
                self._status = tqdm(desc=message, bar_format="demo: {desc} [{elapsed}]", position=0, leave=False,
                                    file=self.stream, disable=False)
            else:
                self._status.set_description_str(message, refresh=True)

    def start_bars(self, totals: dict[str, tuple[int, str]]) -> None:
        """One bar per kind of event, ``{kind: (total, unit)}``, below the status line (bars mode only)."""
        if self.mode != "bars":
            return
        for i, (kind, (total, unit)) in enumerate(totals.items(), start=1):
            self._bars[kind] = tqdm(total=total, desc=f"{kind:<8}", unit=unit, position=i, leave=False,
                                    file=self.stream, disable=False)

    def event(self, kind: str, seed: int, text: str = "") -> None:
        """A report from one seed's run: ``kind == "stage"`` is a stage (``text`` says which), any other kind
        is one step of that kind's bar."""
        if kind == "stage":
            self.stage(f"seed {seed}: {text}")
        elif kind in self._bars:
            self._bars[kind].update(1)

    def close(self) -> None:
        """Remove the bars and the status line (a terminal keeps only what the run prints after)."""
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()
        if self._status is not None:
            self._status.close()
            self._status = None
