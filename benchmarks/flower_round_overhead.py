"""Benchmark: Flower's per-round overhead in deployment mode (SuperLink + SuperNodes over TLS).

    python benchmarks/flower_round_overhead.py                                   # 1M, 38M, 150M; 5 rounds; 1 s sleep
    python benchmarks/flower_round_overhead.py --params 0.1M --rounds 2 --sleep 0.1   # smoke run

Needs Flower (``pip install -e '.[bench]'``, i.e. flwr 1.42) in the running
interpreter's environment; its console scripts (flower-superlink,
flower-supernode, flower-superexec, flwr) are taken from the same bin folder.

For each model size the script starts, on 127.0.0.1 and as separate processes:
one ``flower-superlink`` and ``--nodes`` ``flower-supernode`` processes, all
over TLS with a throw-away CA and server certificate it makes itself; then it
submits the Flower App in ``benchmarks/flower_app`` with ``flwr run``. The
SuperLink launches the ServerApp (FedAvg over synthetic float32 arrays) and
each SuperNode its ClientApp, which sleeps ``--sleep`` seconds and sends the
arrays back, slightly perturbed (see flower_app/flowerbench/client_app.py for
why not unchanged). Evaluation rounds are off.

The ServerApp times each round from the start of ``configure_train`` to the
end of ``aggregate_train``; overhead = median round time (round 0 excluded)
minus ``--sleep``. Everything started is stopped in ``finally`` (process groups
plus every descendant, since Flower detaches its SuperExec processes).

Model sizes (benchmarks/model_layouts.py, shared with round_overhead.py so
both frameworks move the same tensors): ``ahnet`` or ``38M`` (anything within
2 % of AH-Net's count) uses the exact tensor shapes of
``fedseg.models.build_model("ahnet").state_dict()`` as float32; other sizes
scale AH-Net's per-tensor sizes to the requested total as 1-D arrays (same
tensor count, 735). Without fedseg, 100 equal 1-D arrays; ``--arrays N``
forces N equal 1-D arrays (to separate per-tensor from per-byte cost).

What to expect from Flower 1.42's defaults (read from its source, not tunable
from the command line): the ServerApp polls for replies every 3 s
(``HttpGrid.send_and_receive``) and an idle SuperNode polls the SuperLink every
3 s, so round times come in steps of ~3 s; each round starts a fresh
``flwr-clientapp`` process per SuperNode; and every tensor travels as separate
content-addressed objects (the Array plus its 5 MiB chunks), one HTTPS request
each, at most 2 at a time, on every hop (ServerApp -> SuperLink -> SuperNode ->
ClientApp and back), so the cost grows with the tensor count, not only bytes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_layouts import ahnet_shapes, layout_for, parse_tokens  # noqa: E402

APP_DIR = Path(__file__).resolve().parent / "flower_app"


def make_tls(folder: Path) -> dict[str, Path]:
    """Self-signed CA plus a server certificate for 127.0.0.1 / localhost, as PEM files."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedseg-bench-ca")])
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = {"ca": folder / "ca.crt", "cert": folder / "server.pem", "key": folder / "server.key"}
    paths["ca"].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    paths["key"].chmod(0o600)
    return paths


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"SuperLink exited with code {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"SuperLink did not listen on port {port} within {timeout_s:.0f} s")


def descendants(pid: int) -> list[int]:
    """All live descendants of ``pid`` (from /proc; Flower starts SuperExec in a new session)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def stop_all(procs: list[subprocess.Popen]) -> None:
    """SIGTERM every started process group and descendant, SIGKILL what is left after 10 s."""
    targets: set[int] = set()
    for proc in procs:
        if proc.poll() is None:
            targets.add(proc.pid)
        targets.update(descendants(proc.pid))
    for proc in procs:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    for pid in targets:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for pid in targets | {p.pid for p in procs if p.poll() is None}:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for proc in procs:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def flower_tool(name: str) -> str:
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise SystemExit(f"{name} not found: install Flower (pip install -e '.[bench]')")
    return found


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _run_id(flwr_run_stdout: str) -> str | None:
    try:
        return json.loads(flwr_run_stdout[flwr_run_stdout.index("{"):]).get("run-id")
    except ValueError:
        return None


def run_status(run_id: str, env: dict, cli_home: Path, work: Path) -> str:
    """The run's status as `flwr ls` reports it ('' when it cannot tell)."""
    try:
        ls = subprocess.run([flower_tool("flwr"), "ls", "bench", "--run-id", run_id, "--format", "json"], check=False,
                            capture_output=True, text=True, env=dict(env, FLWR_HOME=str(cli_home)), cwd=work, timeout=60)
        runs = json.loads(ls.stdout[ls.stdout.index("{"):]).get("runs", [])
    except (ValueError, subprocess.TimeoutExpired):
        return ""
    return str(runs[0].get("status", "")) if runs else ""


def run_log_tail(run_id: str, env: dict, cli_home: Path, work: Path, lines: int = 12) -> str:
    try:
        log = subprocess.run([flower_tool("flwr"), "log", run_id, "bench", "--show"], check=False,
                             capture_output=True, text=True, env=dict(env, FLWR_HOME=str(cli_home)), cwd=work, timeout=60)
    except subprocess.TimeoutExpired:
        return ""
    return "\n".join((log.stdout + log.stderr).strip().splitlines()[-lines:])


def run_one(label: str, shapes_name: str, shapes: list[list[int]], args, work: Path, flower_version: str) -> dict:
    """One SuperLink + N SuperNodes + one `flwr run`, torn down afterwards."""
    work.mkdir(parents=True)
    tls = make_tls(work / "certs")
    app = work / "app"
    shutil.copytree(APP_DIR, app, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    layout_path, out_path = work / "layout.json", work / "result.json"
    layout_path.write_text(json.dumps({"shapes": shapes}))
    port = free_port()
    bindir = str(Path(sys.executable).parent)
    env = dict(os.environ, PATH=bindir + os.pathsep + os.environ.get("PATH", ""),
               FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
               FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", PYTHONUNBUFFERED="1")
    record = {"model": label, "params": sum(math.prod(s) for s in shapes), "layout": shapes_name, "n_arrays": len(shapes),
              "rounds": args.rounds, "sleep_s": args.sleep, "nodes": args.nodes, "reply": args.reply,
              "median_round_s": None, "overhead_s": None, "per_round_s": [], "flower_version": flower_version, "errors": []}
    procs: list[subprocess.Popen] = []
    logs: dict[str, Path] = {}

    def start(name: str, cmd: list[str], home: Path) -> subprocess.Popen:
        home.mkdir(parents=True, exist_ok=True)
        logs[name] = work / f"{name}.log"
        with open(logs[name], "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=work,
                                    env=dict(env, FLWR_HOME=str(home)), start_new_session=True)
        procs.append(proc)
        return proc

    try:
        superlink = start("superlink", [flower_tool("flower-superlink"), "--host", "127.0.0.1", "--port", str(port),
                                        "--ssl-ca-certfile", str(tls["ca"]), "--ssl-certfile", str(tls["cert"]),
                                        "--ssl-keyfile", str(tls["key"]), "--disable-runtime-dependency-installation"],
                          work / "home-superlink")
        wait_for_port(port, superlink, 120)
        for i in range(args.nodes):
            cmd = [flower_tool("flower-supernode"), "--superlink", f"127.0.0.1:{port}", "--root-certificates", str(tls["ca"]),
                   "--host", "127.0.0.1", "--port", str(free_port()), "--node-config", f"partition-id={i} num-partitions={args.nodes}"]
            if args.node_runtime_tls:
                cmd += ["--ssl-ca-certfile", str(tls["ca"]), "--ssl-certfile", str(tls["cert"]), "--ssl-keyfile", str(tls["key"])]
            start(f"supernode{i}", cmd, work / f"home-supernode{i}")
        cli_home = work / "home-cli"
        cli_home.mkdir()
        (cli_home / "config.toml").write_text(
            f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\naddress = "127.0.0.1:{port}"\n'
            f'root-certificates = "{tls["ca"]}"\n')
        overrides = work / "run-config.toml"
        overrides.write_text(
            f'num-rounds = {args.rounds}\nnum-nodes = {args.nodes}\nsleep-s = {float(args.sleep)}\n'
            f'reply = "{args.reply}"\nlayout-path = "{layout_path}"\nout-path = "{out_path}"\n'
            f'round-timeout-s = {float(args.timeout)}\n')
        submit = subprocess.run([flower_tool("flwr"), "run", str(app), "bench", "--run-config", str(overrides), "--format", "json"],
                                check=False, capture_output=True, text=True, env=dict(env, FLWR_HOME=str(cli_home)), cwd=work, timeout=120)
        (work / "flwr-run.log").write_text(submit.stdout + submit.stderr)
        if submit.returncode != 0:
            raise RuntimeError(f"flwr run failed ({submit.returncode}): {(submit.stdout + submit.stderr).strip()[-1500:]}")
        run_id = _run_id(submit.stdout)
        deadline = time.monotonic() + args.timeout
        next_status, finished_at = time.monotonic() + 10, None
        while not out_path.exists():
            now = time.monotonic()
            if superlink.poll() is not None:
                raise RuntimeError(f"SuperLink exited with code {superlink.returncode}:\n{tail(logs['superlink'])}")
            if now > deadline:
                raise TimeoutError(f"no result after {args.timeout:.0f} s; SuperLink log tail:\n{tail(logs['superlink'])}")
            if run_id and now > next_status:  # a ServerApp that dies before writing its result ends the run
                next_status = now + 10
                status = run_status(run_id, env, cli_home, work)
                if status.startswith("finished"):
                    finished_at = finished_at or now
                    if now - finished_at > 10:
                        raise RuntimeError(f"run {run_id} is {status} but the ServerApp wrote no result; "
                                           f"`flwr log` tail:\n{run_log_tail(run_id, env, cli_home, work)}")
            time.sleep(0.5)
        result = json.loads(out_path.read_text())
        record["errors"] += result.get("errors", [])
        if "traceback" in result:
            record["traceback"] = result["traceback"]
        for key in ("payload_bytes", "nodes_connected", "replies_per_round", "client_codec_s", "round_interval_s"):
            if key in result:
                record[key] = result[key]
        per_round = result.get("per_round_s", [])
        record["per_round_s"] = [round(t, 4) for t in per_round]
        if per_round and len(per_round) == args.rounds and not record["errors"]:
            steady = per_round[1:] or per_round
            record["median_round_s"] = round(statistics.median(steady), 4)
            record["overhead_s"] = round(record["median_round_s"] - args.sleep, 4)
            codec = [max(c) for c in result.get("client_codec_s", [])[1:] or result.get("client_codec_s", []) if c]
            if codec:
                record["client_codec_s_median"] = round(statistics.median(codec), 4)
    except Exception as exc:  # noqa: BLE001 -- a failed size is a result: recorded, and the next size still runs
        record["errors"].append(f"{type(exc).__name__}: {exc}")
    finally:
        stop_all(procs)
    if record["errors"]:
        for name, path in logs.items():
            record.setdefault("log_tails", {})[name] = tail(path, 8)
    return record


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="1M,ahnet,150M", help="comma list: 'ahnet' (38 M) or float32 parameter counts with K/M/G suffixes")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sleep", type=float, default=1.0, help="seconds each ClientApp 'trains' (sleeps) per round")
    parser.add_argument("--nodes", type=int, default=3, help="number of SuperNodes")
    parser.add_argument("--arrays", type=int, default=None,
                        help="split each model into this many equal 1-D arrays instead of AH-Net's 735 tensors")
    parser.add_argument("--reply", choices=("perturb", "echo"), default="perturb",
                        help="perturb: change every 5 MiB chunk (honest upload); echo: send arrays back unchanged")
    parser.add_argument("--node-runtime-tls", action=argparse.BooleanOptionalAction, default=True,
                        help="TLS also on each SuperNode's local Runtime API (SuperNode <-> ClientApp process)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed per model size (and per round)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "flower_round_overhead.json")
    parser.add_argument("--keep-workdir", action="store_true", help="keep certificates, logs and app copies")
    args = parser.parse_args()
    if args.rounds < 1 or args.nodes < 1 or args.sleep < 0 or (args.arrays is not None and args.arrays < 1):
        parser.error("--rounds, --nodes and --arrays must be >= 1, --sleep >= 0")
    try:
        import flwr
    except ImportError:
        raise SystemExit("flwr is not importable: pip install -e '.[bench]'") from None
    flower_version = flwr.__version__
    labels = parse_tokens(args.params)
    ahnet = ahnet_shapes() if args.arrays is None else None
    work_root = Path(tempfile.mkdtemp(prefix="flower-bench-"))
    results = []
    try:
        for label in labels:
            shapes_name, shapes = layout_for(label, ahnet, args.arrays)
            print(f"[{label}] {shapes_name} layout, {len(shapes)} arrays; starting SuperLink + {args.nodes} SuperNodes ...", flush=True)
            started = time.perf_counter()
            record = run_one(label, shapes_name, shapes, args, work_root / label, flower_version)
            record["wall_s"] = round(time.perf_counter() - started, 1)
            results.append(record)
            status = f"median round {record['median_round_s']} s" if record["median_round_s"] is not None else "FAILED: " + "; ".join(record["errors"])[:500]
            print(f"[{label}] {status}", flush=True)
    finally:
        if args.keep_workdir:
            print(f"work folder kept: {work_root}")
        else:
            shutil.rmtree(work_root, ignore_errors=True)
    report = {
        "benchmark": "flower_round_overhead",
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "flower_version": flower_version,
        "mode": "deployment: flower-superlink + flower-supernode processes, TLS on 127.0.0.1, subprocess isolation",
        "strategy": "FedAvg, train only (fraction_evaluate=0); round = configure_train start -> aggregate_train end (ServerApp clock)",
        "config": {"params": args.params, "arrays": args.arrays, "rounds": args.rounds, "sleep_s": args.sleep, "nodes": args.nodes,
                   "reply": args.reply, "node_runtime_tls": args.node_runtime_tls},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"\nFlower {flower_version}, deployment mode, {args.nodes} SuperNodes, TLS, sleep {args.sleep} s, {args.rounds} rounds (median excludes round 0)\n")
    print("| model | params | payload MB | median round (s) | overhead (s) | client codec (s) | errors |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        mb = f"{r['payload_bytes'] / 1e6:.1f}" if "payload_bytes" in r else "-"
        errors = "; ".join(e.splitlines()[0] for e in r["errors"])[:120].replace("|", "/") or "none"
        print(f"| {r['model']} | {r['params']:,} | {mb} | {_fmt(r['median_round_s'])} | {_fmt(r['overhead_s'])} | {_fmt(r.get('client_codec_s_median'))} | {errors} |")
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
