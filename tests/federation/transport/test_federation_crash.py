"""Crash tests with real processes: ``kill -9`` of the server or of a client in the middle of a study.

* the server is SIGKILLed after a few committed rounds and restarted with
  ``fedseg server --resume``: the study finishes, and no round committed
  before the crash is lost or redone (its files are byte-identical);
* a client is SIGKILLed mid-study and started again with the same arguments:
  it rejoins, is left out of the round it died in (at most that round and
  the next), and trains the later rounds again.

Every process is a separate ``fedseg server`` / ``fedseg client`` (mutual TLS
over 127.0.0.1), exactly as in a deployment. What is checked: the run
directory's ``state.json`` and ``rounds/NNNN/`` files, the sites' audit logs
and exit codes. The rounds of these tiny sites take well under a second, so
the tests SIGSTOP the surviving processes while the victim is down (a real
round takes far longer than a restart); they are SIGCONTed, and every process
killed, whatever happens.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import tiny_study_toml, write_site

from fedseg.federation.deploy.local import fedseg_command, free_port
from fedseg.federation.deploy.provision import provision_study

pytestmark = pytest.mark.slow

SITES = ("site_a", "site_b", "site_c")
ROUNDS = 6
POLL_S = 0.2
START_TIMEOUT_S = 240.0  # until the wanted rounds are committed (process start, preparing the sites, training)
FINISH_TIMEOUT_S = 300.0  # until every process has exited after the crash
REJOIN_TIMEOUT_S = 50.0  # < websockets' ping interval + timeout (80 s), so the frozen clients stay connected


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def sites(tmp_path_factory) -> dict[str, Path]:
    """Three tiny sites, shared by the tests (so is the preprocessing cache next to them)."""
    root = tmp_path_factory.mktemp("crash_sites")
    return {name: write_site(root / name, seed=10 * k) for k, name in enumerate(SITES)}


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").rstrip().splitlines()
    except OSError:
        return "    (no log)"
    return "\n".join("    " + line for line in text[-lines:]) or "    (empty log)"


class Study:
    """A study's processes and files under ``tmp_path``; every process is killed on :meth:`cleanup`."""

    def __init__(self, tmp_path: Path, sites: dict[str, Path], federation: str = "") -> None:
        self.tmp = tmp_path
        self.sites = sites
        self.cache = next(iter(sites.values())).parent / "cache"  # the module's shared cache, under tmp
        self.port = free_port()
        self.kits = tmp_path / "kits"
        provision_study("localhost", list(SITES), self.kits, study="crash", port=self.port)
        self.config = tmp_path / "study.toml"
        self.config.write_text(tiny_study_toml(f"round_timeout_s = 120.0\ngrace_s = 5.0\n{federation}", samples_per_volume=8))
        self.run = tmp_path / "run"
        self.logs = tmp_path / "logs"
        self.audit = tmp_path / "audit"
        self.processes: dict[str, tuple[subprocess.Popen, Path]] = {}
        self.stopped: set[int] = set()

    # ---------------------------------------------------------------- processes

    def start(self, name: str, *args: str | Path) -> subprocess.Popen:
        log = self.logs / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("wb") as handle:
            process = subprocess.Popen(fedseg_command(*args), stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.processes[name] = (process, log)
        return process

    def server_args(self, *run_args: str | Path) -> list[str | Path]:
        return ["server", "--kit", self.kits / "server", *run_args, "--host", "127.0.0.1", "--port", str(self.port), "--threads", "1"]

    def start_server(self, name: str = "server") -> subprocess.Popen:
        return self.start(name, *self.server_args("--out", self.run, "--rounds", str(ROUNDS), "--fold", "0", "--config", self.config))

    def start_client(self, site: str, name: str | None = None) -> subprocess.Popen:
        return self.start(
            name or site,
            "client", "--kit", self.kits / site, "--data", self.sites[site], "--fold", "0", "--config", self.config,
            "--cache", self.cache, "--audit-log", self.audit / f"{site}.jsonl",
            "--server-url", f"wss://localhost:{self.port}", "--threads", "1", "--retries", "60",
        )

    def pause(self, name: str) -> None:
        process = self.processes[name][0]
        os.kill(process.pid, signal.SIGSTOP)
        self.stopped.add(process.pid)

    def resume(self, name: str) -> None:
        process = self.processes[name][0]
        if process.pid in self.stopped:
            os.kill(process.pid, signal.SIGCONT)
            self.stopped.discard(process.pid)

    def cleanup(self) -> None:
        for process, _log in self.processes.values():
            if process.poll() is None:
                if process.pid in self.stopped:
                    os.kill(process.pid, signal.SIGCONT)
                process.terminate()
        for process, _log in self.processes.values():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def logs_text(self) -> str:
        return "\n".join(
            f"--- {name} (exit {process.poll()}) {log}:\n{_tail(log)}" for name, (process, log) in self.processes.items()
        )

    # ---------------------------------------------------------------- waiting

    def wait_until(self, condition: Callable[[], bool], timeout_s: float, what: str, *, expected_exits: set[str] = frozenset()) -> None:
        """Poll ``condition``; fail at once if a process not in ``expected_exits`` has exited."""
        deadline = time.monotonic() + timeout_s
        while not condition():
            died = {
                name: code for name, (process, _log) in self.processes.items()
                if name not in expected_exits and (code := process.poll()) is not None
            }
            if died:
                pytest.fail(f"{', '.join(f'{n} exited with {c}' for n, c in died.items())} while waiting for {what}\n{self.logs_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {what} within {timeout_s:.0f} s (state {self.state()})\n{self.logs_text()}")
            time.sleep(POLL_S)

    def wait_all_exit(self, names: list[str]) -> dict[str, int]:
        deadline = time.monotonic() + FINISH_TIMEOUT_S
        codes: dict[str, int] = {}
        while len(codes) < len(names):
            for name in names:
                if name not in codes and (code := self.processes[name][0].poll()) is not None:
                    codes[name] = code
            if any(code != 0 for code in codes.values()):
                break  # the study cannot succeed any more; report now
            if time.monotonic() > deadline:
                pytest.fail(f"still running after {FINISH_TIMEOUT_S:.0f} s: {sorted(set(names) - set(codes))}\n{self.logs_text()}")
            time.sleep(POLL_S)
        assert codes == dict.fromkeys(names, 0), f"exit codes {codes}\n{self.logs_text()}"
        return codes

    # ---------------------------------------------------------------- run directory

    def state(self) -> dict:
        try:
            return json.loads((self.run / "state.json").read_text())
        except (OSError, json.JSONDecodeError):  # not written yet (it is replaced atomically)
            return {"completed_rounds": 0}

    def completed(self) -> int:
        return int(self.state()["completed_rounds"])

    def round_record(self, number: int) -> dict:
        return json.loads((self.run / "rounds" / f"{number:04d}" / "round.json").read_text())

    def audited_rounds(self, site: str) -> list[int]:
        """Rounds of the updates the site's audit log records (a line cut short by a kill is skipped)."""
        try:
            lines = (self.audit / f"{site}.jsonl").read_text().splitlines()
        except OSError:
            return []
        rounds = []
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("message", "UPDATE") == "UPDATE" and "round" in record:
                rounds.append(record["round"])
        return rounds


def _committed_files(run: Path, rounds: int) -> dict[str, bytes]:
    files = {}
    for number in range(rounds):
        folder = run / "rounds" / f"{number:04d}"
        for name in ("global.safetensors", "round.json"):
            files[f"{number:04d}/{name}"] = (folder / name).read_bytes()
    return files


# --------------------------------------------------------------------------- tests


def test_server_killed_mid_study_resumes_without_losing_a_round(tmp_path, sites):
    study = Study(tmp_path, sites)  # min_sites: every site, so every round has all three
    try:
        server = study.start_server()
        for site in SITES:
            study.start_client(site)
        study.wait_until(lambda: study.completed() >= 2, START_TIMEOUT_S, "2 committed rounds before the crash")

        # Freeze the sites so the study cannot run to its end before the kill (a round takes well
        # under a second here): the server dies with a round open, its sites mid-epoch or mid-send.
        for site in SITES:
            study.pause(site)
        os.kill(server.pid, signal.SIGKILL)
        server.wait(timeout=30)
        assert server.returncode == -signal.SIGKILL, f"the server was not killed\n{study.logs_text()}"
        killed_at = study.completed()  # the server is dead: this is what is on disk
        assert 2 <= killed_at < ROUNDS, f"the study ran to {killed_at} rounds before the kill\n{study.logs_text()}"
        before = _committed_files(study.run, killed_at)
        for site in SITES:
            study.resume(site)  # they find the connection gone and retry every 2 s

        # same port: the clients find the new server by themselves
        study.start("server_resumed", *study.server_args("--resume", study.run))
        study.wait_all_exit(["server_resumed", *SITES])
    finally:
        study.cleanup()

    resumed_log = study.processes["server_resumed"][1].read_text(errors="replace")
    assert f"resuming after round {killed_at - 1}" in resumed_log, resumed_log
    state = study.state()
    assert state["completed_rounds"] == ROUNDS, state
    for number in range(ROUNDS):
        record = study.round_record(number)
        assert record["round"] == number
        assert sorted(record["sites"]) == list(SITES) and record["left_out"] == {}, record
    # rounds committed before the crash are kept as they were, not redone
    assert _committed_files(study.run, killed_at) == before
    # the sites trained the rounds after the crash for the resumed server
    for site in SITES:
        audited = study.audited_rounds(site)
        assert set(range(killed_at, ROUNDS)) <= set(audited), (site, audited, killed_at)


def test_client_killed_mid_study_rejoins_after_restart(tmp_path, sites):
    study = Study(tmp_path, sites, federation="min_sites = 2")
    victim, others = SITES[0], SITES[1:]
    try:
        study.start_server()
        for site in SITES:
            study.start_client(site)
        # kill the victim while it trains the open round (its update for that round not yet sent)
        study.wait_until(lambda: (k := study.completed()) >= 1 and k not in study.audited_rounds(victim),
                         START_TIMEOUT_S, "1 committed round before the crash")

        # Freeze every site first: a restart takes seconds, these tiny rounds well under one, so
        # otherwise the study could end before the victim is back (a real round takes far longer).
        for site in SITES:
            study.pause(site)
        time.sleep(1.0)  # let what is already on its way reach the server
        killed_at = study.completed()  # the round open at the kill; none completes while all are frozen
        sent_before_kill = killed_at in study.audited_rounds(victim)
        victim_process = study.processes[victim][0]
        os.kill(victim_process.pid, signal.SIGKILL)
        victim_process.wait(timeout=30)
        assert killed_at < ROUNDS - 1, f"the study ran to {killed_at} rounds before the kill\n{study.logs_text()}"

        restarted = study.start_client(victim, name=f"{victim}_restarted")
        restarted_log = study.processes[f"{victim}_restarted"][1]
        joined = False  # the restarted client was welcomed back (else the others are let go anyway)
        deadline = time.monotonic() + REJOIN_TIMEOUT_S
        while time.monotonic() < deadline and restarted.poll() is None:
            if "joined the study" in restarted_log.read_text(errors="replace"):
                joined = True
                break
            time.sleep(POLL_S)
        for site in others:
            study.resume(site)
        assert restarted.poll() in (None, 0), f"the restarted client exited with {restarted.poll()}\n{study.logs_text()}"
        study.wait_all_exit(["server", *others, f"{victim}_restarted"])
    finally:
        study.cleanup()

    state = study.state()
    assert state["completed_rounds"] == ROUNDS, state
    records = [study.round_record(number) for number in range(ROUNDS)]
    assert [r["round"] for r in records] == list(range(ROUNDS))
    absent = [r["round"] for r in records if victim not in r["sites"]]
    context = f"victim absent from rounds {absent}; killed in round {killed_at}\n{study.logs_text()}"
    for r in records:
        assert set(others) <= set(r["sites"]), r  # the frozen sites were never dropped
        if r["round"] < killed_at:  # committed before the kill: the victim took part
            assert victim in r["sites"] and victim not in r["left_out"], r
    # the round it died in: left out with a reason (or in it, if its update had already left)
    in_kill_round = victim in records[killed_at]["sites"]
    assert in_kill_round != (victim in records[killed_at]["left_out"]), records[killed_at]
    if not sent_before_kill and not in_kill_round:
        assert records[killed_at]["left_out"][victim], records[killed_at]
    # absent only around the kill ...
    assert set(absent) <= {killed_at, killed_at + 1}, context
    if joined:  # back before the others went on: in every round after the one it died in
        assert set(absent) <= {killed_at}, context
    # ... and back for the rest of the study, trained by the restarted process (its audit log)
    assert all(victim in r["sites"] for r in records[killed_at + 2 :]), context
    assert victim in records[-1]["sites"], context
    audited = study.audited_rounds(victim)
    assert ROUNDS - 1 in audited and audited.count(killed_at) <= 1, audited
