"""Benchmark: synthetic-site generation and preprocessing speed and peak memory.

    python benchmarks/data_pipeline.py --cases 100            # the issue's target: 100 cases/site < 2 min
    python benchmarks/data_pipeline.py --cases 2 --quick      # smoke run (coarse voxels)

Each site is generated, then prepared at 1 mm, in a fresh child process so
its peak RSS is its own. Writes JSON to benchmarks/results/data_pipeline.json
and prints a Markdown table (pasted into docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
from fedseg.data.site_profiles import get_profile
from fedseg.data.synth import synthesize_site
from fedseg.data.preprocess import PrepareConfig, prepare_site
site, cases, out, scale = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), float(sys.argv[4])
t0 = time.perf_counter()
synthesize_site(out / site, get_profile(site), cases, seed=0, resolution_scale=scale)
t1 = time.perf_counter()
synth_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
prepare_site(out / site, out / f"{site}-1mm", PrepareConfig(spacing_mm=1.0))
t2 = time.perf_counter()
print(json.dumps({"synth_s": t1 - t0, "prepare_s": t2 - t1, "synth_peak_rss_mb": synth_rss / 1024,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run_site(site: str, cases: int, scale: float, workdir: Path) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", CHILD, site, str(cases), str(workdir), str(scale)],
        check=True, capture_output=True, text=True,
    )
    row = json.loads(result.stdout.strip().splitlines()[-1])
    return {"site": site, "cases": cases, **row}


def markdown(rows: list[dict]) -> str:
    lines = [
        "| site | cases | synth wall (s) | s/case | synth peak RSS (MB) | prepare 1 mm wall (s) | s/case | peak RSS (MB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        n = r["cases"]
        lines.append(
            f"| {r['site']} | {n} | {r['synth_s']:.1f} | {r['synth_s'] / n:.2f} | {r['synth_peak_rss_mb']:.0f} "
            f"| {r['prepare_s']:.1f} | {r['prepare_s'] / n:.2f} | {r['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=100)
    parser.add_argument("--sites", default="nci,suny,ucla,prostatex")
    parser.add_argument("--quick", action="store_true", help="coarse voxels (resolution_scale 3): smoke run only")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "data_pipeline.json")
    args = parser.parse_args()
    scale = 3.0 if args.quick else 1.0
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run_site(s, args.cases, scale, Path(tmp)) for s in args.sites.split(",")]
    record = {
        "benchmark": "data_pipeline",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "resolution_scale": scale,
        "rows": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=1))
    print(markdown(rows))


if __name__ == "__main__":
    main()
