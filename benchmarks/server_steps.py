"""Benchmark: where the server's CPU goes in one round, piece by piece (one process, no network).

    python benchmarks/server_steps.py                 # AH-Net's state dict (38 M, 153 MB), median of 5
    python benchmarks/server_steps.py --reps 1        # quick

Times the pieces a round of ``benchmarks/round_overhead.py`` runs on the
server for three sites, in isolation: encoding TRAIN (safetensors + CHUNK
frames), receiving one UPDATE (frame checks, joining the chunks, decoding),
validating it, aggregating three updates with the Dice-weighted aggregator,
and committing the new global model to disk. Explains the gap between the
round overhead and the TLS floor (docs/benchmarks.md). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedseg.federation.protocol.chunks import Reassembler, to_frames
from fedseg.federation.deploy.rundir import _save_tensors
from fedseg.federation.strategies import Update, make_aggregator, validate_update
from fedseg.federation.protocol.schemas import Message, MessageType
from fedseg.models import build_model


def timed(fn: Callable[[], Any], reps: int) -> tuple[float, Any]:
    """(median seconds, last result) of ``reps`` calls."""
    seconds, result = [], None
    for _ in range(reps):
        start = time.perf_counter()
        result = fn()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--sites", type=int, default=3)
    args = parser.parse_args()
    weights = {k: v.numpy().copy() for k, v in build_model("ahnet").state_dict().items()}
    rows: list[tuple[str, float]] = []

    def add(label: str, fn: Callable[[], Any]) -> Any:
        seconds, result = timed(fn, args.reps)
        rows.append((label, seconds))
        return result

    frames = add("encode TRAIN: safetensors + CHUNK frames",
                 lambda: to_frames(Message(MessageType.TRAIN, round=1, body={"epochs": 1}, tensors=weights)))

    def receive() -> Message | None:
        reassembler, message = Reassembler(), None
        for frame in frames:
            message = reassembler.feed(frame)
        return message

    message = add("receive one UPDATE: frame checks, join, decode", receive)
    update = Update(site="site0", weights=message.tensors, num_samples=10, val_dice=0.8)
    add("validate one update", lambda: validate_update(weights, update))
    aggregator = make_aggregator("dice-weighted")

    def aggregate() -> Any:
        aggregator.start_round(weights)
        for i in range(args.sites):
            aggregator.add(Update(site=f"site{i}", weights=message.tensors, num_samples=10, val_dice=0.8))
        return aggregator.finish()

    result = add(f"aggregate {args.sites} updates (start, add each, finish)", aggregate)
    with tempfile.TemporaryDirectory() as tmp:
        add("commit the global model (safetensors, fsync)", lambda: _save_tensors(Path(tmp) / "global.safetensors", result.weights))
    raw = sum(a.nbytes for a in weights.values())
    print(f"AH-Net: {raw / 1e6:.1f} MB in {len(weights)} tensors; {len(frames)} frames; median of {args.reps}\n")
    print("| server step | s |\n|---|---|")
    for label, seconds in rows:
        print(f"| {label} | {seconds:.3f} |")


if __name__ == "__main__":
    main()
