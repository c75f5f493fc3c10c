"""Benchmark: per-round overhead of a federated round over real mutual TLS, vs a plain TLS floor.

    python benchmarks/round_overhead.py                                   # 1 M, AH-Net (38 M), 150 M; 5 timed rounds
    python benchmarks/round_overhead.py --params 0.1M --rounds 2 --sleep 0.05 --floor-reps 2   # smoke run
    pip install -e '.[bench]' && python benchmarks/round_overhead.py --flower   # + Flower 1.42 on the same models
    python benchmarks/round_overhead.py --secure-aggregation --out benchmarks/results/round_overhead_secure.json
        # each model twice in the same run: plain, then with secure aggregation on (ratio = secure / plain overhead)

Models (benchmarks/model_layouts.py): ``ahnet`` is AH-Net's state dict (735
tensors, 38 M values); a count such as 1M or 150M scales AH-Net's per-tensor
sizes to that total (still 735 tensors), so fedseg and Flower move the same
tensors and per-tensor costs are compared fairly.

For each model the server (``run_server``) and three site clients
(``run_client``) run as SEPARATE processes (multiprocessing, spawn) on
127.0.0.1 over wss:// with the study's mutual-TLS certificates. A site's
"training" is a fake trainer: it adds 1e-6 in place to the received float
tensors and sleeps for the rest of ``--sleep`` seconds (so an epoch takes
exactly ``--sleep``), then answers val Dice 0.8 from 10 samples.

Round time is taken on the server: the interval between consecutive
RoundCompleted events of the round machine (``run_server``'s ``on_event``),
so it covers committing the previous round to the run directory, encoding
and sending TRAIN to the three sites, the sites' decode/epoch/encode, the
UPDATEs back, their decoding, validation and aggregation. ``--rounds`` rounds
are timed after one warm-up round (round 0, which has no previous event).
Overhead = median round time - ``--sleep``.

The floor is the time to move the same bytes through plain TLS sockets
(``ssl`` module, the same certificates and contexts, connections already
open): three site processes connected at once, the server (one thread per
connection) sends each site the TRAIN's wire bytes and reads back the
UPDATE's, median of ``--floor-reps`` repetitions.

Wire bytes per site per round are the sizes of the frames ``to_frames``
makes for TRAIN and UPDATE (WebSocket framing adds 10-14 bytes per frame,
TLS ~0.1-0.2 %); ratio = wire / (2 x raw tensor bytes), target <= 1.01.

With ``--secure-aggregation`` every model runs twice, one study after the
other in the same run: plain, then ``secure_aggregation`` on (pairwise masks,
the sites' shares, unmasking of the sum; 3 sites, threshold 2). The site's
fake epoch is the same sleep; the masking happens after it (a real epoch's
key exchange overlaps training; the masks are computed once the epoch ends).
"add" is then the time to fold one masked payload into the running sum, and
the unmasking time is reported per round.

Writes JSON to benchmarks/results/round_overhead.json (``--out``) and prints a
Markdown table. Memory: the 150 M model (600 MB fp32) needs ~16 GB of RAM in
all (server + three clients each holding several copies in flight) and a few
GB of disk under ``--workdir``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import math
import json
import logging
import multiprocessing as mp
import os
import platform
import resource
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy
import websockets

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_layouts import ahnet_shapes, layout_for, parse_tokens  # noqa: E402

from fedseg.federation.protocol.chunks import to_frames
from fedseg.federation.deploy.provision import provision_study
from fedseg.federation.transport.kit import StudyCA, load_certificate, load_kit
from fedseg.federation.transport.tls import client_context, server_context
from fedseg.federation.protocol.schemas import Message, MessageType

RESULTS = Path(__file__).parent / "results"
SERVER_HOST = "127.0.0.1"
MB = 1e6
SPAWN = mp.get_context("spawn")
UPDATE_BODY = {"num_samples": 10, "val_dice": 0.8, "metrics": {"train_loss": 0.1}}  # what the fake trainer reports

# --------------------------------------------------------------------------- models


def make_weights(token: str, seed: int = 0) -> tuple[str, dict[str, np.ndarray]]:
    """(layout, state dict): AH-Net's real state dict for ``ahnet``, else fp32 arrays laid out as
    ``model_layouts.layout_for`` says (AH-Net's 735 tensors scaled), the same arrays Flower's benchmark moves."""
    if token.lower() == "ahnet":
        from fedseg.models import build_model  # torch only when needed

        state = build_model("ahnet", seed=seed).state_dict()
        return "ahnet", {name: tensor.detach().cpu().numpy().copy() for name, tensor in state.items()}
    layout, shapes = layout_for(token, ahnet_shapes())
    rng = np.random.default_rng(seed)
    weights = {
        f"layer{index:04d}.weight": rng.standard_normal(math.prod(shape), dtype=np.float32).reshape(shape) * np.float32(0.02)
        for index, shape in enumerate(shapes)
    }
    return layout, weights


def raw_bytes(weights: dict[str, np.ndarray]) -> int:
    return sum(a.nbytes for a in weights.values())


def wire_sizes(weights: dict[str, np.ndarray], site: str) -> tuple[int, int, int, int]:
    """(TRAIN bytes, TRAIN frames, UPDATE bytes, UPDATE frames) as ``to_frames`` makes them."""
    frames = to_frames(Message(MessageType.TRAIN, round=1, body={"epochs": 1}, tensors=weights))
    down = (sum(len(f) for f in frames), len(frames))
    del frames
    frames = to_frames(Message(MessageType.UPDATE, round=1, site=site, body=UPDATE_BODY, tensors=weights))
    up = (sum(len(f) for f in frames), len(frames))
    return down[0], down[1], up[0], up[1]


# --------------------------------------------------------------------------- process helpers


def machine() -> str:
    return (
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"numpy {np.__version__}, websockets {websockets.__version__}, {ssl.OPENSSL_VERSION}"
    )


def proc_status_mb(field: str, pid: int | str = "self") -> float | None:
    """A ``/proc/PID/status`` memory field (VmRSS, VmHWM) in MB, or None where there is no /proc."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / MB
    except OSError:
        return None
    return None


def quiet_logging() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(processName)s %(name)s: %(message)s")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((SERVER_HOST, 0))
        return sock.getsockname()[1]


def provision(work: Path, sites: list[str]) -> Path:
    """Throw-away kits for ``sites``: server certificate for 127.0.0.1 (IP SAN)."""
    kits = work / "kits"
    provision_study(SERVER_HOST, sites, kits, study="bench", port=free_port())
    return kits


def wait_listening(port: int, server: Any | None, timeout_s: float) -> None:
    """Until something accepts TCP connections on ``port``; raises if the ``server`` process dies first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server is not None and not server.is_alive():
            raise RuntimeError(f"the server process exited with code {server.exitcode} before listening")
        try:
            with socket.create_connection((SERVER_HOST, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"the server did not listen on port {port} within {timeout_s:.0f} s")


def supervise(processes: dict[str, Any], timeout_s: float) -> None:
    """Wait for every process; the first failure (or the timeout) terminates the others and raises."""
    deadline = time.monotonic() + timeout_s
    try:
        while any(p.is_alive() for p in processes.values()):
            failed = {n: p.exitcode for n, p in processes.items() if p.exitcode not in (None, 0)}
            if failed:
                raise RuntimeError(f"process(es) failed: {failed} (see their stderr above)")
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {timeout_s:.0f} s")
            time.sleep(0.05)
        failed = {n: p.exitcode for n, p in processes.items() if p.exitcode != 0}
        if failed:
            raise RuntimeError(f"process(es) failed: {failed} (see their stderr above)")
    finally:
        for process in processes.values():
            if process.is_alive():
                process.terminate()
        for process in processes.values():
            process.join(10)


# --------------------------------------------------------------------------- the server process


def serve_study(cfg: dict[str, Any]) -> None:
    """Server process: ``run_server`` with timing hooks; writes what it measured to ``cfg["result"]``.

    cfg: kit, run_dir, weights (safetensors file), sites, rounds, port, round_timeout_s, result.
    Recorded: per round the first SendTrain and the RoundCompleted time (perf_counter), process CPU
    time and VmHWM at RoundCompleted; per update the time in ``aggregator.add`` (and the part in
    ``validate_update``); ``finish`` and the run directory commit per round; RSS before serving and
    the peak (VmHWM, ru_maxrss) at the end.
    """
    quiet_logging()
    from fedseg.federation.deploy.spool import SPOOL, DiskStore
    from fedseg.federation.strategies import WeightedMean
    from fedseg.federation.strategies import screened as strategy_mean
    from fedseg.federation.protocol.rounds import (
        RoundCompleted,
        RoundsConfig,
        SendTrain,
        StudyDone,
    )
    from fedseg.federation.deploy.rundir import RunDir
    from fedseg.federation.transport.server import run_server

    from fedseg.federation.protocol.secagg import SecureRound, SecureSettings
    from fedseg.federation.strategies import SecureMean

    log: dict[str, Any] = {"add": [], "validate_s": [], "finish_s": [], "commit_s": [], "unmask_s": [], "rounds": {}}
    original_validate = strategy_mean.validate_update
    secure = int(cfg.get("secure") or 0)  # 0: plain; 64 or 32: the ring's width

    def timed_validate(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return original_validate(*args, **kwargs)
        finally:
            log["validate_s"].append(time.perf_counter() - start)

    strategy_mean.validate_update = timed_validate  # ScreenedAggregator.add looks it up in its module: time its share

    class TimedAggregator(WeightedMean):
        def add(self, update: Any) -> float:
            start = time.perf_counter()
            raw = super().add(update)
            seconds = time.perf_counter() - start
            folded = sum(a.nbytes for a in update.weights.values() if a.dtype.kind == "f")
            log["add"].append({"s": seconds, "bytes": folded})
            return raw

        def finish(self) -> Any:
            start = time.perf_counter()
            result = super().finish()
            log["finish_s"].append(time.perf_counter() - start)
            return result

    def timed(method: Any, key: str, nbytes: Any = None) -> Any:
        def wrapper(self: Any, *args: Any) -> Any:
            start = time.perf_counter()
            try:
                return method(self, *args)
            finally:
                seconds = time.perf_counter() - start
                log[key].append({"s": seconds, "bytes": nbytes(*args)} if nbytes else seconds)
        return wrapper

    # secure aggregation: time folding each masked payload into the sum, and the unmasking
    SecureRound._masked = timed(SecureRound._masked, "add", lambda site, m: sum(a.nbytes for a in m.tensors.values()))
    SecureRound._unmask = timed(SecureRound._unmask, "unmask_s")

    class TimedSecureMean(SecureMean):
        def finish(self) -> Any:
            start = time.perf_counter()
            result = super().finish()
            log["finish_s"].append(time.perf_counter() - start)
            return result

    class TimedRunDir(RunDir):
        def save_round(self, completed: Any, server_optimizer: Any = None) -> Path:
            start = time.perf_counter()
            folder = super().save_round(completed, server_optimizer)
            log["commit_s"].append(time.perf_counter() - start)
            # housekeeping (not timed): keep the disk bounded; the server only reads back the
            # last round (resume) and the best one (final step)
            previous = self.round_folder(completed.round - 1) / "global.safetensors"
            if completed.round >= 1 and self.read_state().best_round != completed.round - 1:
                previous.unlink(missing_ok=True)
            return folder

    def round_entry(number: int) -> dict[str, Any]:
        return log["rounds"].setdefault(str(number), {"round": number})

    def on_event(action: Any) -> None:
        now = time.perf_counter()
        # keep numbers only: a RoundCompleted holds every update's weights
        if isinstance(action, SendTrain):
            round_entry(action.round).setdefault("t_train", now)
        elif isinstance(action, RoundCompleted):
            entry = round_entry(action.round)
            entry.update(t_done=now, cpu_s=time.process_time(), hwm_mb=proc_status_mb("VmHWM"))
        elif isinstance(action, StudyDone):
            log["t_study_done"] = now

    kit = load_kit(Path(cfg["kit"]))
    sites = tuple(cfg["sites"])
    initial = safetensors.numpy.load_file(cfg["weights"])
    log["rss_before_mb"] = proc_status_mb("VmRSS")
    log["hwm_before_mb"] = proc_status_mb("VmHWM")
    run_dir = TimedRunDir.create(Path(cfg["run_dir"]), {"benchmark": True, "sites": list(sites), "rounds": cfg["rounds"]})
    config = RoundsConfig(
        sites=sites, rounds=int(cfg["rounds"]), min_sites=len(sites), evaluate=False,
        secure=SecureSettings(ring_bits=int(secure)) if secure else None, certificates=StudyCA(load_certificate(kit.ca)) if secure else None,
    )
    # as fedseg server runs it: the round's updates wait on disk (deploy/spool.py), screening on;
    # secure: the running masked sum in memory, no update kept
    aggregator = TimedSecureMean("dice-weighted") if secure else TimedAggregator("dice-weighted", store=DiskStore(Path(cfg["run_dir"]) / SPOOL))
    study = run_server(
        kit, run_dir, config, aggregator, initial,
        host=SERVER_HOST, port=int(cfg["port"]), round_timeout_s=float(cfg["round_timeout_s"]), grace_s=60.0,
        on_event=on_event,
    )
    del initial
    log["t_serve"] = time.perf_counter()
    asyncio.run(study)
    log["hwm_end_mb"] = proc_status_mb("VmHWM")
    log["ru_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB  # Linux: KiB
    log["rounds"] = [log["rounds"][k] for k in sorted(log["rounds"], key=int)]
    Path(cfg["result"]).write_text(json.dumps(log))


def start_server(cfg: dict[str, Any]) -> Any:
    process = SPAWN.Process(target=serve_study, args=(cfg,), name="server")
    process.start()
    return process


def round_intervals(rounds: list[dict[str, Any]]) -> list[float]:
    """Seconds between consecutive RoundCompleted events (round 1 on; round 0 has no predecessor)."""
    done = [r["t_done"] for r in rounds]
    return [b - a for a, b in itertools.pairwise(done)]


# --------------------------------------------------------------------------- the site processes


class SleepTrainer:
    """A stand-in LocalTrainer: nudges the received weights by 1e-6 and sleeps the rest of ``sleep``."""

    def __init__(self, sleep: float) -> None:
        self.sleep = sleep
        self.epoch = 0
        self.weights: dict[str, Any] = {}
        self.max_work_s = 0.0

    def run_epoch(self, weights: dict[str, Any] | None = None, validate: bool | None = None) -> Any:
        import torch

        from fedseg.training.engine import EpochResult

        start = time.perf_counter()
        if weights is not None:
            self.weights = weights  # TorchParticipant hands over writable copies
        with torch.no_grad():
            for tensor in self.weights.values():
                if tensor.is_floating_point():
                    tensor.add_(1e-6)
        work = time.perf_counter() - start
        self.max_work_s = max(self.max_work_s, work)
        time.sleep(max(0.0, self.sleep - work))
        self.epoch += 1
        return EpochResult(
            epoch=self.epoch, weights=self.weights, num_samples=UPDATE_BODY["num_samples"],
            val_dice=UPDATE_BODY["val_dice"], train_loss=UPDATE_BODY["metrics"]["train_loss"],
            learning_rate=1e-3, seconds=time.perf_counter() - start,
        )


def overhead_client(cfg: dict[str, Any]) -> None:
    """Site process: ``run_client`` with a :class:`SleepTrainer`; cfg: kit, port, sleep, audit, result."""
    quiet_logging()
    import torch

    from fedseg.federation.transport.client import run_client
    from fedseg.site import TorchParticipant

    torch.set_num_threads(1)
    trainer = SleepTrainer(float(cfg["sleep"]))
    kit = load_kit(Path(cfg["kit"]))
    port = int(cfg["port"])
    wait_listening(port, None, 300)
    url = f"wss://{SERVER_HOST}:{port}"
    from fedseg.federation.protocol.secagg import SecureSettings

    secure = SecureSettings(ring_bits=int(cfg["secure"])) if cfg.get("secure") else None
    asyncio.run(run_client(kit, TorchParticipant(trainer), server_url=url, audit_log=Path(cfg["audit"]), retries=5, retry_delay_s=0.5,
                           secure=secure))
    Path(cfg["result"]).write_text(json.dumps({"epochs": trainer.epoch, "max_work_s": trainer.max_work_s}))


# --------------------------------------------------------------------------- TLS floor


def _send_n(sock: ssl.SSLSocket, n: int, block: memoryview) -> None:
    while n > 0:
        piece = block[: min(n, len(block))]
        sock.sendall(piece)
        n -= len(piece)


def _recv_n(sock: ssl.SSLSocket, n: int, buffer: memoryview) -> None:
    while n > 0:
        got = sock.recv_into(buffer, min(n, len(buffer)))
        if not got:
            raise ConnectionError(f"peer closed with {n} bytes still expected")
        n -= got


def floor_client(kit_dir: str, port: int, n_down: int, n_up: int, reps: int) -> None:
    """Floor site process: per repetition, read ``n_down`` bytes, then write ``n_up``."""
    kit = load_kit(Path(kit_dir))
    context = client_context(kit)
    block, buffer = memoryview(bytes(1 << 20)), memoryview(bytearray(1 << 20))
    with (
        socket.create_connection((SERVER_HOST, port), timeout=600) as raw,
        context.wrap_socket(raw, server_hostname=kit.server_name) as sock,
    ):
        for _ in range(reps):
            _recv_n(sock, n_down, buffer)
            _send_n(sock, n_up, block)


def _floor_exchange(sock: ssl.SSLSocket, n_down: int, n_up: int, errors: list[BaseException]) -> None:
    try:
        _send_n(sock, n_down, memoryview(bytes(1 << 20)))
        _recv_n(sock, n_up, memoryview(bytearray(1 << 20)))
    except BaseException as exc:  # noqa: BLE001 - reported by the caller
        errors.append(exc)


def tls_floor(kits: Path, sites: list[str], n_down: int, n_up: int, reps: int, timeout_s: float = 600.0) -> list[float]:
    """Seconds per repetition to move ``n_down`` bytes to and ``n_up`` bytes from every site at once."""
    context = server_context(load_kit(kits / "server"))
    with socket.create_server((SERVER_HOST, 0)) as listener:
        listener.settimeout(timeout_s)
        port = listener.getsockname()[1]
        clients = {s: SPAWN.Process(target=floor_client, args=(str(kits / s), port, n_down, n_up, reps), name=f"floor {s}") for s in sites}
        for process in clients.values():
            process.start()
        conns: list[ssl.SSLSocket] = []
        try:
            for _ in sites:
                raw, _address = listener.accept()
                raw.settimeout(timeout_s)
                conns.append(context.wrap_socket(raw, server_side=True))
            times = []
            for _ in range(reps):
                errors: list[BaseException] = []
                threads = [threading.Thread(target=_floor_exchange, args=(c, n_down, n_up, errors)) for c in conns]
                start = time.perf_counter()
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
                times.append(time.perf_counter() - start)
                if errors:
                    raise RuntimeError(f"TLS floor exchange failed: {errors[0]!r}")
        finally:
            for conn in conns:
                conn.close()
            supervise(clients, timeout_s)
    return times


# --------------------------------------------------------------------------- one model


def run_model(token: str, args: argparse.Namespace, work: Path, kits: Path, sites: list[str], *, secure: int = 0) -> dict[str, Any]:
    layout, weights = make_weights(token)
    label = "AH-Net" if layout == "ahnet" else token
    n_params, n_tensors = sum(a.size for a in weights.values()), len(weights)
    raw = raw_bytes(weights)
    n_down, frames_down, n_up, frames_up = wire_sizes(weights, sites[0])
    tag = f"{token.lower()}-{n_params}" + (f"-secure{secure}" if secure else "")
    weights_file = work / f"{tag}.safetensors"
    safetensors.numpy.save_file(weights, str(weights_file))
    del weights

    study_dir = work / tag
    study_dir.mkdir()
    port = free_port()
    cfg = {
        "kit": str(kits / "server"), "run_dir": str(study_dir / "run"), "weights": str(weights_file),
        "sites": sites, "rounds": args.rounds + 1, "port": port, "round_timeout_s": args.timeout,
        "result": str(study_dir / "server.json"), "secure": secure,
    }
    processes = {"server": start_server(cfg)}
    try:
        for site in sites:  # started alongside the server: their imports overlap; they wait for its port
            client_cfg = {
                "kit": str(kits / site), "port": port, "sleep": args.sleep,
                "audit": str(study_dir / f"{site}.audit.jsonl"), "result": str(study_dir / f"{site}.json"),
                "secure": secure,
            }
            processes[site] = SPAWN.Process(target=overhead_client, args=(client_cfg,), name=site)
            processes[site].start()
    finally:
        supervise(processes, args.timeout)
    server = json.loads((study_dir / "server.json").read_text())
    clients = [json.loads((study_dir / f"{s}.json").read_text()) for s in sites]
    audit = [json.loads(line) for s in sites for line in (study_dir / f"{s}.audit.jsonl").read_text().splitlines()]
    shutil.rmtree(study_dir / "run", ignore_errors=True)

    round_s = round_intervals(server["rounds"])
    median_round = statistics.median(round_s)
    overhead = median_round - args.sleep
    sent = sorted({int(a["bytes_sent"]) for a in audit if a["message"] in ("UPDATE", "MASKED")})
    if secure:  # what each site sends per round: KEYS, SHARES, MASKED, REVEAL
        n_up = statistics.median(
            sum(int(a["bytes_sent"]) for a in audit if a["message"] != "HELLO" and a["round"] == number and a["site"] == sites[0])
            for number in range(1, args.rounds + 1)
        )
    floor_s = tls_floor(kits, sites, n_down, int(n_up), args.floor_reps, args.timeout)
    floor = statistics.median(floor_s)
    weights_file.unlink()
    wire_site = n_down + n_up
    return {
        "model": label,
        "secure_aggregation": bool(secure),
        "secure_ring_bits": secure or None,
        "params_token": token,
        "layout": layout,
        "params": n_params,
        "tensors": n_tensors,
        "raw_bytes": raw,
        "train_bytes": n_down,
        "train_frames": frames_down,
        "update_bytes": n_up,
        "update_frames": frames_up,
        "audit_update_bytes": sent,
        "wire_bytes_per_site_round": wire_site,
        "wire_ratio": wire_site / (2 * raw),
        "round_s": round_s,
        "median_round_s": median_round,
        "overhead_s": overhead,
        "median_commit_s": statistics.median(server["commit_s"]),
        "median_unmask_s": statistics.median(server["unmask_s"]) if server["unmask_s"] else None,
        "median_add_s": statistics.median(a["s"] for a in server["add"]),
        "median_server_cpu_s_per_round": statistics.median(
            b["cpu_s"] - a["cpu_s"] for a, b in itertools.pairwise(server["rounds"])
        ),
        "server_peak_rss_mb": server["hwm_end_mb"],
        "client_max_work_s": max(c["max_work_s"] for c in clients),
        "floor_s": floor_s,
        "median_floor_s": floor,
        "overhead_over_floor": overhead / floor if floor > 0 else None,
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | params | raw MB | wire MB/site/round | ratio | median round (s) | overhead (s) | TLS floor (s) | overhead/floor |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = "-" if r["overhead_over_floor"] is None else f"{r['overhead_over_floor']:.1f}"
        model = r["model"] + (f" (secure, {r['secure_ring_bits']}-bit)" if r.get("secure_aggregation") else "")
        lines.append(
            f"| {model} | {r['params'] / 1e6:.1f} M | {r['raw_bytes'] / MB:.1f} | {r['wire_bytes_per_site_round'] / MB:.1f} "
            f"| {r['wire_ratio']:.4f} | {r['median_round_s']:.3f} | {r['overhead_s']:.3f} | {r['median_floor_s']:.3f} | {ratio} |"
        )
    lines += [
        "",
        "| model | commit to run dir (s) | aggregator.add per update (s) | server CPU per round (s) | server peak RSS (MB) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} {r['params'] / 1e6:.1f} M | {r['median_commit_s']:.3f} | {r['median_add_s']:.3f} "
            f"| {r['median_server_cpu_s_per_round']:.3f} | {r['server_peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines)


def secure_comparison(rows: list[dict[str, Any]]) -> str:
    """Per model: round overhead without and with secure aggregation, measured one after the other in this run."""
    lines = [
        "| model | params | ring | overhead plain (s) | overhead secure (s) | secure / plain | target <= 1.5 at 38 M "
        "| wire MB/site/round plain / secure | unmask (s) | server peak RSS plain / secure (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    plain = {r["params_token"]: r for r in rows if not r["secure_aggregation"]}
    for r in rows:
        if not r["secure_aggregation"] or r["params_token"] not in plain:
            continue
        p = plain[r["params_token"]]
        ratio = r["overhead_s"] / p["overhead_s"] if p["overhead_s"] > 0 else float("nan")
        lines.append(
            f"| {r['model']} | {r['params'] / 1e6:.1f} M | {r['secure_ring_bits']}-bit | {p['overhead_s']:.3f} | {r['overhead_s']:.3f} "
            f"| {ratio:.2f} | {('met' if ratio <= 1.5 else 'MISSED') if r['layout'] == 'ahnet' else '-'} "
            f"| {p['wire_bytes_per_site_round'] / MB:.1f} / {r['wire_bytes_per_site_round'] / MB:.1f} "
            f"| {r['median_unmask_s']:.3f} | {p['server_peak_rss_mb']:.0f} / {r['server_peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines)


def run_flower(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    """Flower's rows for the same sizes, rounds and sleep (flower_round_overhead.py, same interpreter)."""
    try:
        import flwr  # noqa: F401 -- only to fail early with the install command
    except ImportError:
        raise SystemExit("--flower needs Flower in this environment: pip install -e '.[bench]'") from None
    out = work / "flower.json"
    command = [
        sys.executable, str(Path(__file__).resolve().parent / "flower_round_overhead.py"), "--params", args.params,
        "--rounds", str(args.rounds), "--sleep", str(args.sleep), "--timeout", str(args.timeout), "--out", str(out),
    ]
    print("running Flower:", " ".join(command[1:]), flush=True)
    subprocess.run(command, check=True)
    return json.loads(out.read_text())["results"]


def comparison(rows: list[dict[str, Any]], flower: list[dict[str, Any]]) -> str:
    """Side-by-side table: fedseg vs Flower overhead (and both against the TLS floor)."""
    lines = [
        "| model | params | tensors | fedseg overhead (s) | Flower overhead (s) | fedseg / Flower | target <= 0.5 "
        "| TLS floor (s) | fedseg / floor | target <= 2 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r, f in zip(rows, flower, strict=True):
        ours, theirs, floor = r["overhead_s"], f.get("overhead_s"), r["median_floor_s"]
        ratio = None if theirs is None or theirs <= 0 else ours / theirs
        lines.append(
            f"| {r['model']} | {r['params'] / 1e6:.1f} M | {r['tensors']} | {ours:.3f} "
            f"| {'failed' if theirs is None else f'{theirs:.3f}'} | {'-' if ratio is None else f'{ratio:.3f}'} "
            f"| {'-' if ratio is None else ('met' if ratio <= 0.5 else 'MISSED')} | {floor:.3f} "
            f"| {ours / floor:.1f} | {'met' if ours <= 2 * floor else 'MISSED'} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="1M,ahnet,150M", help="comma list: 'ahnet' (AH-Net state dict, 38 M) or synthetic counts like 0.1M, 1M, 150M")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (one warm-up round runs before them)")
    parser.add_argument("--sleep", type=float, default=1.0, help="seconds each site's fake epoch takes")
    parser.add_argument("--floor-reps", type=int, default=5, help="repetitions of the plain-TLS floor")
    parser.add_argument("--timeout", type=float, default=1800.0, help="give up on one model's study after this many seconds")
    parser.add_argument("--workdir", type=Path, default=None, help="kits, weights and run directories (default: a temp folder)")
    parser.add_argument("--out", "--json", dest="out", type=Path, default=RESULTS / "round_overhead.json")
    parser.add_argument("--secure-aggregation", action="store_true",
                        help="run every model plain, then with secure aggregation on, and compare their overheads")
    parser.add_argument("--secure-ring-bits", default="64", help="with --secure-aggregation: comma list of ring widths, e.g. 64,32")
    parser.add_argument("--flower", action="store_true",
                        help="also run Flower 1.42 (deployment mode, flower_round_overhead.py) on the same models and compare")
    args = parser.parse_args()
    if args.rounds < 1 or args.floor_reps < 1 or args.sleep < 0:
        parser.error("--rounds and --floor-reps must be >= 1 and --sleep >= 0")
    tokens = parse_tokens(args.params)
    sites = ["site0", "site1", "site2"]
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="round_overhead-") as tmp:
        work = Path(tmp)
        kits = provision(work, sites)
        rows: list[dict[str, Any]] = []
        failed: list[dict[str, Any]] = []
        for token in tokens:
            rings = [int(bits) for bits in args.secure_ring_bits.split(",")] if args.secure_aggregation else []
            for secure in (0, *rings):
                label = f" (secure aggregation, {secure}-bit ring)" if secure else ""
                try:
                    rows.append(run_model(token, args, work, kits, sites, secure=secure))
                except RuntimeError as exc:  # one model failing (memory, a limit) must not lose the others' rows
                    print(f"[{token}{label}] FAILED: {exc}", flush=True)
                    failed.append({"params_token": token, "secure_ring_bits": secure or None, "error": str(exc)})
                    continue
                print(f"[{token}{label}] fedseg median round {rows[-1]['median_round_s']:.3f} s", flush=True)
        flower = run_flower(args, work) if args.flower else None
    record = {
        "benchmark": "round_overhead",
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "sites": len(sites),
        "timed_rounds": args.rounds,
        "warmup_rounds": 1,
        "sleep_s": args.sleep,
        "floor_reps": args.floor_reps,
        "rows": rows,
        "failed": failed,
        "flower": flower,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1))
    print(markdown(rows))
    if args.secure_aggregation:
        print("\n" + secure_comparison(rows))
    if flower is not None:
        print("\n" + comparison([r for r in rows if not r["secure_aggregation"]], flower))
    print(f"\nwire ratio target <= 1.01; overhead = median round - sleep ({args.sleep} s); "
          f"{args.rounds} timed rounds after 1 warm-up, 3 sites")


if __name__ == "__main__":
    main()
