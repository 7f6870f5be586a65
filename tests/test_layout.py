"""The layout's rules: no import cycles, the oracle and task layers free of torch, comments that
cite docs/theory.md and never an issue."""

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "lmcoh"


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """lmcoh modules ``path`` imports at module level (function-level imports are deferred on purpose)."""
    tree = ast.parse(path.read_text())
    here = _module(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            name = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                full = f"{name}.{alias.name}"
                found.add(full if (PACKAGE.parent / (full.replace(".", "/") + ".py")).exists() else name)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m == "lmcoh" or m.startswith("lmcoh.")}


def test_no_import_cycles():
    graph = {_module(p): _imports(p) for p in PACKAGE.rglob("*.py")}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path + [node, nxt]))
            if nxt in graph and not state.get(nxt):
                visit(nxt, path + [node])
        state[node] = 2

    for node in graph:
        if not state.get(node):
            visit(node, [])


def test_oracle_tasks_and_study_import_no_torch():
    code = ("import sys; import lmcoh.oracle.exact, lmcoh.tasks.library, lmcoh.tasks.episodes, "
            "lmcoh.study.claims, lmcoh.io, lmcoh.cli; "
            "bad = [m for m in ('torch', 'transformers', 'trl', 'peft') if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stderr


def test_comments_cite_the_theory_page_not_issues():
    sources = [*PACKAGE.rglob("*.py"), *(ROOT / "recipes").glob("*.py"), *(ROOT / "tests").glob("*.py")]
    issue = re.compile(r"\bissue\s*#?\d+|\(issue\b", re.IGNORECASE)
    offenders = [f"{p.relative_to(ROOT)}:{i}" for p in sources if p.name != "test_layout.py"
                 for i, line in enumerate(p.read_text().splitlines(), 1)
                 if issue.search(line) or "THEORY.md" in line]  # the shared file is not in the repository
    assert not offenders
    theory = (ROOT / "docs" / "theory.md").read_text()
    for p in [*PACKAGE.rglob("*.py"), *(ROOT / "recipes").glob("*.py")]:
        for heading in re.findall(r'docs/theory\.md,\s*"([^"]+)"', p.read_text()):
            assert f"## {heading}" in theory, f"{p.relative_to(ROOT)} cites a missing heading {heading!r}"
