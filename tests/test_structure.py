"""The package's structure: no import circles (lazy imports included), a CLI that imports no torch."""

import ast
import subprocess
import sys
from pathlib import Path

import lsdtool

ROOT = Path(lsdtool.__file__).parent


def module_names() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the lsdtool modules it imports anywhere (module level or inside functions)."""
    names = module_names()
    graph = {}
    for name, path in names.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in names else base for a in node.names]
            else:
                continue
            edges |= {t for t in targets if t in names and t != name}
        graph[name] = edges
    return graph


def find_cycle(graph):
    state, stack = {}, []

    def visit(v):
        state[v] = 1
        stack.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return stack[stack.index(w):] + [w]
            if w not in state and (found := visit(w)):
                return found
        stack.pop()
        state[v] = 2
        return None

    for v in sorted(graph):
        if v not in state and (found := visit(v)):
            return found
    return None


def test_no_import_circles():
    graph = import_graph()
    assert graph["lsdtool.cli"] and graph["lsdtool.artifacts"]  # the parser sees imports at all
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_help_and_the_torch_free_modules_import_no_torch():
    code = ("import sys, lsdtool, lsdtool.cli, lsdtool.steprules, lsdtool.grids, lsdtool.artifacts, lsdtool.cache, "
            "lsdtool.recipes, lsdtool.locations, lsdtool.models.registry, lsdtool.models.locate, lsdtool.models.families, "
            "lsdtool.models.own, lsdtool.plugins\n"
            "from click.testing import CliRunner\n"
            "assert CliRunner().invoke(lsdtool.cli.main, ['--help']).exit_code == 0\n"
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
