"""Flower round-overhead benchmark stays runnable (skipped unless Flower is installed).

CI does not install the ``bench`` extra, so this only runs where ``flwr`` is
importable: it starts a real SuperLink and three SuperNodes over TLS on
127.0.0.1 for two rounds of a one-array 0.1 M model. No timing is asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("flwr")

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.slow
def test_flower_round_overhead_benchmark_smoke(tmp_path):
    out = tmp_path / "result.json"
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "flower_round_overhead.py"),
         "--params", "0.1M", "--arrays", "1", "--rounds", "2", "--sleep", "0.1", "--timeout", "300", "--out", str(out)],
        check=False, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    record = json.loads(out.read_text())["results"][0]
    assert record["errors"] == [], record
    assert record["params"] == 100_000 and record["rounds"] == 2
    assert len(record["per_round_s"]) == 2 and record["median_round_s"] > 0.1
    assert record["replies_per_round"] == [3, 3]
    assert "| 0.1M | 100,000 |" in result.stdout
