"""The shape of the library: layers point one way, no import circles, the CLI is a leaf.

Every ``import`` in every module counts, including those inside functions (a lazy import still couples two
modules, and is how the old ``serve -> index -> cli -> serve`` circle hid).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "vsekit"

# lower layers never import higher ones; within a layer, packages do not import each other
LAYERS: list[set[str]] = [
    {"vsekit", "vsekit.errors"},
    {"vsekit.registry", "vsekit.utils"},
    {"vsekit.text"},
    {"vsekit.data"},
    {"vsekit.models"},
    {"vsekit.losses", "vsekit.semantics"},
    {"vsekit.eval"},  # semantic recall reads the LSA of vsekit.semantics
    {"vsekit.config"},
    {"vsekit.checkpoint"},
    {"vsekit.inference"},
    {"vsekit.captioning", "vsekit.imagine"},  # a checkpoint's caption decoder / GAN beside its Embedder
    {"vsekit.train", "vsekit.index", "vsekit.features"},  # features: a backbone, or a checkpoint's CNN
    {"vsekit.serve"},
    {"vsekit.cli"},
    {"vsekit.__main__"},
]


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def _resolve(name: str) -> str:
    """The module an imported dotted name refers to (``vsekit.data.corpus.Corpus`` -> ``vsekit.data.corpus``)."""
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def imports_of(module: str) -> set[str]:
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            names = [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        for n in names:
            if n == "vsekit" or n.startswith("vsekit."):
                target = _resolve(n)
                if target != module:
                    found.add(target)
    return found


GRAPH = {m: imports_of(m) for m in MODULES}


def layer_of(module: str) -> tuple[int, str]:
    best: tuple[int, str] | None = None
    for i, group in enumerate(LAYERS):
        for prefix in group:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[1])):
                best = (i, prefix)
    assert best is not None, f"{module} is in no layer of this test; add it to LAYERS"
    return best


def test_every_module_has_a_layer():
    for m in MODULES:
        layer_of(m)


def test_layers_point_one_way():
    bad = []
    for m, targets in GRAPH.items():
        lm, pm = layer_of(m)
        for t in targets:
            lt, pt = layer_of(t)
            if lt > lm or (lt == lm and pt != pm and pt != "vsekit" and pm != "vsekit"):
                bad.append(f"{m} (layer {lm}: {pm}) imports {t} (layer {lt}: {pt})")
    assert not bad, "layering violations:\n" + "\n".join(sorted(bad))


def test_no_import_circles():
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in MODULES:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for m in sorted(MODULES):
        if m not in index:
            visit(m)
    assert not cycles, "import circles: " + "; ".join(" <-> ".join(c) for c in cycles)


@pytest.mark.parametrize("library", ["vsekit.index", "vsekit.serve", "vsekit.inference", "vsekit.imagine", "vsekit.captioning",
                                     "vsekit.eval"])
def test_search_and_evaluation_never_reach_training_or_the_cli(library):
    seen, todo = set(), [m for m in MODULES if m == library or m.startswith(library + ".")]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo.extend(t for t in GRAPH.get(m, ()) if t in MODULES)
    reached = sorted(m for m in seen if m.startswith(("vsekit.train", "vsekit.cli")))
    assert not reached, f"{library} reaches {reached}"


def test_the_layering_test_catches_a_violation(tmp_path, monkeypatch):
    """The checker itself: a low module importing the CLI is reported."""
    GRAPH_with_bad = dict(GRAPH)
    GRAPH_with_bad["vsekit.data.corpus"] = GRAPH["vsekit.data.corpus"] | {"vsekit.cli"}
    monkeypatch.setattr(__import__(__name__), "GRAPH", GRAPH_with_bad, raising=False)
    monkeypatch.setitem(globals(), "GRAPH", GRAPH_with_bad)
    with pytest.raises(AssertionError, match="vsekit.data.corpus .* imports vsekit.cli"):
        test_layers_point_one_way()
    GRAPH_with_bad["vsekit.cli"] = GRAPH["vsekit.cli"] | {"vsekit.data.corpus"}
    with pytest.raises(AssertionError, match="import circles"):
        test_no_import_circles()
