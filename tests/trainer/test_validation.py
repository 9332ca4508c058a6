"""The validation split and the grid search of merge hyper-parameters on it."""

import dataclasses
import json

import numpy as np
import pytest
import torch

import trainer.experts.expert as expert_module
import trainer.experts.multitask as multitask_module
from tests.conftest import run_fit, write_text_task
from trainer.config import load_config
from trainer.data.tasks import load_task
from trainer.data.validation import hold_out_validation, read_validation, stratified_rows
from trainer.errors import UserError
from trainer.merging import METHODS, Searched, merge
from trainer.merging.averaging import LAMBDA_GRID
from trainer.merging.search import search
from trainer.pipeline import gather_experts, prepare
from trainer.results.report import search_footnote, search_line

# ---- the split ------------------------------------------------------------------------------


def _unique_task(root, name="pets", sizes=(60, 30, 30)):
    """A task whose every row is a distinct text: 60/30/30 train rows of three classes."""
    train = [(f"train {name} {c} {i}", c) for c, n in enumerate(sizes) for i in range(n)]
    test = [(f"test {name} {c} {i}", c) for c in range(len(sizes)) for i in range(10)]
    return write_text_task(root / name, [f"c{c}" for c in range(len(sizes))], train, test)


def _config(tmp_path, body: str = "", seed: int = 0, task: str = ""):
    path = tmp_path / f"c{seed}.toml"
    path.write_text(
        f'name = "v"\nseed = {seed}\n{body}\n'
        f'[[tasks]]\nname = "pets"\npath = "{{data}}/pets"\n{task}\n'
    )
    return load_config(str(path))


def _held_out(tmp_path, body="[validation]\nsize = 40", seed=0, task=""):
    config = _config(tmp_path, body, seed, task)
    task = load_task("pets", "{data}/pets", tmp_path / "data")
    hold_out_validation(config, [task], tmp_path / "data")
    return task


def test_validation_rows_come_from_train_and_leave_it(tmp_path):
    _unique_task(tmp_path / "data")
    original = load_task("pets", "{data}/pets", tmp_path / "data")
    task = _held_out(tmp_path)
    val, train, test = set(task.validation.inputs), set(task.train.inputs), set(task.test.inputs)
    assert len(val) == 40 and task.validation_source == "train"
    assert val <= set(original.train.inputs)  # held out of the TRAIN split
    assert not val & test and not val & train  # never a test row, never fine-tuned on
    assert val | train == set(original.train.inputs) and len(task.train) == 80
    # stratified: 60/30/30 rows -> 20/10/10 validation rows, labels carried along
    assert np.bincount(task.validation.labels).tolist() == [20, 10, 10]
    assert all(
        t.split()[2] == str(y) for t, y in zip(task.validation.inputs, task.validation.labels)
    )


def test_validation_rows_are_seeded(tmp_path):
    _unique_task(tmp_path / "data")
    first = _held_out(tmp_path).validation.inputs
    assert _held_out(tmp_path).validation.inputs == first
    other = _held_out(tmp_path, seed=1).validation.inputs
    assert other != first and len(other) == len(first)


def test_stratified_rows_keep_every_class_on_both_sides():
    labels = np.array([0] * 50 + [1] * 3 + [2] * 2)
    rows = stratified_rows(labels, len(labels), 20, np.random.default_rng(0))
    held = np.bincount(labels[rows], minlength=3)
    kept = np.bincount(np.delete(labels, rows), minlength=3)
    assert held.sum() == 20 and len(set(rows.tolist())) == 20
    assert (kept >= 1).all() and held[0] == 18  # ~20 x 50/55, the rest by remainder


def test_size_auto_fraction_zero_and_a_file(tmp_path):
    _unique_task(tmp_path / "data")
    assert len(_held_out(tmp_path, "").validation) == 24  # auto: a fifth of 120 (< 200)
    assert len(_held_out(tmp_path, "[validation]\nsize = 0.25").validation) == 30
    nothing = _held_out(tmp_path, "[validation]\nsize = 0")
    assert nothing.validation is None and len(nothing.train) == 120 and nothing.train_rows is None
    (tmp_path / "val.jsonl").write_text('{"text": "own row", "label": 1}\n')
    task = _held_out(tmp_path, task=f'validation = "{tmp_path}/val.jsonl"')
    assert task.validation.inputs == ["own row"] and task.validation_source == "file"
    assert task.validation.labels.tolist() == [1]
    assert len(task.train) == 120  # nothing held out


def test_an_image_task_reads_its_own_validation_file(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (6, 8, 8, 3), dtype=np.uint8)
    np.savez(
        tmp_path / "t.npz",
        x_train=images,
        y_train=np.array([0, 1] * 3),
        x_test=images[:2],
        y_test=np.array([0, 1]),
        classes=np.array(["a", "b"]),
    )
    np.savez(tmp_path / "val.npz", x_val=images[:3], y_val=np.array([1, 0, 1]))
    np.savez(tmp_path / "bad.npz", x_val=images[:1], y_val=np.array([7]))
    task = load_task("t", str(tmp_path / "t.npz"), tmp_path)
    assert read_validation(task, tmp_path / "val.npz").labels.tolist() == [1, 0, 1]
    with pytest.raises(UserError, match="row 0 has label 7, outside the task's 2 classes"):
        read_validation(task, tmp_path / "bad.npz")
    with pytest.raises(UserError, match="holds no rows"):
        read_validation(task, tmp_path)  # a folder without images
    (tmp_path / "val.txt").write_text("a text\n")
    with pytest.raises(UserError, match="val.txt is not an .npz file with x_val"):
        read_validation(task, tmp_path / "val.txt")


def test_experts_and_multitask_never_train_on_validation_rows(
    tiny_config, text_tasks, tmp_path, monkeypatch
):
    """What fine-tuning is handed excludes the validation rows; the cache key names the rows
    trained on, so changing the split retrains instead of reusing a stale expert."""
    seen = []

    def recording(real):
        def train(base, tasks, *args, **kwargs):
            seen.append({t.name: list(t.train.inputs) for t in tasks})
            return real(base, tasks, *args, **kwargs)

        return train

    monkeypatch.setattr(
        expert_module, "train_classifier", recording(expert_module.train_classifier)
    )
    monkeypatch.setattr(
        multitask_module, "train_classifier", recording(multitask_module.train_classifier)
    )
    cpu, cache = torch.device("cpu"), tmp_path / "cache"
    config = load_config(
        str(tiny_config), ["validation.size=12", "merge.methods=[]", "surgery.methods=[]"]
    )
    exp = prepare(config, data_root=text_tasks, cache=cache, device=cpu)
    exp.multitask_model()
    assert [list(call) for call in seen] == [["animals"], ["colours"], ["animals", "colours"]]
    for task in exp.tasks:
        # the fixture repeats sentences: rows are compared by their index in the file
        original = load_task(task.name, f"{{data}}/{task.name}", text_tasks).train
        held = np.setdiff1d(np.arange(len(original)), task.train_rows)
        assert len(held) == 12 and len(task.train_rows) == len(original) - 12
        assert list(original.take(held).inputs) == list(task.validation.inputs)
        trained = [call[task.name] for call in seen if task.name in call]
        assert len(trained) == 2  # its expert and the multitask model: the other rows only
        assert all(rows == list(original.take(task.train_rows).inputs) for rows in trained)
        assert task.train_key.startswith(task.fingerprint + ":")  # the rows are in the key
    seen.clear()
    gather_experts(config, data_root=text_tasks, cache=cache, device=cpu)
    assert seen == []  # the same split: cached
    other = load_config(
        str(tiny_config), ["validation.size=10", "merge.methods=[]", "surgery.methods=[]"]
    )
    gather_experts(other, data_root=text_tasks, cache=cache, device=cpu)
    assert len(seen) == 2  # another split: fine-tuned again, never the stale experts


# ---- the search -----------------------------------------------------------------------------

BASE = {"w": torch.zeros(4), "idx": torch.tensor([1, 2])}
EXPERTS = [
    {"w": torch.tensor([1.0, 0.0, 0.5, -0.2]), "idx": torch.tensor([9, 9])},
    {"w": torch.tensor([0.0, 1.0, 0.5, 0.4]), "idx": torch.tensor([9, 9])},
]


def test_grid_search_finds_the_known_best_lambda():
    # Σ τ = [1, 1, 1, .2]: the score peaks where w[0] = 0.45, i.e. at λ = 0.45
    def score(state):
        value = -abs(float(state["w"][0]) - 0.45)
        return value, [value]

    lam = {"lam": Searched(LAMBDA_GRID)}
    result = search("task_arithmetic", BASE, EXPERTS, lam, score, strategy="grid")
    assert result.chosen == {"lam": 0.45} and result.searched == ["lam"]
    assert [c["lam"] for c in result.candidates] == list(LAMBDA_GRID)
    assert len(result.candidates) == 20 and result.values() == "λ=0.45"
    assert result.grid_text() == "grid 0.05..1.0"


def test_ties_merges_once_per_k_and_rescales_exactly(monkeypatch):
    """Each candidate state equals a direct merge with its values, while the method itself
    runs once per k (λ only rescales the merged direction)."""
    method = METHODS["ties_merging"]
    calls = []

    def counted(*args, **kwargs):
        calls.append(kwargs)
        return method.fn(*args, **kwargs)

    monkeypatch.setitem(METHODS, "ties_merging", dataclasses.replace(method, fn=counted))
    states = []

    def score(state):
        states.append(state)
        return float(state["w"].sum()), [0.0]

    grid = {"k": Searched((25.0, 50.0)), "lam": Searched((0.5, 1.0, 1.5))}
    result = search("ties_merging", BASE, EXPERTS, grid, score)
    assert len(calls) == 2 and len(result.candidates) == 6
    for candidate, state in zip(result.candidates, states):
        direct = merge(
            "ties_merging", BASE, EXPERTS, {"k": candidate["k"], "lam": candidate["lam"]}
        )
        assert torch.allclose(state["w"], direct["w"], atol=1e-6)
        assert torch.equal(state["idx"], BASE["idx"])
    assert result.searched == ["lam", "k"]
    assert result.chosen["lam"] == 1.5  # the sum of w grows with λ here


def test_a_pinned_value_disables_its_search(tmp_path):
    pinned = _config(
        tmp_path, "[merge]\nmethods = ['task_arithmetic']\ntask_arithmetic = { lam = 0.3 }"
    )
    assert pinned.merge.hparams("task_arithmetic") == {"lam": 0.3}
    assert search("task_arithmetic", BASE, EXPERTS, {"lam": 0.3}, lambda s: (0.0, [])) is None
    cfg = _config(
        tmp_path, "[merge]\nties_merging = { k = 20 }\ntask_arithmetic = { lam = [0.2, 0.7] }"
    )
    assert cfg.merge.hparams("task_arithmetic") == {"lam": Searched((0.2, 0.7))}
    ties = cfg.merge.hparams("ties_merging")
    result = search("ties_merging", BASE, EXPERTS, ties, lambda s: (0.0, [0.0]), strategy="grid")
    assert result.searched == ["lam"] and result.pinned == ["k"] and result.chosen["k"] == 20.0
    assert "k" not in result.grid and len(result.candidates) == 20


def test_fit_with_a_pinned_lambda_searches_nothing(tiny_config, text_tasks, tmp_path):
    config = load_config(
        str(tiny_config),
        ["merge.methods=['task_arithmetic']", "merge.task_arithmetic.lam=0.3"],
    )
    exp = prepare(
        config, data_root=text_tasks, cache=tmp_path / "cache", device=torch.device("cpu")
    )
    _, hparams = exp.merged("task_arithmetic")
    assert hparams == {"lam": 0.3} and exp.searches == {}
    assert exp.validation_record()["criterion"] is None


def test_search_scores_accuracy_on_the_validation_rows(tiny_config, text_tasks, tmp_path):
    config = load_config(str(tiny_config), ["validation.size=12"])
    exp = prepare(
        config, data_root=text_tasks, cache=tmp_path / "cache", device=torch.device("cpu")
    )
    state, hparams = exp.merged("task_arithmetic")
    result = exp.searches["task_arithmetic"]
    assert exp.validation.criterion == "accuracy" and exp.validation.rows() == [12, 12]
    assert hparams == result.chosen and hparams["lam"] in LAMBDA_GRID
    best = max(result.candidates, key=lambda c: c["score"])
    assert result.score == best["score"]
    # the chosen state scores what the search recorded: accuracy of each task's head
    value, per_task = exp.scorer()(state)
    assert value == pytest.approx(result.score, abs=1e-6)
    for t, task in enumerate(exp.tasks):
        pred = exp.scorer().predictions(state, [t])[0]
        assert per_task[t] == pytest.approx((pred.numpy() == task.validation.labels).mean())


def test_agreement_with_the_experts_when_a_task_has_no_labels(tiny_config, text_tasks, tmp_path):
    """An unlabeled validation file makes the criterion agreement with the experts for the
    whole search; an expert agrees with itself on every row of its task."""
    (tmp_path / "inputs.txt").write_text("".join(f"the cat {i} ran\n" for i in range(10)))
    text = tiny_config.read_text().replace(
        'path = "{data}/colours"',
        f'path = "{{data}}/colours"\nvalidation = "{tmp_path}/inputs.txt"',
    )
    tiny_config.write_text(text)
    config = load_config(str(tiny_config), ["validation.size=12"])
    exp = prepare(
        config, data_root=text_tasks, cache=tmp_path / "cache", device=torch.device("cpu")
    )
    assert exp.validation.criterion == "agreement"
    assert exp.validation.sources == ["train", "file"] and exp.validation.rows() == [12, 10]
    for t, expert in enumerate(exp.experts):
        assert exp.scorer()(expert.state)[1][t] == 1.0
    exp.merged("task_arithmetic")
    line = search_line(exp.searches["task_arithmetic"], exp.validation, exp.validation_notes())
    assert "chosen by agreement with the experts" in line
    assert line.endswith("; no labelled validation rows: colours")
    footnote = search_footnote(exp.searches, exp.validation, exp.validation_notes())
    assert "by agreement with the experts on 10-12 validation inputs per task" in footnote


def test_without_validation_rows_unlabeled_inputs_are_scored_by_agreement(
    tiny_config, text_tasks, tmp_path
):
    config = load_config(str(tiny_config), ["validation.size=0"])
    exp = prepare(
        config, data_root=text_tasks, cache=tmp_path / "cache", device=torch.device("cpu")
    )
    assert all(t.validation is None for t in exp.tasks)
    assert exp.validation.criterion == "agreement" and exp.validation.sources == ["unlabeled"] * 2
    for inputs, task in zip(exp.validation.inputs, exp.tasks):  # inputs only, no labels
        assert set(inputs) <= set(task.test.inputs) and exp.validation.labels == [None, None]
    _, hparams = exp.merged("task_arithmetic")
    assert hparams["lam"] in LAMBDA_GRID


# ---- results and errors -----------------------------------------------------------------------


def _error(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0]
    return err[0]


@pytest.mark.parametrize(
    "override, message",
    [
        ("validation.size=-5", "validation.size' must be >= 0"),
        ("validation.size=48", "validation.size' = 48 holds out 48 rows but task 'animals'"),
        ("validation.size=2.5", "validation.size' = 2.5: a fraction must be below 1"),
        ("validation.size='most'", 'validation.size\' must be "auto"'),
        ("validation.sise=3", "unknown config key 'validation.sise'; valid keys of "),
        ("merge.task_arithmetic.lam='serch'", "merge.task_arithmetic.lam' must be a number, "),
        ("merge.task_arithmetic.lam=[]", "merge.task_arithmetic.lam' must be a value"),
        ("merge.adamerging.lr='search'", "merge.adamerging.lr' cannot be searched"),
    ],
)
def test_bad_validation_and_search_settings(tiny_config, tmp_path, capsys, override, message):
    assert run_fit(tiny_config, tmp_path, "--set", override) == 2
    assert message in _error(capsys)
    assert not (tmp_path / "out").exists()


def test_a_missing_validation_file_is_named(tiny_config, tmp_path, capsys):
    text = tiny_config.read_text().replace(
        'path = "{data}/colours"', 'path = "{data}/colours"\nvalidation = "{data}/none.jsonl"'
    )
    tiny_config.write_text(text)
    assert run_fit(tiny_config, tmp_path) == 2
    assert "task 'colours': validation" in _error(capsys)


def test_results_record_the_search(tiny_config, tmp_path, capsys):
    assert run_fit(tiny_config, tmp_path, "--set", "validation.size=12") == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    ta = results["merge"]["task_arithmetic"]
    assert ta["search"]["criterion"] == "accuracy" and ta["search"]["grid"]["lam"] == list(
        LAMBDA_GRID
    )
    assert ta["search"]["strategy"] == "coarse-to-fine" and ta["hparams"] == ta["search"]["chosen"]
    assert len(ta["search"]["candidates"]) == ta["search"]["evaluated"] <= 10  # of 20
    ties = results["merge"]["ties_merging"]["search"]
    assert len(ties["candidates"]) == ties["evaluated"] <= 20 and set(ties["grid"]) == {"k", "lam"}
    assert results["merge"]["weight_averaging"] == {"hparams": {}, "search": None}
    assert results["validation"]["rows"] == {"animals": 12, "colours": 12}
    assert results["validation"]["source"] == {"animals": "train", "colours": "train"}
    manifest = json.loads((tmp_path / "out" / "bundle" / "manifest.json").read_text())
    bundled = manifest["merge"]["method"]
    assert manifest["merge"]["hparams"] == results["merge"][bundled]["hparams"]
    assert all(not isinstance(v, dict) for v in manifest["merge"]["hparams"].values())
    out = capsys.readouterr().out
    lam = ta["hparams"]["lam"]
    assert f"task_arithmetic λ={lam:g}" in out and "chosen on 12 validation rows per task" in out


@pytest.mark.parametrize("name", ["demo", "text-bench", "vision-bench", "dinov2-bench"])
def test_shipped_configs_search_lambda_by_default(name):
    config = load_config(name)
    assert isinstance(config.merge.hparams("task_arithmetic")["lam"], Searched)
    assert isinstance(config.merge.hparams("ties_merging")["lam"], Searched)
    assert config.validation.size == "auto"
