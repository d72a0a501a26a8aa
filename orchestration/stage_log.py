"""A stage's log file: its log records and, line by line, what it printed to the console.

    with stage_log(run_dir.log_path("pretrain")):
        ...   # logging at INFO and up, print(), Ray workers' output relayed by the driver, tqdm's last state

Ray prints its workers' output through the driver's current `sys.stdout` / `sys.stderr`, so while a
stage runs both are wrapped: the console gets everything as before, the log gets each finished line
(a progress bar's final state, not each redraw; no colour codes) with a timestamp.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class _LineTee:
    """Writes through to `stream`; hands each finished line (after its last carriage return) to `emit`."""

    def __init__(self, stream: TextIO, emit: Any) -> None:
        self._stream, self._emit = stream, emit
        self._pending = ""
        self._lock = threading.Lock()  # Ray relays worker output from its own thread

    def write(self, text: str) -> int:
        written = self._stream.write(text)
        with self._lock:
            *lines, self._pending = (self._pending + text).split("\n")
        for line in lines:
            line = _ANSI.sub("", line.rsplit("\r", 1)[-1]).rstrip()
            if line:
                self._emit(line)
        return written

    def flush(self) -> None:
        self._stream.flush()

    def finish(self) -> None:
        """The last line, if the stage left one unfinished."""
        with self._lock:
            pending, self._pending = self._pending, ""
        if pending:
            self.write(pending + "\n")

    def __getattr__(self, name: str) -> Any:  # encoding, isatty, fileno, ... as the console has them
        return getattr(self._stream, name)


@contextmanager
def stage_log(path: Path) -> Iterator[logging.Handler]:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)

    def to_file(name: str):  # this handler only: the console has the line already
        logger = logging.getLogger(name)
        return lambda line: handler.handle(logger.makeRecord(name, logging.INFO, "", 0, line, None, None))

    stdout, stderr = sys.stdout, sys.stderr
    tees = _LineTee(stdout, to_file("stdout")), _LineTee(stderr, to_file("stderr"))
    sys.stdout, sys.stderr = tees
    try:
        yield handler
    finally:
        sys.stdout, sys.stderr = stdout, stderr
        for tee in tees:
            tee.finish()
        root.removeHandler(handler)
        handler.close()
