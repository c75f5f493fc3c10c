"""Benchmark: the server's peak memory and aggregation speed as the number of sites grows.

    python benchmarks/aggregation_memory.py                          # 3, 8, 32 sites, AH-Net (38 M), 3 rounds
    python benchmarks/aggregation_memory.py --sites 2,3 --params 0.1M --rounds 2     # smoke run

For each site count the real server (``run_server``, its own process, the
same instrumented server as benchmarks/round_overhead.py) runs ``--rounds``
rounds with the dice-weighted aggregator against lightweight sites: a few
client processes (``--client-procs``), each hosting several sites as asyncio
tasks, every site with its own kit and mutual-TLS WebSocket connection. A
site speaks the protocol as ``run_client`` does (HELLO, then for each TRAIN an
UPDATE made by ``to_frames``) but trains nothing: it sends the model's
initial weights with val Dice 0.8. At most ``--upload-concurrency`` sites
upload at the same time (0: all at once), so that the comparison between
site counts measures what the server keeps per site, not how many 150 MB
messages happen to be in flight together.

Measured in the server process: peak RSS (``/proc/self/status`` VmHWM) over
the training rounds (read at the last RoundCompleted) and over the whole run
(which adds the final step: the final and best models sent to every site),
and the time spent in ``aggregator.add`` per update (validation plus the
float64 running weighted mean). Throughput = fp32 bytes folded / time. The
baseline is a plain NumPy weighted sum of the same tensors, in the parent
process: ``np.multiply(x, w, out=tmp); np.add(acc, tmp, out=acc)`` in fp32,
and the same with fp64 temporaries and accumulator (as fedseg accumulates).
Target: peak RSS at the largest site count <= 1.2 x at the smallest.

Writes JSON to benchmarks/results/aggregation_memory.json (``--out``) and
prints a Markdown table. Memory: 32 sites of AH-Net need several GB for the
server and ~1-2 GB per client process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy
from websockets.asyncio.client import connect

sys.path.insert(0, str(Path(__file__).resolve().parent))
from round_overhead import (  # the shared instrumented server and helpers
    RESULTS,
    SERVER_HOST,
    SPAWN,
    UPDATE_BODY,
    free_port,
    machine,
    make_weights,
    provision,
    quiet_logging,
    round_intervals,
    start_server,
    supervise,
    wait_listening,
)

from model_layouts import parse_tokens  # noqa: E402

from fedseg.federation.protocol.chunks import Reassembler, to_frames
from fedseg.federation.protocol.constants import DEFAULT_MAX_FRAME, PROTOCOL_VERSION
from fedseg.federation.protocol.frames import encode
from fedseg.federation.transport.kit import load_kit
from fedseg.federation.transport.tls import client_context
from fedseg.federation.protocol.schemas import Message, MessageType

GB = 1e9

# --------------------------------------------------------------------------- lightweight sites


async def _acquire(semaphore: Any) -> None:
    """A multiprocessing semaphore, without blocking the event loop (or a thread that outlives it)."""
    while not semaphore.acquire(block=False):
        await asyncio.sleep(0.005)


async def _one_site(kit_dir: str, port: int, weights: dict[str, np.ndarray], semaphore: Any, stats: dict[str, Any]) -> None:
    kit = load_kit(Path(kit_dir))
    async with connect(
        f"wss://{SERVER_HOST}:{port}", ssl=client_context(kit), max_size=DEFAULT_MAX_FRAME,
        compression=None, ping_interval=None, open_timeout=300,
    ) as ws:
        await ws.send(encode(Message(MessageType.HELLO, site=kit.name, body={"versions": [PROTOCOL_VERSION]})))
        reassembler = Reassembler()
        async for frame in ws:
            if isinstance(frame, str):
                raise TypeError("the server sent a text frame")
            message = reassembler.feed(frame)
            del frame  # do not hold a 64 MiB chunk while waiting for an upload slot
            if message is None:
                continue
            if message.type is MessageType.TRAIN:
                number = message.round
                del message  # the received global model is not needed
                if semaphore is not None:
                    await _acquire(semaphore)
                try:
                    start = time.perf_counter()
                    update = Message(MessageType.UPDATE, round=number, site=kit.name, body=UPDATE_BODY, tensors=weights)
                    for piece in to_frames(update):
                        await ws.send(piece)
                    stats["updates"] += 1
                    stats["upload_s"].append(time.perf_counter() - start)
                finally:
                    if semaphore is not None:
                        semaphore.release()
            elif message.type is MessageType.DONE:
                return
            elif message.type in (MessageType.ERROR, MessageType.REFUSE):
                raise RuntimeError(f"{kit.name}: server said {message.type.name}: {message.body}")
    raise RuntimeError(f"{kit.name}: the server closed the connection before DONE")


def light_sites(cfg: dict[str, Any], semaphore: Any) -> None:
    """Client process hosting ``cfg["sites"]``: cfg: kits, sites, port, weights, result."""
    quiet_logging()
    weights = safetensors.numpy.load_file(cfg["weights"])
    stats: dict[str, Any] = {"updates": 0, "upload_s": []}
    port = int(cfg["port"])
    wait_listening(port, None, 300)

    async def main() -> None:
        await asyncio.gather(*(_one_site(str(Path(cfg["kits"]) / s), port, weights, semaphore, stats) for s in cfg["sites"]))

    asyncio.run(main())
    Path(cfg["result"]).write_text(json.dumps(stats))


# --------------------------------------------------------------------------- NumPy baseline


def numpy_baseline(weights: dict[str, np.ndarray], reps: int) -> dict[str, float]:
    """Seconds per update of a plain weighted sum, fp32 and fp64 accumulators (median of ``reps``)."""
    floats = {n: a for n, a in weights.items() if a.dtype.kind == "f"}
    result = {}
    for label, dtype in (("f32", np.float32), ("f64", np.float64)):
        acc = {n: np.zeros(a.shape, dtype) for n, a in floats.items()}
        tmp = {n: np.empty(a.shape, dtype) for n, a in floats.items()}
        times = []
        for rep in range(reps + 1):
            w = 1.0 / (rep + 1)
            start = time.perf_counter()
            for name, x in floats.items():
                np.multiply(x, w, out=tmp[name], dtype=dtype)
                np.add(acc[name], tmp[name], out=acc[name])
            times.append(time.perf_counter() - start)
        result[label] = statistics.median(times[1:])  # the first pass faults the pages in
        del acc, tmp
    return result


# --------------------------------------------------------------------------- one site count


def run_sites(count: int, args: argparse.Namespace, work: Path, kits: Path, all_sites: list[str], weights_file: Path) -> dict[str, Any]:
    sites = all_sites[:count]
    study_dir = work / f"sites{count}"
    study_dir.mkdir()
    port = free_port()
    cfg = {
        "kit": str(kits / "server"), "run_dir": str(study_dir / "run"), "weights": str(weights_file),
        "sites": sites, "rounds": args.rounds, "port": port, "round_timeout_s": args.timeout,
        "result": str(study_dir / "server.json"),
    }
    concurrency = args.upload_concurrency
    semaphore = SPAWN.Semaphore(concurrency) if concurrency > 0 else None
    procs = max(1, min(args.client_procs, count))
    processes = {"server": start_server(cfg)}
    try:
        for index in range(procs):
            client_cfg = {
                "kits": str(kits), "sites": sites[index::procs], "port": port, "weights": str(weights_file),
                "result": str(study_dir / f"clients{index}.json"),
            }
            name = f"clients{index}"
            processes[name] = SPAWN.Process(target=light_sites, args=(client_cfg, semaphore), name=name)
            processes[name].start()
    finally:
        supervise(processes, args.timeout)
    server = json.loads((study_dir / "server.json").read_text())
    clients = [json.loads((study_dir / f"clients{i}.json").read_text()) for i in range(procs)]
    adds = server["add"]
    add_s = statistics.median(a["s"] for a in adds)
    folded = statistics.median(a["bytes"] for a in adds)
    validate_s = statistics.median(server["validate_s"])
    peak_rounds = server["rounds"][-1]["hwm_mb"]
    return {
        "sites": count,
        "client_procs": procs,
        "upload_concurrency": concurrency,
        "updates_aggregated": len(adds),
        "updates_sent": sum(c["updates"] for c in clients),
        "rss_before_mb": server["rss_before_mb"],
        "peak_rss_rounds_mb": peak_rounds,
        "peak_rss_end_mb": server["hwm_end_mb"],
        "ru_maxrss_mb": server["ru_maxrss_mb"],
        "growth_rounds_mb": peak_rounds - server["rss_before_mb"],
        "hwm_per_round_mb": [r["hwm_mb"] for r in server["rounds"]],
        "bytes_folded_per_update": folded,
        "median_add_s": add_s,
        "median_validate_s": validate_s,
        "median_finish_s": statistics.median(server["finish_s"]),
        "add_gbps": folded / add_s / GB,
        "fold_gbps": folded / max(add_s - validate_s, 1e-12) / GB,
        "round_s": round_intervals(server["rounds"]),
        "first_round_s": server["rounds"][0]["t_done"] - server["rounds"][0]["t_train"],
        "median_commit_s": statistics.median(server["commit_s"]),
    }


def markdown(rows: list[dict[str, Any]], label: str, params: int, numpy_gbps: dict[str, float]) -> str:
    first = rows[0]["peak_rss_rounds_mb"]
    lines = [
        (
            "| sites | model | peak RSS, rounds (MB) | vs first | peak RSS incl. final step (MB) | RSS before (MB) "
            "| add per update (s) | fedseg add GB/s | fold only GB/s | NumPy f32 GB/s | NumPy f64 GB/s |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['sites']} | {label} {params / 1e6:.1f} M | {r['peak_rss_rounds_mb']:.0f} | {r['peak_rss_rounds_mb'] / first:.2f} "
            f"| {r['peak_rss_end_mb']:.0f} | {r['rss_before_mb']:.0f} | {r['median_add_s']:.4f} | {r['add_gbps']:.2f} "
            f"| {r['fold_gbps']:.2f} | {numpy_gbps['f32']:.2f} | {numpy_gbps['f64']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", default="3,8,32", help="comma list of site counts")
    parser.add_argument("--params", default="ahnet", help="'ahnet' (AH-Net state dict, 38 M) or a synthetic count such as 0.1M, 38M")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--upload-concurrency", type=int, default=3, help="sites uploading at once (0: all at once)")
    parser.add_argument("--client-procs", type=int, default=4, help="processes hosting the site connections")
    parser.add_argument("--numpy-reps", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=3600.0, help="give up on one site count after this many seconds")
    parser.add_argument("--workdir", type=Path, default=None, help="kits, weights and run directories (default: a temp folder)")
    parser.add_argument("--out", "--json", dest="out", type=Path, default=RESULTS / "aggregation_memory.json")
    args = parser.parse_args()
    counts = sorted({int(s) for s in args.sites.split(",") if s.strip()})
    tokens = parse_tokens(args.params)
    if len(tokens) != 1 or not counts or counts[0] < 1 or args.rounds < 1 or args.upload_concurrency < 0:
        parser.error("one --params model, site counts >= 1, --rounds >= 1, --upload-concurrency >= 0")
    all_sites = [f"site{i:02d}" for i in range(counts[-1])]
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="aggregation_memory-") as tmp:
        work = Path(tmp)
        kits = provision(work, all_sites)
        layout, weights = make_weights(tokens[0])
        label = "AH-Net" if layout == "ahnet" else "scaled AH-Net"
        n_params, raw = sum(a.size for a in weights.values()), sum(a.nbytes for a in weights.values())
        weights_file = work / "weights.safetensors"
        safetensors.numpy.save_file(weights, str(weights_file))
        del weights
        rows = [run_sites(count, args, work, kits, all_sites, weights_file) for count in counts]
        weights = safetensors.numpy.load_file(str(weights_file))
    float_bytes = sum(a.nbytes for a in weights.values() if a.dtype.kind == "f")
    numpy_s = numpy_baseline(weights, args.numpy_reps)
    numpy_gbps = {k: float_bytes / s / GB for k, s in numpy_s.items()}
    first, last = rows[0]["peak_rss_rounds_mb"], rows[-1]["peak_rss_rounds_mb"]
    record = {
        "benchmark": "aggregation_memory",
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "model": label,
        "params": n_params,
        "raw_bytes": raw,
        "rounds": args.rounds,
        "aggregator": "dice-weighted",
        "numpy_s_per_update": numpy_s,
        "numpy_gbps": numpy_gbps,
        "peak_ratio_last_vs_first": last / first,
        "target_peak_ratio": 1.2,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1))
    print(markdown(rows, label, n_params, numpy_gbps))
    print(f"\npeak RSS over the rounds at {counts[-1]} sites / at {counts[0]} sites: {last / first:.2f} (target <= 1.2); "
          f"uploads at once: {args.upload_concurrency or 'all'}")


if __name__ == "__main__":
    main()
