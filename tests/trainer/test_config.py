"""Config loading and validation: errors name the problem before any work starts."""

import pytest

from trainer.config import load_config
from trainer.errors import UserError


def test_shipped_configs_load_by_name():
    demo = load_config("demo")
    assert demo.demo and demo.backbone.path == "minilm"
    bench = load_config("text-bench")
    assert [t.name for t in bench.tasks] == ["agnews", "amazon", "yelp", "dbpedia"]
    assert bench.backbone.max_length == 128


def test_unknown_key_is_named_with_the_valid_ones(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[finetune]\nstepz = 3\n[[tasks]]\nname = "a"\npath = "x"\n')
    with pytest.raises(UserError) as err:
        load_config(str(path))
    assert "finetune.stepz" in str(err.value) and "steps" in str(err.value)


def test_set_overrides_and_type_checks():
    cfg = load_config(
        "demo", ["finetune.steps=7", "surgery.loss=mse", "merge.task_arithmetic.lam=0.5"]
    )
    assert cfg.finetune.steps == 7 and cfg.surgery.loss == "mse"
    assert cfg.merge.hparams("task_arithmetic") == {"lam": 0.5}
    with pytest.raises(UserError, match="must be an integer"):
        load_config("demo", ["finetune.steps=many"])
    with pytest.raises(UserError, match="merge.task_arithmetic.lambda"):
        load_config("demo", ["merge.task_arithmetic.lambda=0.5"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("surgery.rank=0", "rank must be >= 1"),
        ("surgery.loss='huber'", "unknown surgery.loss"),
        ("surgery.schedule='step'", "unknown surgery.schedule 'step'; valid: constant, cosine"),
        ("surgery.logit_weight=-1", "surgery.logit_weight must be >= 0"),
        ("surgery.modes=['deep']", "unknown surgery mode"),
        ("surgery.unlabeled_fraction=0", r"unlabeled_fraction must be in \(0, 1\]"),
        ("surgery.unlabeled_fraction=1.5", r"unlabeled_fraction must be in \(0, 1\]"),
        ("merge.methods=['magic']", "unknown merge method"),
        ("merge.ties_merging.k=101", r"merge.ties_merging.k' = 101.0 is out of range"),
        ("output.bundle='ties/none'", "output.bundle 'ties/none' is not a row this config runs"),
        # the demo repairs only task_arithmetic: no ties_merging/surgeryv2 row exists
        ("output.bundle='ties_merging/surgeryv2'", "one of: .*task_arithmetic/surgeryv2"),
    ],
)
def test_bad_surgery_and_merge_settings(override, message):
    with pytest.raises(UserError, match=message):
        load_config("demo", [override])


def test_attention_adapters_need_surgeryv2():
    cfg = load_config("demo", ["surgery.attention_adapters=true"])
    assert cfg.surgery.attention_adapters and "surgeryv2" in cfg.surgery.modes
    with pytest.raises(UserError, match="surgery.modes \\['none', 'surgery'\\] has no 'surgeryv2'"):
        load_config("demo", ["surgery.attention_adapters=true", "surgery.modes=['none','surgery']"])
    with pytest.raises(UserError, match="attention_adapters"):
        load_config("demo", ["surgery.attention_adapters='yes'"])


def test_unknown_config_name():
    with pytest.raises(UserError, match="shipped configs: .*text-bench"):
        load_config("no-such-config")


def test_bundle_choice_of_a_row_that_runs_is_accepted():
    cfg = load_config("demo", ["output.bundle='ties_merging/none'"])
    assert cfg.output.bundle == "ties_merging/none"


def test_a_task_named_star_is_refused(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[[tasks]]\nname = "*"\npath = "x"\n')
    with pytest.raises(UserError, match="tasks\\[0\\] is named '\\*'"):
        load_config(str(path))


def test_the_top_level_seed_reseeds_experts_and_surgery_unless_pinned():
    base = load_config("demo")
    assert (base.seed, base.finetune.seed, base.surgery.seed) == (0, 0, 0)
    reseeded = load_config("demo", ["seed=2"])
    assert (reseeded.seed, reseeded.finetune.seed, reseeded.surgery.seed) == (2, 2, 2)
    assert reseeded.pretrain.seed == 0  # the pretrained base stays the same checkpoint
    pinned = load_config("demo", ["seed=2", "finetune.seed=7"])
    assert (pinned.finetune.seed, pinned.surgery.seed) == (7, 2)
