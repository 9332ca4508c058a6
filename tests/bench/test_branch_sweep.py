"""bench.branch_sweep, bench.star_latency and bench.int8 end to end on the tiny model: every
branch block trained, exported and served, `*` latency from a client, int8 accuracy."""

from __future__ import annotations

import json

from bench import branch_sweep, int8, star_latency


def _common(config, tmp_path, cache):
    return [
        "--config",
        str(config),
        "--data",
        str(tmp_path / "data"),
        "--cache",
        str(cache),
        "--eval-limit",
        "16",
    ]


def test_branch_sweep_star_latency_and_int8(tiny_config, tmp_path, capsys):
    cache, models, res = tmp_path / "cache", tmp_path / "models", tmp_path / "res"
    code = branch_sweep.main(
        [
            *_common(tiny_config, tmp_path, cache),
            *("--out", str(res), "--device", "cpu", "--iterations", "2"),
            *("--requests", "24", "--clients", "2", "--rounds", "2", "--models", str(models)),
        ]
    )
    assert code == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("tiny: branch-point knee at k=")
    data = json.loads((res / "branch_sweep_tiny.json").read_text())
    assert (res / "branch_sweep_tiny.png").stat().st_size > 1000
    assert data["blocks"] == 2 and data["ks"] == [0, 1, 2]
    for r, k in zip(data["rows"], [0, 1, 2], strict=True):
        assert r["branch_block"] == k and set(r["acc"]) == {"animals", "colours"}
        assert r["expected_star_passes"] == (k + 2 * (2 - k)) / 2
        assert r["star_rps"] > 0 and r["single_rps"] > 0 and r["cost"] == r["relative_star_cost"]
        assert [len(v) for v in r["rounds_rps"].values()] == [2, 2]
        manifest = json.loads((models / f"k{k}" / "onnx" / "manifest.json").read_text())
        assert manifest["shared_blocks"] == k and manifest["source_bundle"]["surgery"]["mode"]
    assert data["knee"] in (0, 1, 2)
    surgery = data["surgery"]
    assert surgery["mode"] == "surgery" and surgery["expected_star_passes"] == 1.0
    manifest = json.loads((models / "surgery" / "onnx" / "manifest.json").read_text())
    assert (
        manifest["shared_blocks"] == 2 and manifest["source_bundle"]["surgery"]["mode"] == "surgery"
    )

    dirs = [models / "k0" / "onnx", models / "surgery" / "onnx"]
    code = star_latency.main(["--model", ",".join(map(str, dirs)), "--n", "6", "--out", str(res)])
    assert code == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("star_latency: `*` / single-task median latency surgeryv2 k=0")
    rows = json.loads((res / "star_latency.json").read_text())["rows"]
    assert [r["expected_passes"] for r in rows] == [2.0, 1.0]
    assert all(r["star_p50_ms"] > 0 and r["single_p50_ms"] > 0 for r in rows)

    code = int8.main(
        [
            *_common(tiny_config, tmp_path, cache),
            *("--bundle", str(models / "k1" / "bundle"), "--out", str(res)),
            *("--requests", "24", "--clients", "2", "--rounds", "1", "--batch", "4"),
            *("--models", str(tmp_path / "int8")),
        ]
    )
    assert code == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("int8 vs fp32 (tiny, 2 tasks")
    data = json.loads((res / "int8.json").read_text())
    assert data["eval_rows"] == {"animals": 16, "colours": 16}
    for precision in ("fp32", "int8"):
        assert set(data["accuracy"][precision]) == {"animals", "colours"}
        assert len(data["served_rps"][precision]) == 1
    assert data["int8"]["quantized_matmuls"] > 0 and data["parity"]["int8"] >= 0.95
