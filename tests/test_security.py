"""Nothing in the pack evaluates, executes or unpickles data from a workflow or a file."""
from __future__ import annotations

import ast
import os

from vg_testlib import REPO

PACK_DIRS = ("nodes", "videograin_core")
PACK_FILES = ("__init__.py",)
FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__"}
FORBIDDEN_MODULES = {"pickle", "cPickle", "dill", "marshal", "shelve", "joblib"}


def _pack_sources():
    for rel in PACK_FILES:
        yield rel
    for d in PACK_DIRS:
        for root, _, files in os.walk(os.path.join(REPO, d)):
            for f in sorted(files):
                if f.endswith(".py"):
                    yield os.path.relpath(os.path.join(root, f), REPO)


def _problems(source: str, name: str) -> list[str]:
    out = []
    tree = ast.parse(source, name)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for m in mods:
                if m.split(".")[0] in FORBIDDEN_MODULES:
                    out.append(f"{name}:{node.lineno} imports {m}")
        if isinstance(node, ast.Call):
            f = node.func
            fname = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
            if fname in FORBIDDEN_CALLS and not (isinstance(f, ast.Attribute) and fname == "compile"):
                out.append(f"{name}:{node.lineno} calls {fname}()")
            if fname == "load" and isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "torch":
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in node.keywords)
                if not safe:
                    out.append(f"{name}:{node.lineno} torch.load without weights_only=True")
            if fname in ("load", "loads") and isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) \
                    and f.value.id in ("np", "numpy"):
                if any(k.arg == "allow_pickle" and not (isinstance(k.value, ast.Constant) and k.value.value is False)
                       for k in node.keywords):
                    out.append(f"{name}:{node.lineno} numpy load with allow_pickle")
    return out


def test_scanner_catches_what_it_looks_for():
    # Assembled from pieces so that text searches of the repo do not flag this test itself.
    ev, ex, tl, pk = "ev" + "al", "ex" + "ec", "torch." + "load", "pick" + "le"
    bad = (f"import {pk}\nx = {ev}('1')\n{ex}('y=2')\nimport torch\n{tl}('f')\n"
           f"{tl}('f', weights_only=False)\nimport numpy as np\nnp.load('a', allow_{pk}=True)\n")
    found = _problems(bad, "bad.py")
    assert len(found) == 6, found
    assert _problems(f"import torch\n{tl}('f', weights_only=True)\nre.compile('x')\n", "ok.py") == []


def test_pack_never_evaluates_or_unpickles():
    files = list(_pack_sources())
    assert len(files) > 5, files
    problems = []
    for rel in files:
        with open(os.path.join(REPO, rel), encoding="utf-8") as f:
            problems += _problems(f.read(), rel)
    assert problems == []
