"""Data parallelism at one site: one training process per GPU (or per share of the CPU cores), torch DDP.

``--gpus N`` (NCCL) or ``--device cpu --processes N`` (gloo): the process the
user started is rank 0; it starts ranks 1..N-1 itself as
``python -m fedseg.training.follower`` children with torchrun's environment
variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``) — plain subprocesses, not ``multiprocessing``, which would
pickle. Everything rank 0 tells a follower goes as strict JSON lines on the
follower's stdin (:mod:`fedseg.pipes`): first a :class:`FollowerSpec` (which
site, fold and settings to load), then one command per epoch. Tensors move
only through torch.distributed collectives inside this one training job.

Per epoch, rank 0 sends ``{"cmd": "epoch", ...}`` with the epoch number, the
learning rate its scheduler chose and whether the weights are a new round's
(FedProx's anchor); every rank then receives rank 0's weights by broadcast —
so a federated round's global model reaches all of them — and trains its
rows of every batch (:class:`~fedseg.training.patches.Shard`) with DDP
all-reducing the gradients and the soft-Dice sums. Rank 0 alone validates,
steps the scheduler, writes checkpoints and talks to the federation server.
A resumed run's optimiser state is broadcast once (``{"cmd": "optimizer"}``).

No hang, no orphan: every wait for a follower has a timeout, a follower that
exits is reported with its exit code, a follower sees its stdin close (or its
parent change) when rank 0 goes away and exits, and collectives time out
after ``timeout_s``.

Tearing the group down is ordered, because torch's ``ProcessGroupGloo``
destructor joins its worker threads while holding the GIL, and a worker
thread that is still finishing a collective needs the GIL to release that
collective's tensors: destroying the group right after a collective, or while
one abandoned by an error is still failing, deadlocks the process (seen in CI,
at the end of a test whose follower had died: the DDP wrapper, freed by the
garbage collector, took the group with it). So the group owns the DDP
wrappers (:meth:`DataParallel.wrap`), and :meth:`DataParallel.close` stops
the followers (their sockets close, so every pending collective fails at
once), waits a moment with the GIL released, then frees the wrappers and the
process group. Followers never destroy theirs: they exit with ``os._exit``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import traceback
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fedseg.errors import FedsegError
from fedseg.pipes import ChildEnded, JsonLinesChild, free_port
from fedseg.training.checkpoint import join_optimizer_state, split_optimizer_state
from fedseg.training.config import TrainConfig
from fedseg.training.device import Hardware, check_gpu_count, resolve_hardware
from fedseg.training.engine import LocalTrainer, load_optimizer_state
from fedseg.training.patches import Shard

__all__ = ["DataParallel", "FollowerSpec", "Placement", "place_training", "start_data_parallel"]

FOLLOWER_MODULE = "fedseg.training.follower"
COLLECTIVE_TIMEOUT_S = 600.0  # one step's all-reduce, or a follower's reply after an epoch
READY_TIMEOUT_S = 900.0  # a follower importing torch and loading its site's cases
ERROR_TAIL_LINES = 15
EXIT_WAIT_S = 5.0  # after a failed collective: time for a dying follower to exit, so that the error can name it
DRAIN_S = 1.0  # before freeing the group: time for gloo's worker threads to finish and release their collectives


@dataclass(frozen=True)
class FollowerSpec:
    """What a follower loads: the prepared site folder(s) and fold, and the training settings.

    ``sites`` are prepared folders (several = a pooled model); ``train`` is a
    TrainConfig dict; ``device_type`` is ``cuda`` (rank r uses cuda:r) or ``cpu``.
    """

    sites: list[str]
    fold: int
    prepare: dict[str, Any]
    cache: str
    train: dict[str, Any]
    device_type: str = "cpu"
    fedprox_mu: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def process_threads(threads: int | None, world_size: int) -> int:
    """torch threads per process: as configured, else an equal share of the cores."""
    return threads if threads is not None else max(1, (os.cpu_count() or 1) // world_size)


class DataParallel:
    """This process's place in a site's data-parallel group.

    Rank 0 holds the followers' pipes; the collectives are the same on every rank.
    """

    def __init__(
        self,
        rank: int,
        world_size: int,
        hardware: Hardware,
        followers: Sequence[JsonLinesChild] = (),
        timeout_s: float = COLLECTIVE_TIMEOUT_S,
    ) -> None:
        self.rank = rank
        self.world_size = world_size
        self.hardware = hardware
        self.followers = list(followers)
        self.timeout_s = timeout_s
        self._wrappers: list[DistributedDataParallel] = []

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` under DDP; the group holds the wrapper (see the module's note on teardown), callers a proxy.

        The proxy stops working once the group is closed: train no more with it then.
        """
        ids = [self.hardware.device.index] if self.hardware.is_cuda else None
        wrapper = DistributedDataParallel(model, device_ids=ids)
        self._wrappers.append(wrapper)
        return weakref.proxy(wrapper)

    @property
    def shard(self) -> Shard:
        return Shard(self.rank, self.world_size)

    @property
    def leader(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------ collectives (every rank)

    def sum_across(self, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.detach().clone()
        dist.all_reduce(total)
        return total

    def broadcast_weights(self, model: torch.nn.Module) -> None:
        """Every rank gets rank 0's parameters and buffers (in place)."""
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=0)

    # ------------------------------------------------------------ one epoch

    def start_epoch(self, trainer: LocalTrainer, new_anchor: bool) -> None:
        """Rank 0 tells the followers to train epoch ``trainer.epoch``; then every rank takes rank 0's weights."""
        if self.leader:
            self._command({"cmd": "epoch", "epoch": trainer.epoch, "lr": trainer.learning_rate, "anchor": new_anchor})
        self.broadcast_weights(trainer.model)

    def end_epoch(self) -> None:
        if self.leader:
            self._await_replies("an epoch")

    @contextmanager
    def failures(self) -> Iterator[None]:
        """On rank 0, a failed collective becomes a FedsegError naming the follower that broke it."""
        try:
            yield
        except (RuntimeError, dist.DistError) as exc:
            if not self.leader:
                raise
            self._await_exits(EXIT_WAIT_S)
            cause = str(exc).split(" This is typically caused")[0]  # gloo's advice after it is not for our users
            raise FedsegError(f"data-parallel training failed: {self._followers_state()} ({cause})") from exc

    # ------------------------------------------------------------ optimiser state of a resumed run

    def share_optimizer(self, trainer: LocalTrainer) -> None:
        """Rank 0 broadcasts its optimiser (and gradient-scaler) state; see :meth:`receive_optimizer`."""
        if not self.leader:
            return
        tensors, rest = split_optimizer_state(trainer.optimizer.state_dict())
        specs = {name: [list(t.shape), str(t.dtype).removeprefix("torch.")] for name, t in sorted(tensors.items())}
        self._command({"cmd": "optimizer", "rest": rest, "tensors": specs, "scaler": trainer.scaler_state()})
        with self.failures():
            for name in specs:
                dist.broadcast(tensors[name].to(self.hardware.device).contiguous(), src=0)
        self._await_replies("the optimiser hand-over")

    def receive_optimizer(self, trainer: LocalTrainer, command: dict[str, Any]) -> None:
        """A follower's side of :meth:`share_optimizer`."""
        tensors = {}
        for name, (shape, dtype) in command["tensors"].items():
            buffer = torch.empty(shape, dtype=getattr(torch, dtype), device=self.hardware.device)
            dist.broadcast(buffer, src=0)
            tensors[name] = buffer.cpu()  # load_state_dict moves the moments to the parameters, keeps "step" on the CPU
        load_optimizer_state(trainer.optimizer, join_optimizer_state(tensors, command["rest"]))
        if trainer.scaler is not None and command.get("scaler"):
            trainer.scaler.load_state_dict(command["scaler"])

    # ------------------------------------------------------------ followers (rank 0)

    def _command(self, command: dict[str, Any]) -> None:
        for rank, child in enumerate(self.followers, start=1):
            try:
                child.send(command)
            except ChildEnded as exc:
                raise FedsegError(f"data-parallel process {rank} is gone: {exc}") from exc

    def _await_replies(self, what: str) -> None:
        for rank, child in enumerate(self.followers, start=1):
            try:
                reply = child.receive(self.timeout_s)
            except ChildEnded as exc:
                raise FedsegError(f"data-parallel process {rank} stopped during {what}: {exc}") from exc
            if not reply.get("ok"):
                raise FedsegError(f"data-parallel process {rank} failed during {what}:\n{_tail(reply.get('error'))}")

    def _await_exits(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for the followers to exit (a broken collective usually means one is exiting)."""
        deadline = time.monotonic() + timeout_s
        for child in self.followers:
            try:
                child.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:  # still running: reported as running
                pass

    def _followers_state(self) -> str:
        states = []
        for rank, child in enumerate(self.followers, start=1):
            code = child.process.poll()
            states.append(f"process {rank} " + ("running" if code is None else f"exited with code {code}"))
        return ", ".join(states) or "no other process"

    def close(self) -> None:
        """Stop the followers (rank 0), then free the DDP wrappers and the process group; safe to call twice."""
        for child in self.followers:
            try:
                child.send({"cmd": "stop"})
            except ChildEnded:
                pass
        for child in self.followers:
            child.stop()
        self.followers = []
        if dist.is_initialized():
            time.sleep(DRAIN_S)  # the GIL released: gloo's workers finish (see the module's note)
            self._wrappers.clear()
            dist.destroy_process_group()

    def __enter__(self) -> DataParallel:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class Placement:
    """Where one training job runs: its config (device set), rank 0's hardware and the number of processes."""

    config: TrainConfig
    hardware: Hardware
    world_size: int = 1

    def describe(self) -> str:
        processes = f", {self.world_size} processes (DDP)" if self.world_size > 1 else ""
        return self.hardware.describe() + processes

    def group(self, sites: Sequence[str], fold: int, prepare: dict[str, Any], cache: str, fedprox_mu: float = 0.0):
        """A context giving this job's :class:`DataParallel` group (None for one process)."""
        if self.world_size == 1:
            return nullcontext(None)
        spec = FollowerSpec(
            list(sites), fold, prepare, cache, self.config.to_dict(), self.hardware.device.type, fedprox_mu
        )
        return start_data_parallel(spec, self.world_size, self.hardware)


def place_training(config: TrainConfig, device: str | None = None, gpus: int | None = None, processes: int | None = None) -> Placement:
    """Resolve ``--device``, ``--gpus N`` and ``--processes N`` against this machine.

    ``--gpus N`` trains on cuda:0..N-1 (NCCL); ``--processes N`` on the CPU
    (gloo), each process with an equal share of the cores unless
    ``threads`` says otherwise.

    Raises:
        FedsegError: both counts given, a device this machine lacks, fewer GPUs than asked for.
    """
    if gpus is not None and processes is not None:
        raise FedsegError("--gpus and --processes exclude each other (--gpus N: one process per GPU)")
    if device is not None:
        config = config.replace(device=device)
    world_size = 1
    if gpus is not None:
        if config.device not in ("auto", "cuda", "cuda:0"):
            raise FedsegError(f"--gpus {gpus} trains on cuda:0..cuda:{gpus - 1}; it cannot go with device {config.device}")
        check_gpu_count(gpus)
        config, world_size = config.replace(device="cuda:0"), gpus
    hardware = resolve_hardware(config.device, config.amp)
    if processes is not None:
        if hardware.device.type != "cpu":
            raise FedsegError(f"--processes is for CPU training (device {hardware.device}); on GPUs use --gpus N")
        world_size = processes
    if world_size > 1:
        torch.set_num_threads(process_threads(config.threads, world_size))
    return Placement(config, hardware, world_size)


def _tail(text: Any) -> str:
    lines = str(text).splitlines()[-ERROR_TAIL_LINES:]
    return "\n".join(f"    {line}" for line in lines)


def _backend(hardware: Hardware) -> str:
    return "nccl" if hardware.is_cuda else "gloo"


def start_data_parallel(
    spec: FollowerSpec,
    world_size: int,
    hardware: Hardware,
    *,
    timeout_s: float = COLLECTIVE_TIMEOUT_S,
    ready_timeout_s: float = READY_TIMEOUT_S,
    follower_argv: Sequence[str] | None = None,
) -> DataParallel:
    """Start ranks 1..world_size-1, wait until each has loaded its data, join the process group as rank 0.

    Raises:
        FedsegError: a follower failed or exited while starting (with its error), or did not get ready in time.
    """
    if world_size < 2:
        raise FedsegError(f"data parallelism needs at least 2 processes, got {world_size}")
    port = free_port()
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world_size)}
    argv = list(follower_argv) if follower_argv is not None else [sys.executable, "-m", FOLLOWER_MODULE]
    followers: list[JsonLinesChild] = []
    try:
        for rank in range(1, world_size):
            child = JsonLinesChild(argv, env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)})
            followers.append(child)
            child.send(spec.to_dict())
        for rank, child in enumerate(followers, start=1):
            try:
                reply = child.receive(ready_timeout_s)
            except ChildEnded as exc:
                raise FedsegError(f"data-parallel process {rank} failed to start: {exc}") from exc
            if not reply.get("ready"):
                raise FedsegError(f"data-parallel process {rank} failed to start:\n{_tail(reply.get('error'))}")
        dist.init_process_group(
            _backend(hardware), init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
        )
    except BaseException:
        for child in followers:
            child.stop(timeout_s=1.0)
        raise
    return DataParallel(0, world_size, hardware, followers, timeout_s)


def join_as_follower(rank: int, world_size: int, hardware: Hardware, timeout_s: float = COLLECTIVE_TIMEOUT_S) -> DataParallel:
    """A follower's side of :func:`start_data_parallel` (MASTER_ADDR/MASTER_PORT from its environment)."""
    dist.init_process_group(_backend(hardware), init_method="env://", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))
    return DataParallel(rank, world_size, hardware, timeout_s=timeout_s)


def error_reply() -> dict[str, Any]:
    """The reply a follower sends when it fails: the traceback, for rank 0 to show."""
    return {"ok": False, "ready": False, "error": traceback.format_exc()}
