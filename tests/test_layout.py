"""The house rules (issue 24), checked on the tree as it is: imports run one way with no cycle, ref/ is the method and
nothing else, the programs stay short, the README stays a front page. benchmarks/layout.py prints the same figures."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
import layout  # noqa: E402

GRAPH = layout.import_graph()


def test_imports_run_one_way():
    assert layout.rule_breaks(GRAPH) == []


def test_no_module_imports_one_that_imports_it_back():
    assert layout.cycles(GRAPH) == []


def test_the_checks_catch_what_they_are_for():
    """The rules on a made-up graph: a method module importing the harness, a cycle, a program past the interface."""
    graph = {"ref.a": {"harness.b"}, "harness.b": {"ref.a"}, "train": {"worlds.toy.defaults"}}
    assert layout.rule_breaks(graph) == ["ref.a imports harness.b",
                                         "train imports worlds.toy.defaults, not through worlds.embedded"]
    assert layout.cycles(graph) == [["harness.b", "ref.a", "harness.b"]]


METHOD_FORBIDDEN = {"argparse", "harness", "evals", "worlds", "signal", "subprocess"}


@pytest.mark.parametrize("path", sorted((REPO / "ref").rglob("*.py")), ids=lambda p: str(p.relative_to(REPO)))
def test_ref_is_the_method_only(path):
    """No command line, console, signals or run folders in ref/: no such import, no __main__ block, no print."""
    tree = ast.parse(path.read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
    assert not imported & METHOD_FORBIDDEN
    assert "__main__" not in path.read_text()
    assert not [node for node in ast.walk(tree)
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print"]


@pytest.mark.parametrize("name, limit", [("train.py", 450), ("eval.py", 450), ("README.md", 250)])
def test_the_programs_and_the_front_page_stay_short(name, limit):
    assert len((REPO / name).read_text().splitlines()) <= limit
