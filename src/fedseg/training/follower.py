"""A data-parallel follower: ``python -m fedseg.training.follower``, started by rank 0 only.

Reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``) once, here at its entry point; then a
:class:`~fedseg.training.distributed.FollowerSpec` as the first JSON line on
stdin; loads its training cases; answers ``{"ready": true}``; joins the
process group and builds the same trainer as rank 0; then serves rank 0's
commands (``epoch``, ``optimizer``, ``stop``), one JSON reply each. It exits
when rank 0 says stop, when its stdin closes, or when its parent goes away.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, NoReturn, TextIO

import torch

from fedseg.io import dumps_json, loads_json
from fedseg.training.device import Hardware, resolve_hardware
from fedseg.training.distributed import FollowerSpec, error_reply, join_as_follower, process_threads

PARENT_POLL_S = 1.0


def _exit_when_orphaned(parent: int) -> None:
    """A follower whose rank 0 died (even by SIGKILL) must not live on, holding a GPU."""
    while True:
        time.sleep(PARENT_POLL_S)
        if os.getppid() != parent:
            os._exit(3)


def _hardware(spec: FollowerSpec, local_rank: int, amp: bool | None) -> Hardware:
    """Rank r trains on cuda:r (or the CPU), resolved as rank 0 resolved its own."""
    if spec.device_type != "cuda":
        return resolve_hardware("cpu", amp)
    torch.cuda.set_device(local_rank)
    return resolve_hardware(f"cuda:{local_rank}", amp)


def _trainer(spec: FollowerSpec, rank: int, world_size: int, local_rank: int, reply: Any):
    from fedseg.data.preprocess import PrepareConfig
    from fedseg.models import build_model
    from fedseg.training.config import TrainConfig
    from fedseg.training.data import resolve_site
    from fedseg.training.engine import LocalTrainer, training_loss
    from fedseg.training.fit import training_set

    config = TrainConfig.from_dict(spec.train, source="rank 0")
    torch.set_num_threads(process_threads(config.threads, world_size))
    hardware = _hardware(spec, local_rank, config.amp)
    prepare = PrepareConfig.from_dict(spec.prepare, source="rank 0")
    sites = [resolve_site(Path(folder), prepare, Path(spec.cache)) for folder in spec.sites]
    training = training_set(sites, spec.fold, config.patch, validation=False)
    model = build_model(config.network, seed=config.seed)
    reply({"ready": True})
    parallel = join_as_follower(rank, world_size, hardware)
    trainer = LocalTrainer(model, training.train, [], config, loss=training_loss(spec.fedprox_mu, parallel), parallel=parallel)
    return trainer, parallel


def serve(commands: TextIO, replies: TextIO, rank: int, world_size: int, local_rank: int) -> int:
    def reply(message: dict[str, Any]) -> None:
        replies.write(dumps_json(message) + "\n")
        replies.flush()

    try:
        spec = FollowerSpec(**loads_json(commands.readline()))
        trainer, parallel = _trainer(spec, rank, world_size, local_rank, reply)
        for line in commands:
            command = loads_json(line)
            if command["cmd"] == "stop":
                break
            if command["cmd"] == "epoch":
                trainer.epoch = int(command["epoch"])
                trainer.set_learning_rate(float(command["lr"]))
                trainer.train_one_epoch(new_anchor=bool(command["anchor"]))
            elif command["cmd"] == "optimizer":
                parallel.receive_optimizer(trainer, command)
            else:
                raise ValueError(f"unknown command {command['cmd']!r}")
            reply({"ok": True})
    except Exception:  # noqa: BLE001 -- rank 0 shows it to the user
        reply(error_reply())
        return 1
    return 0


def main() -> NoReturn:
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    threading.Thread(target=_exit_when_orphaned, args=(os.getppid(),), daemon=True).start()
    replies = sys.stdout
    sys.stdout = sys.stderr  # nothing but replies on the pipe
    code = serve(sys.stdin, replies, rank, world_size, local_rank)
    for stream in (replies, sys.stderr):
        stream.flush()
    # Not sys.exit: freeing the process group could deadlock (see fedseg.training.distributed); the OS frees it.
    os._exit(code)


if __name__ == "__main__":
    main()
