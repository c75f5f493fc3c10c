"""Shared fixtures: tiny hand-made sites and the real scans in ../shared/data."""

from __future__ import annotations

import contextlib
import faulthandler
import io
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING
from pathlib import Path

import numpy as np
import pytest

from fedseg.data.volume import Volume, save_volume

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PROMISE12_SITES = ("bidmc", "hk", "runmc", "ucl")
TEST_HANG_S = 600.0  # the slowest test takes ~2 min on 2 cores


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """A test (setup and teardown included) that runs past TEST_HANG_S dumps every thread's stack and ends its worker.

    faulthandler's watchdog is a C thread: it works even when the process is deadlocked holding the GIL,
    where pytest-timeout's thread or signal could not run. A hang then fails CI in minutes, with the stacks.
    """
    faulthandler.dump_traceback_later(TEST_HANG_S, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


class _NotMarkedSlow(AssertionError):
    """A test outside the `slow` marker started a process or opened a network socket."""


@pytest.fixture(autouse=True)
def _slow_tests_only_start_processes(request, monkeypatch):
    """Starting a process or binding/connecting a socket fails any test not marked `slow`.

    Keeps ``pytest -m "not slow"`` a quick loop by construction: a new test that spawns a
    server, a worker or a DDP follower cannot slip into it unmarked.
    """
    if request.node.get_closest_marker("slow") is not None:
        return

    def refuse(what: str):
        def refused(*args, **kwargs):
            raise _NotMarkedSlow(f"{request.node.nodeid} {what}: mark it @pytest.mark.slow")
        return refused

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse("starts a process"))
    monkeypatch.setattr(socket.socket, "bind", refuse("binds a socket"))
    monkeypatch.setattr(socket.socket, "connect", refuse("connects a socket"))


@pytest.fixture
def shared_data() -> Path:
    """The real scans; absent data skips locally but fails in CI, where they must exist."""
    if not SHARED_DATA.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"{SHARED_DATA} is missing in CI")
        pytest.skip(f"{SHARED_DATA} not available")
    return SHARED_DATA


def oblique_affine(spacing: tuple[float, float, float], angle_deg: float = 12.0) -> np.ndarray:
    """An LPS-like, slightly oblique scanner affine (axes L, P, S) with the given spacing."""
    a = np.deg2rad(angle_deg)
    rotation = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    affine = np.eye(4)
    affine[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ rotation @ np.diag(spacing)
    affine[:3, 3] = [40.0, 60.0, -30.0]
    return affine


def ellipsoid_case(shape: tuple[int, int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A noisy image with a brighter ellipsoid and its mask."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    radii = np.array([0.45, 0.4, 0.5]) * rng.uniform(0.8, 1.2, 3)
    mask = (((grid / radii[:, None, None, None]) ** 2).sum(0) < 1).astype(np.uint8)
    image = (200.0 + 300.0 * mask + rng.normal(0, 30, shape)).astype(np.int16)
    return image, mask


def cube_case(index: int):
    """An easy training case in memory: a bright cube (its mask the label) in mild noise, already z-scored-ish."""
    from fedseg.training.data import CaseArrays

    rng = np.random.default_rng(index)
    label = np.zeros((1, 24, 24, 16), np.float32)
    x, y, z = rng.integers(4, 8, 3)
    label[0, x : x + 10, y : y + 10, z : z + 6] = 1.0
    image = (rng.normal(0.0, 0.3, label.shape) + 2.0 * label).astype(np.float32)
    return CaseArrays(f"cube{index}", image, label, np.eye(4))


def write_site(
    root: Path,
    n_cases: int = 5,
    seed: int = 0,
    shape: tuple[int, int, int] = (24, 20, 8),
    spacing: tuple[float, float, float] = (0.6, 0.6, 3.0),
) -> Path:
    """A small valid site folder in the fedseg layout at ``root`` (case i uses seed ``seed + i``)."""
    affine = oblique_affine(spacing)
    for i in range(n_cases):
        image, mask = ellipsoid_case(shape, seed=seed + i)
        save_volume(Volume(image, affine), root / "images" / f"case{i:02d}.nii.gz")
        save_volume(Volume(mask, affine), root / "labels" / f"case{i:02d}.nii.gz")
    return root


@pytest.fixture
def make_site(tmp_path: Path) -> Callable[..., Path]:
    """Factory for a small valid site folder in the fedseg layout."""

    def factory(
        name: str = "site",
        n_cases: int = 4,
        shape: tuple[int, int, int] = (24, 20, 8),
        spacing: tuple[float, float, float] = (0.6, 0.6, 3.0),
    ) -> Path:
        return write_site(tmp_path / name, n_cases, shape=shape, spacing=spacing)

    return factory


TINY_SITES = ("site_a", "site_b", "site_c")


def tiny_study_toml(federation: str, *, samples_per_volume: int = 1) -> str:
    """study.toml of the tiny end-to-end runs (2 mm, 16x16x8 patches, one thread, no blur or elastic);
    ``federation``: the [federation] table's lines, e.g. ``"rounds = 5\\nround_timeout_s = 60.0"``."""
    return (
        f"[federation]\n{federation.strip()}\n[prepare]\nspacing_mm = 2.0\n[train]\npatch_size = [16, 16, 8]\n"
        f"batch_size = 2\nsamples_per_volume = {samples_per_volume}\nsw_batch_size = 2\nthreads = 1\n"
        "[train.augment]\nblur_prob = 0.0\nelastic_prob = 0.0\n"
    )


def write_tiny_study(root: Path, federation: str) -> Path:
    """The three tiny sites (``root/site_a`` ...) and ``root/study.toml``; returns ``root``."""
    for k, name in enumerate(TINY_SITES):
        write_site(root / name, seed=10 * k)
    (root / "study.toml").write_text(tiny_study_toml(federation))
    return root


def invoke_cli(*args: str | Path) -> tuple[int, str, str]:
    """Run ``fedseg ARGS...`` in-process; returns (exit code, stdout, stderr). Usable from any fixture scope."""
    from fedseg.cli import console as cli_console
    from fedseg.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    code: int | str | None = 0
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        patch.setattr(sys, "argv", ["fedseg", *map(str, args)])
        for output in (cli_console.console, cli_console.err_console):
            patch.setattr(output, "width", 300)  # tables keep long paths on one line
        try:
            main()
        except SystemExit as exc:
            code = exc.code
    return (code if isinstance(code, int) else 1), out.getvalue(), err.getvalue()


@pytest.fixture
def run_cli() -> Callable[..., tuple[int, str, str]]:
    """``invoke_cli`` as a fixture."""
    return invoke_cli


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread: tiny networks run fastest so, and a busy 2-core machine cannot stall OpenMP."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ----------------------------------------------------------------- a provisioned study (kits) for kit and TLS tests


@pytest.fixture(scope="module")
def kits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One provisioned study (server 'localhost', three sites), shared read-only."""
    from fedseg.federation.deploy.provision import provision_study

    return provision_study("localhost", ["nci", "suny", "ucla"], tmp_path_factory.mktemp("study") / "kits", study="test-study")


@pytest.fixture(scope="module")
def other_kits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A second, unrelated study with its own CA and a site of the same name."""
    from fedseg.federation.deploy.provision import provision_study

    return provision_study("localhost", ["nci"], tmp_path_factory.mktemp("other") / "kits", study="other-study")


def write_key_pair(folder: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate, stem: str) -> tuple[Path, Path]:
    """Write a test key (0600 at creation) and certificate; returns (cert, key) paths."""
    from cryptography.hazmat.primitives import serialization

    key_path, cert_path = folder / f"{stem}.key", folder / f"{stem}.pem"
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


# ----------------------------------------------------------------- per-case Dice for cross-site tables


def _scores(rng: np.random.Generator, n: int, shift: float, noise: float, base: np.ndarray) -> dict[str, float]:
    return {f"case{i:02d}": float(base[i] + shift + noise * rng.standard_normal()) for i in range(n)}


def crosssite_dice() -> dict[str, dict[str, dict[str, float]]]:
    """FL reference; 'Bad' is clearly lower (shift -0.05, tiny noise); 'Close' ≈ FL (no shift)."""
    rng = np.random.default_rng(42)
    sizes = {"NCI": 6, "SUNY": 5, "UCLA": 4, "ProstateX": 8}
    bases = {s: 0.88 + 0.03 * rng.standard_normal(n) for s, n in sizes.items()}
    fl = {s: _scores(rng, n, 0.0, 0.0, bases[s]) for s, n in sizes.items()}
    bad = {s: _scores(rng, n, -0.05, 0.002, bases[s]) for s, n in sizes.items()}
    close = {s: _scores(rng, n, 0.0, 0.02, bases[s]) for s, n in sizes.items()}
    # Reference deliberately NOT last in the dict: it must be moved last.
    return {"Bad": bad, "FL": fl, "Close": close}
