"""Progress off a terminal: a few plain log lines, never carriage-return bars."""

import logging
import time

from trainer import progress as progress_module
from trainer.progress import PlainProgress, progress


def test_not_a_tty_gives_plain_lines(monkeypatch, caplog):
    monkeypatch.setattr(progress_module.sys.stderr, "isatty", lambda: False, raising=False)
    bar = progress(range(100), "fine-tune x", "step")
    assert isinstance(bar, PlainProgress)
    bar.quiet = 0.0  # every 10 % mark is due
    with caplog.at_level(logging.INFO, logger="deepsurgery"):
        for _ in bar:
            bar.set_postfix(loss="0.500")
        bar.close()
    lines = [r.getMessage() for r in caplog.records]
    assert 9 <= len(lines) <= 11  # about ten lines for a loop of any length
    assert lines[0].startswith("fine-tune x: 10/100 step (10%) ") and "loss=0.500" in lines[0]
    assert lines[-1].startswith("fine-tune x: 100/100 step (100%) done in ")
    assert not any("\r" in line for line in lines)


def test_short_loops_stay_silent(caplog):
    with caplog.at_level(logging.INFO, logger="deepsurgery"):
        bar = PlainProgress(range(50), "eval", "batch", quiet=60.0)
        for _ in bar:
            time.sleep(0)
        bar.close()
    assert caplog.records == []
