"""Progress of long loops: a tqdm bar on a terminal, a few plain log lines otherwise.

tqdm writes carriage returns; in a log file (CI, ``> run.log``) every refresh lands on one
ever-growing line. When stderr is not a terminal, a loop instead logs at most ten lines
(``desc: 30/300 step (10%) 12.3 s loss=0.412``), none closer than ``quiet`` seconds apart,
and a last one with the total time: loops shorter than ``quiet`` seconds print nothing.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator

from tqdm.auto import tqdm
from transformers.utils import logging as hf_logging

log = logging.getLogger("deepsurgery")


class PlainProgress:
    """The subset of tqdm's interface the trainer uses, as log lines."""

    def __init__(
        self, iterable: Iterable, desc: str, unit: str, lines: int = 10, quiet: float = 10.0
    ):
        self.iterable, self.desc, self.unit = iterable, desc, unit
        try:
            self.total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            self.total = None
        self.every = max(1, (self.total or 0) // lines) if self.total else 0
        self.postfix = ""
        self.count = 0
        self.quiet = quiet
        self.started = self.last = time.perf_counter()

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.count += 1
            if self.every and self.count % self.every == 0 and self.count < self.total:
                if time.perf_counter() - self.last >= self.quiet:
                    self._line()

    def _line(self, final: bool = False) -> None:
        self.last = time.perf_counter()
        elapsed = self.last - self.started
        done = f"{self.count}/{self.total}" if self.total else str(self.count)
        share = f" ({100 * self.count / self.total:.0f}%)" if self.total else ""
        tail = f" {self.postfix}" if self.postfix else ""
        state = "done in " if final else ""
        log.info("%s: %s %s%s %s%.1f s%s", self.desc, done, self.unit, share, state, elapsed, tail)

    def set_postfix(self, **values) -> None:
        self.postfix = " ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if time.perf_counter() - self.started >= self.quiet:  # long loops only
            self._line(final=True)


def progress(iterable: Iterable, desc: str, unit: str = "it", **kwargs):
    """tqdm on a terminal; :class:`PlainProgress` log lines when stderr is not a TTY."""
    if sys.stderr.isatty():
        return tqdm(iterable, desc=desc, unit=unit, leave=False, mininterval=0.1, **kwargs)
    return PlainProgress(iterable, desc, unit)


def quiet_libraries() -> None:
    """Offline hub, no tokenizer thread warnings, no transformers progress bars or notices."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
