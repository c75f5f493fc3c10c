"""Benchmarks stay runnable: each runs once on a tiny input (no timing asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # every benchmark runs as its own process

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


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
    assert "ratio engine / MONAI" in result.stdout and "engine / previous engine" in result.stdout
    loops = {row["loop"] for row in record["rows"]}
    assert {"engine", "previous engine", "bare MONAI", "engine, 1 loader worker"} <= loops
    assert record["workload"]["augment"] == "full BigAug stack, elastic p = 0.1"
    assert all(0 < row["augmentation_share"] for row in record["rows"])


def test_gpu_benchmark_rehearses_on_the_cpu(tmp_path):
    """benchmarks/gpu_training.py --device cpu --quick: the GPU script's code path, minus CUDA (unet-small to stay quick)."""
    out = tmp_path / "gpu.json"
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "gpu_training.py"), "--device", "cpu", "--quick", "--network", "unet-small",
         "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    record = json.loads(out.read_text())
    (row,) = record["rows"]
    assert row["precision"] == "fp32" and row["patches_per_s"] > 0 and row["gpu_utilisation_pct"] is None
    assert record["projection"]["total_h"] > 0 and record["amp_dice"][0]["epochs"] == 1
    assert "paper-profile study on one GPU" in result.stdout
