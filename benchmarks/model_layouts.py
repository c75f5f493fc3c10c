"""Model sizes and tensor layouts shared by the fedseg and Flower benchmarks.

Both frameworks must move the *same* model: per-message costs (Flower sends
every tensor as separate HTTP objects) depend on the tensor count as much as on
the bytes. So every size is laid out like fedseg's AH-Net state dict:

- ``ahnet``: the exact shapes of ``build_model("ahnet").state_dict()`` (735 tensors, 38 M values);
- a count such as ``1M`` or ``150M``: AH-Net's per-tensor sizes scaled to that total, as 1-D arrays
  (still 735 tensors);
- ``uniform`` (Flower's ``--arrays N``, or when fedseg/torch is not importable): N equal 1-D arrays.

Standard library only at import time: the Flower benchmark may run where fedseg is not installed.
"""

from __future__ import annotations

import math
import re

AHNET_TOLERANCE = 0.02  # a count within 2 % of AH-Net's is taken as AH-Net itself


def parse_tokens(text: str) -> list[str]:
    """``"1M,ahnet,150M"`` -> tokens; a token is ``ahnet`` or a count with an optional K/M/G suffix."""
    tokens = [t.strip() for t in text.split(",") if t.strip()]
    for token in tokens:
        if token.lower() != "ahnet" and not re.fullmatch(r"\d+(\.\d+)?[kKmMgG]?", token):
            raise SystemExit(f"--params: {token!r} is neither 'ahnet' nor a count such as 0.1M, 38M, 150M")
    if not tokens:
        raise SystemExit("--params: give at least one model size")
    return tokens


def param_count(token: str) -> int:
    """'0.1M' -> 100_000, '1.5G' -> 1_500_000_000, '5000' -> 5000 (not for 'ahnet')."""
    scale = {"k": 1e3, "m": 1e6, "g": 1e9}.get(token[-1].lower(), 1.0)
    number = token[:-1] if token[-1].isalpha() else token
    return max(1, round(float(number) * scale))


def ahnet_shapes() -> list[list[int]] | None:
    """Tensor shapes of fedseg's AH-Net state dict (None when fedseg or torch is missing)."""
    try:
        from fedseg.models import build_model
    except ImportError:
        return None
    return [list(t.shape) for t in build_model("ahnet").state_dict().values()]


def layout_for(token: str, ahnet: list[list[int]] | None, n_arrays: int | None = None) -> tuple[str, list[list[int]]]:
    """(layout name, array shapes) for a size token; see the module docstring."""
    if ahnet is not None and n_arrays is None:
        sizes = [max(1, math.prod(s)) for s in ahnet]
        total = sum(sizes)
        n_params = total if token.lower() == "ahnet" else param_count(token)
        if abs(n_params - total) <= AHNET_TOLERANCE * total:
            return "ahnet", [s if s else [1] for s in ahnet]
        return "ahnet-scaled", [[n] for n in _scale_exactly(sizes, n_params)]
    if token.lower() == "ahnet":
        raise SystemExit("--params ahnet needs fedseg and torch importable (or give a count such as 38M)")
    n_params = param_count(token)
    count = min(n_params, n_arrays or 100)
    base, rest = divmod(n_params, count)
    return "uniform", [[base + (1 if i < rest else 0)] for i in range(count)]


def _scale_exactly(sizes: list[int], n_params: int) -> list[int]:
    """Scale ``sizes`` to sum to exactly ``n_params`` (each >= 1; largest remainders take the rounding)."""
    n_params = max(n_params, len(sizes))
    total = sum(sizes)
    exact = [size * (n_params - len(sizes)) / total for size in sizes]  # 1 reserved per tensor
    scaled = [1 + math.floor(x) for x in exact]
    by_remainder = sorted(range(len(sizes)), key=lambda i: exact[i] - math.floor(exact[i]), reverse=True)
    for i in by_remainder[: n_params - sum(scaled)]:
        scaled[i] += 1
    return scaled
