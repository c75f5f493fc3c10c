"""Benchmarks stay runnable: each runs once on a tiny input (no timing asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_data_pipeline_benchmark_smoke(tmp_path):
    out = tmp_path / "result.json"
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "data_pipeline.py"), "--cases", "1", "--sites", "suny", "--quick", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    record = json.loads(out.read_text())
    assert record["rows"][0]["site"] == "suny" and record["rows"][0]["synth_s"] > 0
    assert "| suny | 1 |" in result.stdout


def test_training_throughput_benchmark_smoke(tmp_path):
    out = tmp_path / "result.json"
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "training_throughput.py"), "--quick", "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    record = json.loads(out.read_text())
    assert record["engine_patches_per_s"] > 0 and record["monai_patches_per_s"] > 0
    assert "ratio engine / MONAI" in result.stdout
