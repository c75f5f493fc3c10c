"""Which device trains, and with what precision.

``[train] device`` is ``auto`` (CUDA when available, else the CPU), ``cpu``,
``cuda``, ``cuda:N`` or ``mps``; ``[train] amp`` is ``true``/``false`` or
absent (= on for CUDA, off elsewhere). :func:`resolve_hardware` turns both
into a :class:`Hardware`: the torch device, the autocast dtype (bfloat16
where the GPU supports it, else float16 with a gradient scaler) and a line
that says what was used (printed, and kept in ``model.json`` and the
metrics). Asking for a device this machine does not have is a
:class:`FedsegError`, never a silent fall-back to the CPU.

Weights always leave the device as contiguous CPU tensors, so checkpoints
and the wire format are the same whatever trained them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from fedseg.errors import FedsegError

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(?::(\d+))?")  # the names resolve_device and [train] device accept


@dataclass(frozen=True)
class Hardware:
    """The resolved training device and mixed-precision mode."""

    device: torch.device
    amp_dtype: torch.dtype | None = None  # None: full fp32

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def needs_grad_scaler(self) -> bool:
        """fp16 gradients underflow without loss scaling; bf16 has fp32's exponent range."""
        return self.amp_dtype == torch.float16

    @property
    def amp_name(self) -> str | None:
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.amp_dtype) if self.amp_dtype else None

    def autocast(self) -> torch.autocast:
        """Autocast context for forward passes (a disabled one without AMP)."""
        dtype = self.amp_dtype or torch.float32
        return torch.autocast(device_type=self.device.type, dtype=dtype, enabled=self.amp_dtype is not None)

    def describe(self, threads: bool = True) -> str:
        """E.g. ``cuda:0 (NVIDIA H200), bf16 mixed precision`` or ``cpu (2 threads), fp32``."""
        if self.is_cuda:
            where = f"{self.device} ({torch.cuda.get_device_name(self.device)})"
        elif self.device.type == "cpu":
            where = f"cpu ({torch.get_num_threads()} threads)" if threads else "cpu"
        else:
            where = str(self.device)
        return f"{where}, " + (f"{self.amp_name} mixed precision" if self.amp_dtype else "fp32")

    def record(self) -> dict[str, str | None]:
        """What goes into model.json and the metrics."""
        return {"device": str(self.device), "amp": self.amp_name, "description": self.describe(threads=False)}


def resolve_device(name: str) -> torch.device:
    """The torch device for a ``[train] device`` value.

    Raises:
        FedsegError: an unknown name, or a device this machine does not have.
    """
    match = DEVICE_PATTERN.fullmatch(name) if isinstance(name, str) else None
    if match is None:
        raise FedsegError(f"unknown device {name!r}; choose {DEVICE_CHOICES}")
    if name == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise FedsegError("device mps was asked for, but this machine has no Apple GPU available to PyTorch")
        return torch.device("mps")
    if not torch.cuda.is_available():
        raise FedsegError(
            f"device {name} was asked for, but PyTorch sees no CUDA GPU here (torch {torch.__version__}"
            + (", a CPU-only build" if torch.version.cuda is None else "")
            + "); use --device cpu, or install a CUDA build of PyTorch"
        )
    index = int(match.group(1)) if match.group(1) is not None else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise FedsegError(f"device {name} was asked for, but this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return torch.device("cuda", index)


def amp_dtype(device: torch.device, amp: bool | None) -> torch.dtype | None:
    """Autocast dtype: ``amp`` None means on for CUDA, off elsewhere.

    Raises:
        FedsegError: ``amp = true`` on a device fedseg does not run mixed precision on.
    """
    if amp is None:
        amp = device.type == "cuda"
    if not amp:
        return None
    if device.type != "cuda":
        raise FedsegError(f"train.amp = true needs a CUDA device; this run trains on {device} (set amp = false or leave it out)")
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def resolve_hardware(device: str, amp: bool | None) -> Hardware:
    """Device and precision for a training or inference run (see the module docstring)."""
    resolved = resolve_device(device)
    hardware = Hardware(resolved, amp_dtype(resolved, amp))
    if hardware.is_cuda:
        torch.backends.cudnn.benchmark = True  # fixed patch shapes: let cuDNN pick its fastest kernels once
    return hardware


def check_gpu_count(gpus: int) -> None:
    """``--gpus N`` needs N visible CUDA GPUs.

    Raises:
        FedsegError: fewer GPUs than asked for.
    """
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus > have:
        raise FedsegError(f"--gpus {gpus} was asked for, but PyTorch sees {have} CUDA GPU(s) on this machine")


def to_cpu(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies (what leaves the device: checkpoints, updates)."""
    return {k: v.detach().to("cpu", memory_format=torch.contiguous_format, copy=True) for k, v in weights.items()}
