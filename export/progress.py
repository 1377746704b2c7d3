"""Progress reporting that reads well both on a terminal and in a CI log.

tqdm redraws its bar with carriage returns; on a terminal that is one live
line, but in a log file every redraw is kept, so one epoch becomes hundreds of
lines. Bars are therefore drawn only when stderr is a terminal; the callers
print one summary line per stage (an epoch, a dataset, an evaluation) either
way, so a log still shows every stage exactly once.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Iterable, TextIO

from tqdm.auto import tqdm


def on_terminal(stream: TextIO | None = None) -> bool:
    """True when ``stream`` (default stderr) is attached to a TTY and bars are not turned off.

    IMGSERVE_NO_BARS=1 turns them off: parallel builds (export/build_jobs.py) share one terminal.
    """
    if os.environ.get("IMGSERVE_NO_BARS") == "1":
        return False
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or replaced streams (pytest capture, pipes)
        return False


def progress_bar(iterable: Iterable[Any] | None = None, *, enabled: bool = True, **kwargs: Any) -> Any:
    """A tqdm bar when ``enabled`` and stderr is a terminal; otherwise a silent pass-through with the same API."""
    return tqdm(iterable, disable=not (enabled and on_terminal()), **kwargs)


def stage_line(message: str, *, enabled: bool = True) -> None:
    """One summary line for a finished stage, on stderr (flushed, so logs interleave correctly)."""
    if enabled:
        print(message, file=sys.stderr, flush=True)
