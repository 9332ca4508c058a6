"""What limits SurgeryV2's last points: one setting changed at a time from the config's.

    python -m bench.surgery_ablation [--config text-bench] [--variants default,iterations=600,...]
        [--iterations N] [--eval-limit 500]

Every variant trains fresh SurgeryV2 adapters on the Task Arithmetic merge (the same merge,
the same unlabeled inputs, the same seeded eval rows) with ONE surgery setting changed from
the config's ``[surgery]``: ``iterations``, ``rank``, ``lr``, ``loss`` (l1, mse, cos),
``schedule`` (constant, cosine), ``logit_weight``, ``batch_size`` or ``attention_adapters``
(true, false), written ``key=value``; ``default`` is the config itself.

Every variant is scored on the VALIDATION rows (held out of each task's train split; by
agreement with the experts where a task has none) and the best validation average is the
chosen variant: the table's rows give each variant's validation scores, its validation gap
closure ``(avg - merged) / (individual - merged)``, its change from the default in points and
the seconds per iteration. Only the chosen variant, and the default it is compared with, are
then scored on the test rows (the TEST lines): accuracy with its 95 % interval, gap closure
with its paired-bootstrap interval, and paired tests against the experts and the default.
Other variants' test numbers are never computed, so nothing about the test split can move the
choice. A setting generalises when validation picks it on every suite it is run on, not on
one: run the same variants on several configs and compare (the results record the suite).
Writes <out>/surgery_ablation_<config>.json and .png; the last printed line is a one-line
summary.
"""

from __future__ import annotations

import sys

from bench.analysis import (
    METHOD,
    Analysis,
    check_ranks,
    closure_text,
    load_config,
    parser,
    pct,
    pm,
    row,
    run_main,
)
from bench.common import print_table
from trainer.errors import UserError
from trainer.results import stats
from trainer.surgery.train import LOSSES, SCHEDULES

NAME = "surgery_ablation"
DEFAULT_VARIANTS = (
    "default,iterations=x0.5,iterations=x2,rank=8,rank=32,lr=x0.3,lr=x3,loss=mse,loss=cos,"
    "schedule=cosine,logit_weight=1,batch_size=x2,attention_adapters=true"
)
KINDS = {
    "iterations": int,
    "rank": int,
    "lr": float,
    "loss": str,
    "schedule": str,
    "logit_weight": float,
    "batch_size": int,
    "attention_adapters": bool,
}
# the settings that are words
CHOICES = {"loss": LOSSES, "schedule": SCHEDULES, "attention_adapters": ("true", "false")}


def main(argv=None) -> int:
    p = parser(f"bench.{NAME}", __doc__)
    p.add_argument(
        "--variants",
        default=DEFAULT_VARIANTS,
        help="comma-separated: default, or key=value with key in "
        f"{', '.join(KINDS)}; a number may be xF (F times the config's value)",
    )
    return run_main(p, run, argv)


def parse_variants(text: str, defaults: dict) -> list[tuple[str, dict]]:
    """``"default,rank=8,lr=x3"`` -> [(label, {setting: value})]; a bad item is a UserError."""
    out = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        if item == "default":
            out.append(("default", {}))
            continue
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in KINDS:
            raise UserError(
                f"--variants: '{item}' is not default or key=value with key in {', '.join(KINDS)}"
            )
        kind = KINDS[key]
        try:
            if kind in (str, bool):
                parsed = value.strip().lower()
                if parsed not in CHOICES[key]:
                    raise ValueError
                if kind is bool:
                    parsed = parsed == "true"
            elif value.strip().startswith("x"):
                parsed = kind(float(value.strip()[1:]) * defaults[key])
            else:
                parsed = kind(value)
        except ValueError:
            want = f"one of {', '.join(CHOICES[key])}" if key in CHOICES else "a number or xF"
            raise UserError(f"--variants: '{item}': {key} must be {want}") from None
        if kind in (int, float) and parsed <= 0:
            raise UserError(f"--variants: '{item}': {key} must be > 0")
        text = f"{parsed:g}" if kind in (int, float) else str(parsed).lower()
        out.append((f"{key}={text}", {key: parsed}))
    if not out:
        raise UserError("--variants is empty; give e.g. default,rank=8")
    labels = [label for label, _ in out]
    if len(set(labels)) != len(labels):
        raise UserError(f"--variants repeats a setting: {', '.join(labels)}")
    return out


def run(args) -> dict:
    config = load_config(args)
    sc = config.surgery
    defaults = {
        "iterations": args.iterations or sc.iterations,
        "rank": sc.rank,
        "lr": sc.lr,
        "loss": sc.loss,
        "schedule": sc.schedule,
        "logit_weight": sc.logit_weight,
        "batch_size": sc.batch_size,
        "attention_adapters": sc.attention_adapters,
    }
    variants = parse_variants(args.variants, defaults)
    check_ranks(config, [v["rank"] for _, v in variants if "rank" in v] or [sc.rank], "--variants")

    a = Analysis(f"{NAME}_{config.name}", args, config)
    # every variant is scored on VALIDATION; only the chosen one (and the default, the
    # reference it is compared with) is ever scored on test
    rows, models = [], {}
    for label, change in variants:
        settings = {**defaults, **change}
        rank, attention = settings.pop("rank"), settings.pop("attention_adapters")
        model, result = a.surgery("surgeryv2", rank, attention, **settings)
        scored = a.validate(model, f"SurgeryV2 {label}")
        rows.append(
            row(
                scored["acc"],
                variant=label,
                settings={**settings, "rank": rank, "attention_adapters": attention},
                gap_closure=a.validation_gap_closure(scored["avg"]),
                seconds_per_iteration=round(result.seconds_per_iteration, 4),
                loss_last=result.losses[-1] if result.losses else None,
            )
        )
        # hold only the models test may still need: the best so far and the default
        keep = {max(rows, key=lambda r: r["avg"])["variant"], "default"}  # a tie: the earlier
        models = {k: m for k, m in {**models, label: model}.items() if k in keep}
        del model
    base = next((r for r in rows if r["variant"] == "default"), None)
    for r in rows:
        r["delta_points"] = None if base is None else round(100 * (r["avg"] - base["avg"]), 2)

    # ---- test: the chosen variant (and the default), with intervals and paired tests -------
    chosen = max(rows, key=lambda r: r["avg"])
    test_rows = {}
    for label in dict.fromkeys([chosen["variant"], *([] if base is None else ["default"])]):
        test_rows[label] = {
            **a.test(models[label], label),
            "gap_closure": a.gap_closure(label),
            "vs_individual": a.compare(label, "individual"),
        }
    pick = test_rows[chosen["variant"]]
    if base is not None and chosen is not base:
        pick["vs_default"] = a.compare(chosen["variant"], "default")
    verdict = pick.get("vs_default")
    summary = (
        f"{config.name}: chosen on {a.criterion} {chosen['variant']} "
        f"({pct(chosen['avg'])} on validation"
        + (f", {chosen['delta_points']:+.1f} vs default" if base is not None else "")
        + f"); on {a.test_rows_text()} {pm(pick)}, gap closure {closure_text(pick['gap_closure'])}"
        + (
            ""
            if verdict is None
            else f", vs default {pm(test_rows['default'])}: {verdict['verdict']} "
            f"({stats.p_clause(verdict['p_value'])})"
        )
        + f"; {a.reference_text()}"
    )
    data = a.result(
        defaults=defaults,
        rows=rows,
        chosen=chosen["variant"],
        test=test_rows,
        summary=summary,
    )

    def draw(ax):
        labels = [r["variant"] for r in rows]
        colours = ["tab:red" if r is chosen else "tab:blue" for r in rows]
        ax.barh(labels, [100 * r["avg"] for r in rows], color=colours)
        ax.invert_yaxis()
        ref = a.validation_reference
        merged, individual = ref[METHOD]["avg"], ref["individual"]["avg"]
        low = min(100 * merged, *(100 * r["avg"] for r in rows)) - 2
        ax.set_xlim(low, 100 * max(individual, chosen["avg"]) + 1)
        ax.axvline(100 * merged, color="grey", ls="--", label=f"{METHOD} (no surgery)")
        ax.axvline(100 * individual, color="black", ls=":", label="individual experts")
        ax.set_xlabel(f"average {a.criterion} score on validation (%); red: chosen")
        ax.set_title(a.title("SurgeryV2, one setting changed"))
        ax.legend(loc="lower right")

    a.write(data, draw)
    print_table(
        [
            "variant",
            "s/it",
            *(f"{t} (val)" for t in a.names),
            "val avg",
            "gap closed",
            "vs default",
        ],
        [
            [
                r["variant"] + (" *" if r is chosen else ""),
                f"{r['seconds_per_iteration']:.2f}",
                *(pct(r["acc"][t]) for t in a.names),
                pct(r["avg"]),
                "" if r["gap_closure"] is None else f"{100 * r['gap_closure']:.1f}%",
                "" if r["delta_points"] is None else f"{r['delta_points']:+.1f}",
            ]
            for r in rows
        ]
        + [
            [
                f"TEST {label}",
                "",
                *(pm(entry, t) for t in a.names),
                pm(entry),
                closure_text(entry["gap_closure"]),
                "",
            ]
            for label, entry in test_rows.items()
        ],
        summary,
    )
    return data


if __name__ == "__main__":
    sys.exit(main())
