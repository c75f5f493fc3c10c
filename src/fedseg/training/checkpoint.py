"""Checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint named ``NAME`` in a folder is

* ``NAME.safetensors``        model weights (what ``predict`` needs);
* ``NAME.optim.safetensors``  optimizer tensors (Adam moments), for resuming;
* ``NAME.json``               sidecar: epoch, metrics, config, data
  fingerprint, optimizer hyper-parameters and scheduler state.

Writes go to a temporary name first and are renamed into place, so a crash
mid-write never leaves a half checkpoint under the real name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fedseg.errors import FedsegError
from fedseg.io import commit_file, partial_path, read_json, write_json

SIDECAR_FORMAT = 1


def save_weights(path: Path, weights: dict[str, torch.Tensor]) -> None:
    """Write a flat tensor dict as safetensors, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}
    tmp = partial_path(path)
    save_file(tensors, str(tmp))
    commit_file(tmp, path)


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file (no code execution possible, unlike pickle)."""
    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - SafetensorError derives from Exception only
        raise FedsegError(f"{path}: cannot read weights ({type(exc).__name__}: {exc})") from exc


def split_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state_dict → (flat tensors, JSON-able rest)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entries in state["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def join_optimizer_state(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`split_optimizer_state`."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    for index, entries in rest.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(entries)
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in rest["param_groups"]]
    return {"state": state, "param_groups": groups}


def save_checkpoint(
    folder: Path,
    name: str,
    weights: dict[str, torch.Tensor],
    sidecar: dict[str, Any],
    optimizer_state: dict[str, Any] | None = None,
) -> Path:
    """Write ``NAME.safetensors`` (+ optimizer tensors) and then the JSON sidecar.

    The sidecar is written last: its presence marks a complete checkpoint.
    """
    folder = Path(folder)
    save_weights(folder / f"{name}.safetensors", weights)
    record = {"format": SIDECAR_FORMAT, **sidecar}
    if optimizer_state is not None:
        tensors, rest = split_optimizer_state(optimizer_state)
        save_weights(folder / f"{name}.optim.safetensors", tensors)
        record["optimizer"] = rest
    write_json(folder / f"{name}.json", record)
    return folder / f"{name}.json"


def load_checkpoint(folder: Path, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any] | None]:
    """(weights, sidecar, optimizer state or None) of a complete checkpoint."""
    folder = Path(folder)
    sidecar = read_json(folder / f"{name}.json")
    weights = load_weights(folder / f"{name}.safetensors")
    optimizer = None
    if "optimizer" in sidecar:
        optimizer = join_optimizer_state(load_weights(folder / f"{name}.optim.safetensors"), sidecar["optimizer"])
    return weights, sidecar, optimizer
