"""The house in numbers: each program's and package's line count, and the import graph between the project's
packages, with the rules it must keep (issue 24). Anyone can run it; tests/test_layout.py holds the rules.

    python benchmarks/layout.py [--root DIR]     # DIR: another checkout, e.g. `git worktree add /tmp/old COMMIT`

Rules: ref/ imports nothing of the project outside ref/ (it is the method); harness/ imports ref/ only; evals/
imports ref/ and harness/; worlds/ imports ref/, harness/ and evals/; the programs (train.py, eval.py) learn a world
through worlds/embedded.py only; the tools (weights_tools/, benchmarks/) sit above; no module imports one that
imports it back.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("ref", "harness", "evals", "worlds", "weights_tools", "benchmarks", "toy")  # toy/: before the move
PROGRAMS = ("train", "eval")
# what each group may import, besides itself
ALLOWED = {"ref": set(), "toy": {"ref", "evals"}, "harness": {"ref"}, "evals": {"ref", "harness"}, "worlds": {"ref", "harness", "evals"},
           "weights_tools": {"ref", "harness"}, "train": {"ref", "harness", "evals", "worlds", "toy"},
           "eval": {"ref", "harness", "evals", "worlds", "toy"},
           "benchmarks": {"ref", "harness", "evals", "worlds", "weights_tools", "train", "eval", "toy"}}
WORLD_INTERFACE = "worlds.embedded"  # the one module of worlds/ the programs may import


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the project but the tests, by dotted name."""
    modules = {name: root / f"{name}.py" for name in PROGRAMS}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):  # a package this checkout lacks has none
            parts = path.relative_to(root).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `path` imports (at any depth of its code: a function's import counts too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in modules)
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    modules = project_modules(root)
    return {name: imports_of(path, modules) - {name} for name, path in modules.items()}


def group(module: str) -> str:
    return module.split(".")[0]


def rule_breaks(graph: dict[str, set[str]]) -> list[str]:
    """Imports that cross the layers the wrong way."""
    wrong_way = [f"{a} imports {b}" for a, targets in sorted(graph.items()) for b in sorted(targets)
                 if group(b) != group(a) and group(b) not in ALLOWED[group(a)]]
    past_interface = [f"{a} imports {b}, not through {WORLD_INTERFACE}" for a in PROGRAMS
                      for b in sorted(graph.get(a, ())) if group(b) in ("worlds", "toy") and b != WORLD_INTERFACE]
    return wrong_way + past_interface


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle between modules (each found once, from its smallest name), by depth-first search."""
    found, seen = [], set()

    def visit(path: list[str]) -> None:
        for nxt in sorted(graph.get(path[-1], ())):
            if nxt == path[0]:
                key = frozenset(path)
                if key not in seen:
                    seen.add(key)
                    found.append(path + [nxt])
            elif nxt not in path and nxt > path[0]:
                visit(path + [nxt])

    for start in sorted(graph):
        visit([start])
    return found


def line_counts(root: Path = ROOT) -> dict[str, int]:
    counts = {f"{name}.py": len((root / f"{name}.py").read_text().splitlines()) for name in PROGRAMS}
    counts["README.md"] = len((root / "README.md").read_text().splitlines())
    for package in (p for p in PACKAGES if (root / p).is_dir()):
        counts[f"{package}/"] = sum(len(p.read_text().splitlines()) for p in (root / package).rglob("*.py"))
    return counts


def main(argv: list[str]) -> int:
    root = Path(argv[argv.index("--root") + 1]).resolve() if "--root" in argv else ROOT
    graph = import_graph(root)
    print(f"{root}\nlines:")
    for name, n in line_counts(root).items():
        print(f"  {name:<16} {n:>6}")
    print("imports between groups (module counts):")
    edges: dict[tuple[str, str], int] = {}
    for a, targets in graph.items():
        for b in targets:
            if group(a) != group(b):
                edges[group(a), group(b)] = edges.get((group(a), group(b)), 0) + 1
    for (a, b), n in sorted(edges.items()):
        print(f"  {a:<14} -> {b:<14} {n:>3}")
    breaks, loops = rule_breaks(graph), cycles(graph)
    print(f"rule breaks: {len(breaks)}" + "".join(f"\n  {b}" for b in breaks))
    print(f"cycles: {len(loops)}" + "".join(f"\n  {' -> '.join(c)}" for c in loops))
    return 1 if breaks or loops else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
