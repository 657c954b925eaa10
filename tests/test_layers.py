"""The import rules of the architecture, checked on the source: the CLI is a thin layer over the
Python API, inference never loads training code, models never import the tokenizer, the engine
or the trainer, and the engine never imports a tokenizer."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "lmforge"


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            # `from lmforge.rag import manage` names lmforge.rag.manage (a module or a name in one)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in out if m.startswith("lmforge")}


CLI_MAY_USE = ("lmforge.api", "lmforge.encoders", "lmforge.rag.manage", "lmforge.rag.evaluate", "lmforge.tasks",
               "lmforge.store", "lmforge.config", "lmforge.errors", "lmforge.cli", "lmforge.server")


@pytest.mark.parametrize("path", sorted((PKG / "cli").glob("*.py")), ids=lambda p: p.name)
def test_the_cli_only_calls_the_python_api(path):
    bad = {m for m in imports_of(path) if not m.startswith(CLI_MAY_USE)}
    assert not bad, f"{path.name} reaches past the API into {sorted(bad)}"


@pytest.mark.parametrize("layer,banned", [
    ("models", ("lmforge.tokenizer", "lmforge.engine", "lmforge.train", "lmforge.api", "lmforge.cli")),
    ("engine", ("lmforge.tokenizer", "lmforge.train", "lmforge.api", "lmforge.cli", "lmforge.rag")),
    ("weights", ("lmforge.engine", "lmforge.train", "lmforge.api", "lmforge.cli", "lmforge.rag")),
    ("server", ("lmforge.train", "lmforge.cli", "lmforge.models", "lmforge.weights")),
    ("rag", ("lmforge.cli", "lmforge.server", "lmforge.train")),
    ("tasks", ("lmforge.cli", "lmforge.server")),
])
def test_lower_layers_do_not_import_upper_ones(layer, banned):
    for path in sorted((PKG / layer).glob("*.py")):
        bad = {m for m in imports_of(path) if m.startswith(banned)}
        assert not bad, f"{layer}/{path.name} imports {sorted(bad)}"


def test_inference_loads_no_training_code():
    code = ("import sys, lmforge.api, lmforge.encoders, lmforge.engine, lmforge.rag.manage, lmforge.server.app; "
            "print(','.join(m for m in sys.modules if m.startswith('lmforge.train')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == ""


def test_the_api_loads_training_code_only_to_train():
    """In api.py only the function `train` imports lmforge.train (lazily); evaluation and the rest never."""
    tree = ast.parse((PKG / "api.py").read_text(encoding="utf-8"))
    allowed = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name == "train"
               for n in ast.walk(f)}
    bad = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
           and (n.module or "").startswith("lmforge.train") and id(n) not in allowed]
    assert not bad, f"api.py imports {bad} outside train()"


def test_server_routes_only_call_the_service():
    """app.py holds routes, errors and middleware; what a request does lives in service.py."""
    bad = {m for m in imports_of(PKG / "server" / "app.py")
           if not m.startswith(("lmforge.server.service", "lmforge.server.protocol", "lmforge.errors"))}
    assert not bad, f"server/app.py reaches past the service into {sorted(bad)}"
