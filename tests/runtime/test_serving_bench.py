"""bench.serving_load's overload and hot-swap scenarios at tiny sizes: they run end to end,
print a table ending in a one-line summary and write their JSON (the ray scenario drives the
same runtime.serve_ray that test_serve_ray covers); the protocols scenario and
bench.core_overhead likewise."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from runtime_testkit import REPO


def run_bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bench.serving_load", "--providers", "cpu", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_hot_swap_scenario_fails_no_request(text_model_dir, tmp_path):
    out = tmp_path / "hot_swap.json"
    result = run_bench(
        "--model", str(text_model_dir), "--scenario", "hot-swap", "--requests", "200",
        "--clients", "8", "--warmup", "20", "--duration-s", "2", "--swaps", "2",
        "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("hot-swap: 2/2 versions swapped in") and ", 0 failed" in last
    report = json.loads(out.read_text())
    assert report["rows"][0]["errors"] == 0 and report["rows"][0]["swaps_done"] == 2
    assert len(report["loadavg_before"]) == 3 and len(report["loadavg_after"]) == 3


def test_overload_scenario_reports_both_servers(text_model_dir, tmp_path):
    out = tmp_path / "overload.json"
    result = run_bench(
        "--model", str(text_model_dir), "--scenario", "overload", "--requests", "300",
        "--clients", "8", "--warmup", "20", "--duration-s", "0.5", "--overload-factor", "1",
        "--max-queue", "8", "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith("overload at 1x the sustainable")
    report = json.loads(out.read_text())
    rows = {r["server"]: r for r in report["rows"]}
    assert set(rows) == {"unbounded queue", "--max-queue 8"}
    assert all(r["healthy_after"] and r["other_errors"] == 0 for r in rows.values())
    assert rows["unbounded queue"]["refused"] == 0
    for r in rows.values():
        assert r["ok"] + r["refused"] == r["sent"] > 0


def test_mixes_scenario_reports_every_mix_and_server(text_model_dir, tmp_path):
    out = tmp_path / "mixes.json"
    result = run_bench(
        "--model", str(text_model_dir), "--scenario", "mixes", "--requests", "120",
        "--clients", "8", "--warmup", "10", "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("serving mixes (2 tasks") and last.endswith("errors 0 (target 0)")
    report = json.loads(out.read_text())
    cells = {(r["mix"], r["deployment"]) for r in report["rows"]}
    mixes = ["distinct", "uniform", "zipf", "identical", "star-heavy"]
    assert cells == {(m, s) for m in mixes for s in ("fused", "naive", "group-by-task")}
    for r in report["rows"]:
        assert r["errors"] == 0 and r["requests"] == 120 and r["server_peak_rss_mib"] > 0
        assert r["processes"] == (2 if r["deployment"] == "naive" else 1)
        star = r["mix"] == "star-heavy"
        assert (r["predictions_per_s"] > r["throughput_rps"]) == star


def test_mix_plans():
    from bench.serving_load import mix_plan

    tasks = ["a", "b", "c", "d"]
    assert [k for k, _ in mix_plan("distinct", tasks, 8, 5)] == tasks * 2
    assert {k for k, _ in mix_plan("identical", tasks, 50, 5)} == {"a"}
    zipf = [k for k, _ in mix_plan("zipf", tasks, 4000, 5)]
    assert 0.6 < zipf.count("a") / 4000 < 0.8 and zipf.count("d") < zipf.count("c")
    star = [k for k, _ in mix_plan("star-heavy", tasks, 4000, 5)]
    assert 0.45 < star.count("*") / 4000 < 0.55
    assert all(0 <= i < 5 for _, i in mix_plan("uniform", tasks, 100, 5))


def test_protocols_scenario_compares_v2_with_v1(text_model_dir, tmp_path):
    out = tmp_path / "protocols.json"
    result = run_bench(
        "--model", str(text_model_dir), "--scenario", "protocols", "--requests", "120",
        "--clients", "8", "--warmup", "10", "--v2-rows", "1,4", "--rounds", "2",
        "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("protocols (2 tasks, 8 clients)") and last.endswith("errors 0")
    report = json.loads(out.read_text())
    rows = {(r["protocol"], r["rows_per_request"]): r for r in report["rows"]}
    assert set(rows) == {("deepsurgery.v1", 1), ("open-inference", 1), ("open-inference", 4)}
    assert all(r["errors"] == 0 and r["requests"] == 120 for r in rows.values())
    four = rows["open-inference", 4]
    assert four["predictions_per_s"] == pytest.approx(4 * four["throughput_rps"], rel=0.01)
    assert set(report["v2_vs_v1"]) == {
        "open-inference ModelInfer x1",
        "open-inference ModelInfer x4",
    }


def test_core_overhead_bench_reports_both_protocols(text_model_dir, tmp_path):
    out = tmp_path / "core.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench.core_overhead", "--model", str(text_model_dir),
         "--requests", "100", "--clients", "8", "--warmup", "10", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith("core_overhead (news, 8 clients)")
    report = json.loads(out.read_text())
    assert [r["protocol"] for r in report["rows"]] == ["deepsurgery.v1", "open-inference"]
    for r in report["rows"]:
        assert 1 <= r["mean_batch_rows"] <= 32 and r["served_rows_per_s"] > 0
        want = r["served_rows_per_s"] / r["bare_run_rows_per_s"]
        assert r["ratio"] == pytest.approx(want, abs=1e-3)
        # the server did the bare loop's work and more, and the load generator used CPU too
        assert r["server_cpu_ms_per_row"] > 0 and r["client_cpu_ms_per_row"] > 0
        bare, server = r["bare_cpu_ms_per_row"], r["server_cpu_ms_per_row"]
        assert bare > 0, r
        cpu = bare / server
        # each field is rounded to 3 decimals: allow the ratio of the rounded fields that slack
        slack = 5e-4 + cpu * (5e-4 / bare + 5e-4 / server)
        assert r["cpu_ratio"] == pytest.approx(cpu, abs=slack)
    assert report["batch_rows_histogram"]["+Inf"] > 0


def test_batch_sizes_replayed_with_the_servers_mean():
    from bench.core_overhead import sizes_with_mean

    sizes = sizes_with_mean(5.25, 100, 32)
    assert set(sizes) == {5, 6} and sum(sizes) / 100 == 5.25
    assert sizes_with_mean(40.0, 3, 32) == [32, 32, 32] and sizes_with_mean(0.5, 2, 32) == [1, 1]
