"""Nothing from the catalog or a model folder is unpickled, evaluated or run as code.

A source scan, so that a later change that reaches for pickle, eval or an
unguarded torch.load fails here and has to argue its case.
"""
from __future__ import annotations

import ast
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("schemas", "encoders", "pipeline")
FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__"}
FORBIDDEN_ATTRS = {("pickle", "load"), ("pickle", "loads"), ("dill", "load"), ("dill", "loads"),
                   ("cloudpickle", "loads"), ("yaml", "load"), ("marshal", "loads"), ("numpy", "load"),
                   ("np", "load")}


def _sources():
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def _kwarg(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name and isinstance(kw.value, ast.Constant):
            return kw.value.value
    return None


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_unsafe_deserialization(path):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        where = f"{path.relative_to(ROOT)}:{node.lineno}"
        func = node.func
        if isinstance(func, ast.Name):
            assert func.id not in FORBIDDEN_CALLS, f"{where}: {func.id}()"
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
            assert (func.value.id, func.attr) not in FORBIDDEN_ATTRS, f"{where}: {func.value.id}.{func.attr}()"
            if (func.value.id, func.attr) == ("torch", "load"):
                assert _kwarg(node, "weights_only") is True, f"{where}: torch.load without weights_only=True"
        assert _kwarg(node, "trust_remote_code") is not True, f"{where}: trust_remote_code=True"
        assert _kwarg(node, "weights_only") is not False, f"{where}: weights_only=False"


@pytest.mark.parametrize("code, message", [
    ("import pickle\npickle.loads(b'')\n", "pickle.loads"),
    ("import torch\ntorch.load('w.pt')\n", "weights_only=True"),
    ("from transformers import AutoModel\nAutoModel.from_pretrained('x', trust_remote_code=True)\n", "trust_remote"),
    ("eval('1')\n", "eval"),
])
def test_the_scan_finds_what_it_forbids(tmp_path, monkeypatch, code, message):
    bad = tmp_path / "bad.py"
    bad.write_text(code)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    with pytest.raises(AssertionError, match=message):
        test_no_unsafe_deserialization(bad)
