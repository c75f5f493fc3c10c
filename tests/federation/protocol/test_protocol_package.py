"""The protocol package needs no torch, no network and no pickle: checked by importing it in a fresh interpreter."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedseg.federation import protocol

MODULES = sorted(f"fedseg.federation.protocol.{path.stem}" for path in Path(protocol.__file__).parent.glob("*.py") if path.stem != "__init__")
FORBIDDEN = ("torch", "websockets", "ssl", "socket", "asyncio", "fedseg.training", "fedseg.models")


@pytest.mark.slow  # starts a Python process
def test_every_protocol_module_loads_without_torch_or_network() -> None:
    assert "fedseg.federation.protocol.session" in MODULES and "fedseg.federation.protocol.frames" in MODULES
    code = f"import importlib, json, sys\nfor m in {MODULES!r}: importlib.import_module(m)\nprint(json.dumps(sorted(sys.modules)))"
    loaded = set(json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout))
    assert set(MODULES) <= loaded
    assert not [name for name in loaded if name.split(".")[0] in FORBIDDEN or name.startswith(FORBIDDEN[-2:])]


def test_no_pickle_and_no_eval_in_the_protocol() -> None:
    """numpy itself imports pickle, so this one reads the sources: no module of ours imports or calls it."""
    for path in Path(protocol.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        imported |= {(node.module or "").split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert not imported & {"pickle", "dill", "cloudpickle", "marshal"}, path
        calls = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
        assert not calls & {"eval", "exec", "__import__"}, path
