"""The unlabeled pool: the inductive protocol by default (train inputs, labels dropped, minus
the validation rows and copies of scored test inputs), the transductive one on request, user
pools, and the one-line refusals."""

import logging

import numpy as np
import pytest

from tests.conftest import write_text_task
from tests.trainer.pool_kit import ANIMALS, distinct_rows, write_distinct_tasks
from trainer.config import TaskConfig, load_config
from trainer.data.tasks import load_task
from trainer.data.unlabeled import content_hash, unlabeled_pool
from trainer.data.validation import hold_out_validation
from trainer.errors import UserError


def _pool(root, *overrides, names=("animals", "colours")):
    config = load_config("demo", ["validation.size=8", *overrides])
    # a name may be "name=file" (a task read from that file under root)
    tasks = [load_task(n.split("=")[0], f"{{data}}/{n.split('=')[-1]}", root) for n in names]
    hold_out_validation(config, tasks, root)
    return unlabeled_pool(config, tasks, root), tasks


def test_default_is_inductive_train_inputs_capped_at_the_test_size(tmp_path):
    root = write_distinct_tasks(tmp_path / "data")
    pool, tasks = _pool(root)
    assert pool.protocol == "inductive" and pool.source == "train"
    for inputs, task in zip(pool.pools, tasks):
        assert len(inputs) == len(task.test) == 24  # 40 train rows left, capped at 24
        assert set(inputs) <= set(task.train.inputs)  # labels dropped: plain strings
        assert not set(inputs) & set(task.validation.inputs)
        assert not set(inputs) & set(task.test.inputs)
    record = pool.record(["animals", "colours"])
    assert record["protocol"] == "inductive" and record["overlap_with_test"] == 0
    assert record["rows"] == {"animals": 24, "colours": 24}
    again, _ = _pool(root)
    assert again.pools == pool.pools  # seeded


def test_unlabeled_size_all_a_number_and_a_fraction(tmp_path):
    root = write_distinct_tasks(tmp_path / "data")
    pool, tasks = _pool(root, "surgery.unlabeled_size='all'")
    assert [len(p) for p in pool.pools] == [len(t.train) for t in tasks] == [40, 40]
    pool, _ = _pool(root, "surgery.unlabeled_size=10")
    assert [len(p) for p in pool.pools] == [10, 10]
    pool, _ = _pool(root, "surgery.unlabeled_size='all'", "surgery.unlabeled_fraction=0.25")
    assert [len(p) for p in pool.pools] == [10, 10]


def test_copies_of_test_inputs_are_dropped_and_counted_once(tmp_path, caplog):
    root = write_distinct_tasks(tmp_path / "data", copies=5)
    with caplog.at_level(logging.INFO, logger="deepsurgery"):
        pool, tasks = _pool(root, "surgery.unlabeled_size='all'")
    tests = {content_hash(x) for t in tasks for x in t.test.inputs}
    assert not any(content_hash(x) in tests for p in pool.pools for x in p)
    held = sum(x in set(tasks[0].test.inputs) for x in tasks[0].validation.inputs)
    assert pool.dropped == [5 - held, 0] and 5 - held > 0
    assert pool.overlap_with_test == 0
    lines = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert lines == [
        f"inductive pool: dropped {5 - held} train inputs equal to test or validation inputs "
        f"(animals {5 - held})"
    ]


def test_image_copies_are_found_by_content(tmp_path):
    rng = np.random.default_rng(0)
    x_test = rng.integers(0, 255, (6, 4, 4, 3), dtype=np.uint8)
    x_train = np.concatenate([rng.integers(0, 255, (20, 4, 4, 3), dtype=np.uint8), x_test[:2]])
    np.savez(
        tmp_path / "img.npz",
        x_train=x_train,
        y_train=np.arange(22) % 2,
        x_test=x_test,
        y_test=np.arange(6) % 2,
        classes=np.array(["a", "b"]),
    )
    config = load_config("demo", ["validation.size=0", "surgery.unlabeled_size='all'"])
    task = load_task("img", str(tmp_path / "img.npz"), tmp_path)
    pool = unlabeled_pool(config, [task], tmp_path)
    assert pool.dropped == [2]  # then half of the 20 left score agreement (no validation rows)
    assert len(pool.pools[0]) == len(task.validation) == 10
    assert content_hash(x_test[0]) == content_hash(x_test[0].copy())
    assert content_hash(x_test[0]) != content_hash(x_test[0].reshape(16, 3))


def test_test_is_the_transductive_protocol(tmp_path):
    root = write_distinct_tasks(tmp_path / "data")
    pool, tasks = _pool(root, "surgery.unlabeled='test'")
    assert pool.protocol == "transductive"
    assert pool.pools == [list(t.test.inputs) for t in tasks]
    assert pool.overlap_with_test == 48  # every pool input is scored


def test_a_user_pool_sharing_scored_test_inputs_is_refused(tmp_path):
    root = write_distinct_tasks(tmp_path / "data")
    wild = tmp_path / "wild.txt"
    wild.write_text("one wild line\nanother wild line\n")
    pool, _ = _pool(root, f"surgery.unlabeled='{wild}'")
    assert pool.protocol == "inductive"
    assert pool.pools == [["one wild line", "another wild line"]] * 2
    test_line = distinct_rows(ANIMALS, 24, 1, 1000)[3][0]
    wild.write_text(f"one wild line\n{test_line}\n")
    with pytest.raises(UserError, match="shares 1 inputs with the scored test splits") as err:
        _pool(root, f"surgery.unlabeled='{wild}'")
    assert 'surgery.unlabeled = "test"' in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UserError, match="'task:colours' shares 24 inputs"):
        _pool(root, "surgery.unlabeled='task:colours'")
    with pytest.raises(UserError, match="no task named 'nope'"):
        _pool(root, "surgery.unlabeled='task:nope'")


def test_another_tasks_unscored_inputs_are_an_inductive_pool(tmp_path):
    root = write_distinct_tasks(tmp_path / "data")
    (root / "wild.txt").write_text("first wild input\nsecond wild input\n")
    pool, _ = _pool(
        root, "surgery.unlabeled='task:wild'", names=("animals", "colours", "wild=wild.txt")
    )
    assert pool.protocol == "inductive" and pool.pools[0] == [
        "first wild input",
        "second wild input",
    ]


def test_a_task_without_a_train_split(tmp_path):
    """Its labelled test inputs are scored, so the inductive default cannot use them (a
    one-line error naming the ways out); inputs without labels are scored by nothing, so they
    are its pool."""
    root = write_distinct_tasks(tmp_path / "data")
    (root / "only-test").mkdir()
    (root / "only-test" / "test.jsonl").write_text(
        '{"text": "a cat here", "label": 0}\n{"text": "a bus here", "label": 1}\n'
    )
    with pytest.raises(UserError, match="task 'only-test' has no train split") as err:
        _pool(root, names=("animals", "only-test"))
    assert "pool file" in str(err.value) and 'surgery.unlabeled = "test"' in str(err.value)
    (root / "lines.txt").write_text("an unlabeled input\nanother unlabeled input\n")
    pool, tasks = _pool(root, names=("animals", "lines=lines.txt"))
    assert pool.origins == ["train", "inputs"]
    # half of its inputs score its agreement (it has no validation rows), half are its pool
    assert sorted(pool.pools[1] + list(tasks[1].validation.inputs)) == [
        "an unlabeled input",
        "another unlabeled input",
    ]


def test_a_pool_with_no_usable_rows_is_refused(tmp_path):
    root = tmp_path / "data"
    rows = distinct_rows(ANIMALS, 12, 0, 0)
    write_text_task(root / "animals", ["animal", "vehicle"], rows, rows)  # train == test
    with pytest.raises(UserError, match="no usable unlabeled inputs for the inductive pool"):
        _pool(root, "validation.size=0", names=("animals",))


@pytest.mark.parametrize(
    "override, message",
    [
        ("surgery.unlabeled='inductive'", "names the pool, not the protocol"),
        ("surgery.unlabeled='tset'", "unknown surgery.unlabeled 'tset'"),
        ("surgery.unlabeled='task:'", "names no task"),
        ("surgery.unlabeled_size=0", "unlabeled_size must be"),
        ("surgery.unlabeled_size='many'", "unlabeled_size must be"),
    ],
)
def test_bad_pool_settings_fail_when_the_config_loads(override, message):
    with pytest.raises(UserError, match=message):
        load_config("demo", [override])


def test_without_validation_rows_the_agreement_inputs_leave_the_pool(tmp_path):
    """validation.size = 0: nothing is held out of train, so each task's searches and bundle
    choice are scored by agreement on unlabeled inputs, which the inductive protocol takes
    out of its pool (at most half of it) so surgery never learns from them."""
    root = write_distinct_tasks(tmp_path / "data")
    pool, tasks = _pool(root, "validation.size=0", "surgery.unlabeled_size='all'")
    for inputs, task in zip(pool.pools, tasks):
        assert task.validation_source == "unlabeled" and task.validation.labels is None
        assert len(task.validation) == len(inputs) == 24  # 48 train inputs, half carved
        assert not set(inputs) & set(task.validation.inputs)
    again, tasks_again = _pool(root, "validation.size=0", "surgery.unlabeled_size='all'")
    assert [t.validation.inputs for t in tasks_again] == [t.validation.inputs for t in tasks]
    # the transductive protocol leaves its pool (the test inputs) whole
    pool, tasks = _pool(root, "validation.size=0", "surgery.unlabeled='test'")
    assert pool.pools == [list(t.test.inputs) for t in tasks]
    assert all(t.validation is None for t in tasks)


def _own_pool(root, own: dict[str, str], *overrides):
    """The pool when tasks ``own`` (name -> path) give their own unlabeled inputs."""
    config = load_config("demo", ["validation.size=8", *overrides])
    config.tasks = [
        TaskConfig(name=n, path=f"{{data}}/{n}", unlabeled=own.get(n, ""))
        for n in ("animals", "colours")
    ]
    tasks = [load_task(n, f"{{data}}/{n}", root) for n in ("animals", "colours")]
    hold_out_validation(config, tasks, root)
    return unlabeled_pool(config, tasks, root), tasks


def test_a_tasks_own_pool_replaces_the_shared_source_for_that_task(tmp_path):
    root = write_distinct_tasks(tmp_path / "data")
    traffic = [f"a fresh animals request {i}" for i in range(30)]
    (root / "animals-traffic.txt").write_text("\n".join(traffic) + "\n")
    pool, tasks = _own_pool(root, {"animals": "{data}/animals-traffic.txt"})
    assert pool.protocol == "inductive" and pool.source == "train"
    assert pool.pools[0] == traffic  # all of it: "auto" caps only train pools
    assert set(pool.pools[1]) <= set(tasks[1].train.inputs) and len(pool.pools[1]) == 24
    record = pool.record(["animals", "colours"])
    assert record["origin"] == {"animals": "{data}/animals-traffic.txt", "colours": "train"}
    assert record["rows"] == {"animals": 30, "colours": 24}
    assert pool.describe() == "inductive (train inputs; 1 task's own pool)"
    capped, _ = _own_pool(
        root, {"animals": "{data}/animals-traffic.txt"}, "surgery.unlabeled_size=5"
    )
    assert len(capped.pools[0]) == 5 and set(capped.pools[0]) <= set(traffic)
    # refused in one line: a copy of a scored test input, an empty or missing file, and a
    # transductive run
    test_line = distinct_rows(ANIMALS, 24, 1, 1000)[3][0]
    (root / "leaky.txt").write_text(f"a fresh request\n{test_line}\n")
    with pytest.raises(UserError, match="task 'animals': its unlabeled pool .* shares 1 inputs"):
        _own_pool(root, {"animals": "{data}/leaky.txt"})
    (root / "empty.txt").write_text("\n")
    with pytest.raises(UserError, match="task 'colours': unlabeled: .* holds no inputs"):
        _own_pool(root, {"colours": "{data}/empty.txt"})
    np.savez(root / "empty.npz", x_train=np.zeros((0, 4, 4, 3), np.uint8))
    with pytest.raises(UserError, match="task 'colours': unlabeled: .*empty.npz holds no inputs"):
        _own_pool(root, {"colours": "{data}/empty.npz"})
    with pytest.raises(UserError, match="task 'colours': unlabeled: .* does not exist"):
        _own_pool(root, {"colours": "{data}/nowhere.txt"})
    with pytest.raises(UserError, match="tasks animals give their own unlabeled pool") as err:
        _own_pool(root, {"animals": "{data}/animals-traffic.txt"}, "surgery.unlabeled='test'")
    assert "\n" not in str(err.value)
