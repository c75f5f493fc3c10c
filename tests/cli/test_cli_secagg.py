"""``fedseg federate`` with secure aggregation: real processes, mutual TLS, the tiny network — against the same run without it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_SITES, invoke_cli, write_tiny_study

pytestmark = pytest.mark.slow

FEDERATION = "rounds = 3\nround_timeout_s = 120.0\ngrace_s = 5.0"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[Path, tuple[int, str, str]]]:
    previous = torch.get_num_threads()
    work = write_tiny_study(tmp_path_factory.mktemp("secagg"), FEDERATION)
    text = (work / "study.toml").read_text()
    (work / "secure.toml").write_text(text.replace("[federation]\n", "[federation]\nsecure_aggregation = true\n", 1))
    out = {}
    for name, config in (("plain", "study.toml"), ("secure", "secure.toml")):
        run = work / name
        out[name] = run, invoke_cli("federate", *(work / s for s in TINY_SITES), "--out", run, "--fold", "0",
                                    "--config", work / config, "--cache", work / "cache", "--threads", "1")
    torch.set_num_threads(previous)
    return out


def case_dice(run: Path) -> dict[str, list[float]]:
    record = json.loads((run / "fold0" / "evaluation.json").read_text())
    return {site: list(entry["case_dice"].values()) for site, entry in record["sites"].items()}


def test_secure_aggregation_gives_the_same_test_dice_as_plain(runs):
    for name, (_, (code, stdout, err)) in runs.items():
        assert code == 0, f"{name}: {stdout}{err}"
    plain, secure = case_dice(runs["plain"][0]), case_dice(runs["secure"][0])
    assert plain.keys() == secure.keys() == set(TINY_SITES)
    for site in TINY_SITES:
        assert len(plain[site]) == len(secure[site]) > 0
        assert max(abs(a - b) for a, b in zip(plain[site], secure[site], strict=True)) <= 0.005, (site, plain, secure)


def test_the_run_records_say_secure_aggregation_and_hold_aggregates_only(runs):
    run = runs["secure"][0]
    for number in range(3):
        record = json.loads((run / "fold0" / "rounds" / f"{number:04d}" / "round.json").read_text())
        assert record["secure_aggregation"] is True and record["sites"] == {} and record["site_weights"] == {}
        assert record["arrival_order"] == sorted(TINY_SITES) and 0 <= record["mean_val_dice"] <= 1
    model = json.loads((run / "model" / "model.json").read_text())
    assert model["federated"]["federation"]["secure_aggregation"] is True
    _, (_, stdout, _) = runs["secure"]
    assert "secure aggregation" in stdout


def test_each_sites_audit_log_shows_only_masked_updates_left(runs):
    run = runs["secure"][0]
    for site in TINY_SITES:
        lines = [json.loads(line) for line in (run / "audit" / "fold0" / f"{site}.jsonl").read_text().splitlines()]
        kinds = [line["message"] for line in lines]
        assert "UPDATE" not in kinds
        for kind in ("KEYS", "SHARES", "MASKED", "REVEAL"):
            assert kinds.count(kind) == 3, (site, kinds)
        for line in lines:
            if line["message"] == "MASKED":
                assert line["tensors"] and line["secure_aggregation"]["clipped"] is False
                assert line["secure_aggregation"]["change_norm"] <= line["secure_aggregation"]["clip_bound"]
