"""Imports point one way (ARCHITECTURE.md): a module imports only from its own component or from
a lower layer, and no import cycle joins modules or packages. Read from the source with ``ast``,
so the check costs nothing and runs without torch.

What counts: every ``import`` in src/webtorch, at module level or inside a function (a deferred
import is still a dependency). The layer rule also counts imports under ``if TYPE_CHECKING:``
(an annotation that names a higher layer is coupling all the same); the cycle rules do not (they
never run, which is what they exist for: annotating both sides of a relationship).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# Bottom to top. A layer holds one or more components; a component is a list of module prefixes
# (the longest prefix that matches a module places it). A module may import its own component
# and any component of a lower layer; components of one layer are independent of each other.
LAYERS: list[dict[str, list[str]]] = [
    {"vocabulary": ["webtorch", "webtorch.errors", "webtorch.vocab", "webtorch.compiled"]},
    # State the workers of one server share (the guard's buckets and bans, upstream marks).
    {"shared": ["webtorch.shared"]},
    {"http": ["webtorch.http"]},
    {"metrics": ["webtorch.metrics"]},  # the instruments every layer above records into
    {"balance": ["webtorch.balance"]},
    # Sans-IO: which batch runs next (inference, training); what the executor and training use.
    {"batching": ["webtorch.serve.batcher", "webtorch.serve.scheduler"]},
    {"config": ["webtorch.config"]},  # validates names the policies define
    {
        "proxy": ["webtorch.proxy"],
        # The Model API and tensor formats: what a model is, which training builds on too.
        "model": ["webtorch.serve.model", "webtorch.serve.datatypes", "webtorch.serve.wire"],
    },
    {"train": ["webtorch.train"]},
    {"serve": ["webtorch.serve"]},  # batching, executing, endpoints, the model repository
    # Pipelines: stages over models' executors and function placements, their endpoints.
    # WebSocket: model streams (over serve/'s executors) and proxied WebSockets (over proxy/).
    {"pipeline": ["webtorch.pipeline"], "streams": ["webtorch.streams"]},
    # Plugins: user files at every phase of a request; they wrap the server's hooks (http), ask
    # the proxy's groups (pick) and the served models (serve), and the views read their stats.
    {"plugins": ["webtorch.plugins"]},
    # The guard: the first plugin (on plugins/' public phases), over its detector and tables.
    {"guard": ["webtorch.guard"]},
    {"views": ["webtorch.observe"]},  # dashboard, timeline, access log: they read the layers below
    {"app": ["webtorch.app"], "examples": ["webtorch.examples"]},
    # Several processes: the master (config and the standard library only) and its workers (app).
    {"workers": ["webtorch.workers"]},
    {"cli": ["webtorch.cli"]},
]

# Imports that break the rules on purpose, each with its reason. A new one fails the test.
ALLOWED: dict[tuple[str, str], str] = {
    ("webtorch", "webtorch.serve.model"): (
        "the package's lazy facade: `from webtorch import Model` in a model file; imported on "
        "first attribute access, never by the server itself"
    ),
    ("webtorch", "webtorch.pipeline.spec"): (
        "the package's lazy facade: `webtorch.stage`, `webtorch.Pipeline` in a pipeline file; "
        "imported on first attribute access, never by the server itself"
    ),
}

# Package-level cycles allowed: none left. serve/ spans layers (the sans-IO scheduling, the
# Model API and wire forms below train; the executor, endpoints and repository above it) but
# names train/ under TYPE_CHECKING only: the trainer builds its pipeline (Trainer.pipeline),
# the endpoint gets its train forms from that pipeline, and the app hands the repository its
# trainer factory. No two modules import each other. Any cycle between packages fails.
PACKAGE_CYCLES: list[set[str]] = []


def _modules() -> dict[str, ast.Module]:
    found = {}
    for path in sorted((SRC / "webtorch").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = ast.parse(path.read_text(), str(path))
    return found


def _imports(tree: ast.Module, modules: set[str]) -> Iterator[tuple[str, bool]]:
    """(imported module, whether only under TYPE_CHECKING) for each import."""

    def walk(node: ast.AST, typing_only: bool) -> Iterator[tuple[str, bool]]:
        for child in ast.iter_child_nodes(node):
            only = typing_only or (
                isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test)
            )
            if isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                for alias in child.names:  # `from webtorch.serve.wire import tensors`: that module
                    name = f"{child.module}.{alias.name}"
                    yield (name if name in modules else child.module), only
            elif isinstance(child, ast.Import):
                for alias in child.names:
                    yield alias.name, only
            yield from walk(child, only)

    yield from walk(tree, False)


def _tool_packages() -> set[str]:
    return {p.name for p in SRC.iterdir() if p.name.startswith("webtorch_") and p.is_dir()}


def _graph() -> tuple[set[str], dict[str, dict[str, bool]]]:
    """Modules, and for each the webtorch modules it imports (value: only for type checking)."""
    modules = _modules()
    edges: dict[str, dict[str, bool]] = {m: {} for m in modules}
    for name, tree in modules.items():
        for target, typing_only in _imports(tree, set(modules)):
            if target in modules and target != name:
                edges[name][target] = edges[name].get(target, True) and typing_only
    return set(modules), edges


def _place(module: str) -> tuple[int, str]:
    """(layer index, component) of a module: the longest matching prefix wins."""
    best: tuple[int, int, str] | None = None
    for index, layer in enumerate(LAYERS):
        for component, prefixes in layer.items():
            for prefix in prefixes:
                matches = module == prefix or module.startswith(prefix + ".")
                if matches and (best is None or len(prefix) > best[0]):
                    best = (len(prefix), index, component)
    assert best is not None, f"{module} is in no layer: place it in LAYERS (and ARCHITECTURE.md)"
    return best[1], best[2]


def _cycles(edges: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with more than one node (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.add(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(component)

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def _package(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2])


def test_every_import_points_down() -> None:
    modules, edges = _graph()
    wrong = []
    for source in sorted(modules):
        (layer, component) = _place(source)
        for target in sorted(edges[source]):
            (t_layer, t_component) = _place(target)
            if t_component == component or t_layer < layer or (source, target) in ALLOWED:
                continue
            wrong.append(f"{source} ({component}) imports {target} ({t_component})")
    assert wrong == [], "imports against the layers (ARCHITECTURE.md):\n" + "\n".join(wrong)


def test_the_runtime_never_imports_a_tool() -> None:
    # The tools (webtorch_lab, ...) sit above the whole runtime: cli.py runs them by name
    # (importlib), and no import statement in src/webtorch names one, deferred or not.
    tools = _tool_packages()
    assert "webtorch_lab" in tools
    modules = _modules()
    wrong = [
        f"{name} imports {target}"
        for name, tree in modules.items()
        for target, _ in _imports(tree, set(modules))
        if target.split(".")[0] in tools
    ]
    assert wrong == []


def test_no_module_imports_itself_in_a_circle() -> None:
    _, edges = _graph()
    running = {m: {t for t, typing_only in e.items() if not typing_only} for m, e in edges.items()}
    assert _cycles(running) == []


def test_package_cycles_are_only_the_known_ones() -> None:
    _, edges = _graph()
    packages: dict[str, set[str]] = {}
    for source, targets in edges.items():
        for target, typing_only in targets.items():
            if typing_only or (source, target) in ALLOWED:
                continue
            a, b = _package(source), _package(target)
            if a != b:
                packages.setdefault(a, set()).add(b)
    for cycle in _cycles(packages):
        known = any(cycle <= allowed for allowed in PACKAGE_CYCLES)
        assert known, f"a new import cycle between packages: {sorted(cycle)}"


def test_the_exceptions_still_exist() -> None:
    # An exception whose import is gone is removed, so it cannot hide a new one later.
    _, edges = _graph()
    for source, target in ALLOWED:
        assert target in edges.get(source, {}), f"ALLOWED lists a gone import {source} -> {target}"
