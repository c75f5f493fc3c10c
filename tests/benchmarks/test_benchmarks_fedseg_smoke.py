"""The federation benchmarks stay runnable: each runs once with a tiny model (no timing asserted).

Both start real processes (a server and its sites over mutual TLS on 127.0.0.1);
on an idle machine each takes a few seconds, most of it process start-up.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # every benchmark runs as its own process

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def run_benchmark(script: str, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args], check=False, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_round_overhead_benchmark_smoke(tmp_path):
    out = tmp_path / "round_overhead.json"
    result = run_benchmark(
        "round_overhead.py", "--params", "0.1M", "--rounds", "2", "--sleep", "0.05", "--floor-reps", "2",
        "--workdir", str(tmp_path / "work"), "--out", str(out),
    )
    record = json.loads(out.read_text())
    assert record["benchmark"] == "round_overhead" and record["sites"] == 3 and record["timed_rounds"] == 2
    (row,) = record["rows"]
    assert row["params"] == 100_000 and row["raw_bytes"] == 400_000
    assert len(row["round_s"]) == 2 and all(t > 0.05 for t in row["round_s"])  # each round includes the 0.05 s epoch
    for key in ("median_round_s", "overhead_s", "median_floor_s", "overhead_over_floor", "median_commit_s", "server_peak_rss_mb"):
        assert row[key] > 0, key
    assert row["wire_bytes_per_site_round"] == row["train_bytes"] + row["update_bytes"] > 2 * row["raw_bytes"]
    assert row["tensors"] == 735 and row["layout"] == "ahnet-scaled"  # the same tensors Flower's benchmark moves
    # 735 safetensors header entries (~57 kB) on 0.4 MB of values; at AH-Net's size the ratio is ~1.0006
    assert 1.0 < row["wire_ratio"] < 1.2
    assert row["audit_update_bytes"] == [row["update_bytes"]]  # what run_client logged it sent
    assert "| 0.1M | 0.1 M | 0.4 |" in result.stdout


def test_aggregation_memory_benchmark_smoke(tmp_path):
    out = tmp_path / "aggregation_memory.json"
    result = run_benchmark(
        "aggregation_memory.py", "--sites", "2,3", "--params", "0.1M", "--rounds", "2", "--numpy-reps", "2",
        "--workdir", str(tmp_path / "work"), "--out", str(out),
    )
    record = json.loads(out.read_text())
    assert record["benchmark"] == "aggregation_memory" and record["params"] == 100_000
    assert [row["sites"] for row in record["rows"]] == [2, 3]
    for row in record["rows"]:
        assert row["updates_aggregated"] == row["updates_sent"] == 2 * row["sites"]
        assert row["bytes_folded_per_update"] == 400_000
        for key in ("peak_rss_rounds_mb", "peak_rss_end_mb", "rss_before_mb", "median_add_s", "add_gbps", "fold_gbps"):
            assert row[key] > 0, key
        assert row["peak_rss_end_mb"] >= row["peak_rss_rounds_mb"]
    assert record["numpy_gbps"]["f32"] > 0 and record["numpy_gbps"]["f64"] > 0
    assert record["peak_ratio_last_vs_first"] > 0
    assert "| 3 | scaled AH-Net 0.1 M |" in result.stdout


def test_server_steps_benchmark_smoke():
    result = run_benchmark("server_steps.py", "--reps", "1")
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and not line.startswith("| server step")]
    assert len(rows) == 5, result.stdout
    assert all(float(row.rsplit("|", 2)[1]) > 0 for row in rows)
    assert "735 tensors; 146 frames" in result.stdout


def test_robustness_benchmark_quick(tmp_path):
    """The attack suite in quick mode: every study ends, nothing crashes, hangs or is poisoned."""
    out = tmp_path / "robustness.json"
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "robustness.py"), "--quick", "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) >= 25
    assert sum(r["crashes"] for r in rows) == 0 and sum(r["hangs"] for r in rows) == 0
    assert sum(r["poisoned"] for r in rows) == 0
    accepted = ("huge integer buffer", "honest weights, Dice 1.0", "sans-I/O")  # by design: neutralised, capped, or valid
    must_refuse = [r for r in rows if not any(a in r["attack"] for a in accepted)]
    assert all(r["refused"] == r["tried"] > 0 for r in must_refuse), [r for r in must_refuse if r["refused"] != r["tried"]]
