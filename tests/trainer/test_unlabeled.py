"""Where surgery's unlabeled inputs come from: test inputs, a fraction, another task, wild files."""

import pytest

from trainer.config import load_config
from trainer.data.tasks import load_task
from trainer.data.unlabeled import unlabeled_inputs
from trainer.errors import UserError


@pytest.fixture
def tasks(text_tasks):
    return [load_task(n, f"{{data}}/{n}", text_tasks) for n in ("animals", "colours")]


def _cfg(*overrides):
    return load_config("demo", list(overrides))


def test_default_is_each_tasks_own_test_inputs(tasks, text_tasks):
    pools = unlabeled_inputs(_cfg(), tasks, text_tasks)
    assert pools[0] == tasks[0].test.inputs and pools[1] == tasks[1].test.inputs


def test_fraction_keeps_a_seeded_subset(tasks, text_tasks):
    pools = unlabeled_inputs(_cfg("surgery.unlabeled_fraction=0.25"), tasks, text_tasks)
    assert [len(p) for p in pools] == [6, 6]
    assert set(pools[0]) <= set(tasks[0].test.inputs)
    again = unlabeled_inputs(_cfg("surgery.unlabeled_fraction=0.25"), tasks, text_tasks)
    assert again == pools


def test_another_tasks_inputs_and_wild_files(tasks, text_tasks, tmp_path):
    pools = unlabeled_inputs(_cfg("surgery.unlabeled='task:colours'"), tasks, text_tasks)
    assert pools[0] == tasks[1].test.inputs
    wild = tmp_path / "wild.txt"
    wild.write_text("one wild line\n\nanother wild line\n")
    pools = unlabeled_inputs(_cfg(f"surgery.unlabeled='{wild}'"), tasks, text_tasks)
    assert pools == [["one wild line", "another wild line"]] * 2
    with pytest.raises(UserError, match="no task named 'nope'"):
        unlabeled_inputs(_cfg("surgery.unlabeled='task:nope'"), tasks, text_tasks)
