"""The client pump needs no torch: importing it in a fresh interpreter loads neither torch nor fedseg's training code."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # starts a Python process per module


@pytest.mark.parametrize(
    "module",
    ["fedseg.federation.transport.client", "fedseg.federation.transport.server", "fedseg.federation.transport.memory"],
)
def test_transport_shells_import_no_torch(module: str) -> None:
    code = f"import json, sys, {module}\nprint(json.dumps(sorted(sys.modules)))"
    loaded = set(json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout))
    assert module in loaded and "fedseg.federation.transport.connection" in loaded
    assert not {name for name in loaded if name == "torch" or name.startswith(("torch.", "fedseg.training", "fedseg.models"))}
