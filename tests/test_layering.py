"""The package's shape: imports run one way (config knows no torch and no train, parallel or faults;
parallel knows no train), no import cycle, and no module over 500 lines.

The import graph is read from the source with `ast`, so it sees every import, also those inside
functions and under `if TYPE_CHECKING:` (lazy and type-only imports still tie modules together),
and relative ones. An edge A -> B means that running A can import B. `from P import n` is an edge
to P.n when that is a module, else to P. Importing a.b.c also imports the packages a and a.b (their
__init__), except the packages A itself sits in: Python imports those before A runs, so they cannot
close a cycle through A.
"""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

PACKAGE = ROOT / "dist_llama"
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module and package of dist_llama."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _parents(name: str) -> list[str]:
    """a.b.c -> [a, a.b]."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _targets(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The dist_llama modules that running `name` can import directly."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    explicit, implied = set(), set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            explicit.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            source = node.module
            if node.level:  # relative: from the module's package, one level up per extra dot
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                source = f"{base}.{node.module}" if node.module else base
            submodules = {f"{source}.{alias.name}" for alias in node.names} & modules.keys()
            explicit.update(submodules)
            if submodules:
                implied.add(source)  # the package is only the way to its submodules
            if len(submodules) < len(node.names):
                explicit.add(source)  # a name defined in the package (its __init__) itself
    implied.update(p for t in explicit for p in _parents(t))
    return ((explicit | (implied - set(_parents(name)))) - {name}) & modules.keys()


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _targets(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]):
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, str] = {}  # "open" while on the DFS path, "done" after
    path: list[str] = []

    def visit(node: str):
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def import_path(graph: dict[str, set[str]], start: str, banned: tuple[str, ...], allowed: tuple[str, ...] = ()):
    """A chain of imports from `start` to a module under one of the `banned` prefixes (other than
    the `allowed` modules), or None."""
    def is_banned(name: str) -> bool:
        return name not in allowed and any(name == b or name.startswith(b + ".") for b in banned)

    seen, queue = {start: None}, [start]
    while queue:
        node = queue.pop(0)
        if is_banned(node):
            chain = [node]
            while seen[chain[-1]] is not None:
                chain.append(seen[chain[-1]])
            return chain[::-1]
        for nxt in sorted(graph[node], key=lambda n: (-n.count("."), n)):  # modules before their packages
            if nxt not in seen:
                seen[nxt] = node
                queue.append(nxt)
    return None


@pytest.mark.timeout(60)
def test_graph_sees_function_level_relative_and_package_imports():
    """The reader itself, on imports whose shape is known: a function-level import (plan.cli ->
    plan.search), a relative one (model.flops -> model.args), and `from P import module`."""
    graph = import_graph()
    assert "dist_llama.plan.search" in graph["dist_llama.plan.cli"]
    assert "dist_llama.model.args" in graph["dist_llama.model.flops"]
    assert "dist_llama.model.flops" in graph["dist_llama.model"]
    assert "dist_llama.config" in graph["dist_llama.launch.slurm"]  # `from dist_llama import config`
    assert "dist_llama.model" in graph["dist_llama.config.schema"]  # implied by dist_llama.model.args


@pytest.mark.timeout(60)
def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


OTHERS = ("dist_llama.config", "dist_llama.parallel", "dist_llama.train", "dist_llama.plan", "dist_llama.launch",
          "dist_llama.weights", "dist_llama.checkpoint_format", "dist_llama.faults", "dist_llama.generate",
          "dist_llama.testing")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("layer,banned", [
    ("dist_llama.config", ("dist_llama.train", "dist_llama.parallel", "dist_llama.faults")),
    ("dist_llama.parallel", ("dist_llama.train",)),
    ("dist_llama.weights", ("dist_llama.train", "dist_llama.plan", "dist_llama.launch")),
    # what a checkpoint is on disk sits below both train (which writes it) and weights (which reads it)
    ("dist_llama.checkpoint_format", ("dist_llama.train", "dist_llama.weights", "dist_llama.parallel",
                                      "dist_llama.plan", "dist_llama.launch")),
    # the ground floors: tokenizers and data, and the model, import nothing else of the package (data's
    # commands share the exit codes and the one-line argument parser of exit_codes.py, a leaf)
    ("dist_llama.data", OTHERS + ("dist_llama.model",)),
    ("dist_llama.model", OTHERS + ("dist_llama.data",)),
])
def test_imports_run_one_way(layer, banned):
    """Nothing in `layer` imports (directly or through other modules) anything under `banned`."""
    graph = import_graph()
    assert graph["dist_llama.exit_codes"] <= {"dist_llama"}  # the leaf the ground floors may use
    bad = [chain for name in sorted(graph) if name == layer or name.startswith(layer + ".")
           for chain in [import_path(graph, name, banned, allowed=("dist_llama.exit_codes",))] if chain]
    assert not bad, "\n".join(" -> ".join(chain) for chain in bad)


def _run_without_torch(code: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter, then fail it if torch got imported."""
    check = ("\nimport sys\nloaded = sorted(m for m in sys.modules if m.startswith('dist_llama'))\n"
             "assert 'torch' not in sys.modules, f'torch imported; dist_llama modules loaded: {loaded}'\n")
    return subprocess.run([sys.executable, "-c", code + check], cwd=ROOT, capture_output=True, text=True,
                          timeout=100)


@pytest.mark.timeout(120)
def test_config_imports_no_torch():
    proc = _run_without_torch("import dist_llama.config")
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.timeout(120)
def test_submit_dry_run_imports_no_torch(tmp_path):
    """`dist-llama-submit --dry-run` renders and validates a job on a login node without torch."""
    argv = ["--config", "configs/debug.yaml", "--nodes", "2", "--gpus-per-node", "2", "--cpu", "--dry-run",
            f"train.run_dir={tmp_path}/run"]
    proc = _run_without_torch(f"from dist_llama.launch.slurm import main\nassert main({argv!r}) == 0\n")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "#SBATCH --nodes=2" in proc.stdout and "4 ranks" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "run").exists()


@pytest.mark.timeout(60)
def test_no_module_over_500_lines():
    lengths = {path.relative_to(ROOT): path.read_bytes().count(b"\n") for path in sorted(PACKAGE.rglob("*.py"))}
    long = {str(path): n for path, n in lengths.items() if n > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (one concern per module): {long}"


NAME_COMPARISON = re.compile(r"(objective|engine) (==|!=|in)")
REGISTRIES = {"dist_llama/config/engines.py", "dist_llama/config/objectives.py"}


@pytest.mark.timeout(60)
def test_objective_and_engine_names_are_compared_only_in_their_registries():
    """`grep -rnE "objective (==|!=|in)|engine (==|!=|in)" dist_llama` finds only the registries: a
    new objective or engine is a module and a registry line, not a branch at every site."""
    found = [f"{path.relative_to(ROOT)}:{i}: {line.strip()}" for path in sorted(PACKAGE.rglob("*.py"))
             for i, line in enumerate(path.read_text().splitlines(), 1)
             if NAME_COMPARISON.search(line) and str(path.relative_to(ROOT)) not in REGISTRIES]
    assert not found, "\n".join(found)
