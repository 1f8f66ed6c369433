"""The package's structure, read from its imports (function-level imports included), nothing run: imports go
one way (no cycle), no private name crosses a module boundary, no module grows past 400 lines, the library
never imports its tools, and the public surface is ``__all__``, the README's API table and the layers' order
of docs/ARCHITECTURE.md."""
import ast
import re
from pathlib import Path

import loldu_triton

PACKAGE = Path(loldu_triton.__file__).resolve().parent
REPO = PACKAGE.parent
# Bottom to top: a module may import from its own layer's modules or from lower layers only.
LAYERS = ["_version", "core", "factors", "kernels", "ops", "layers", "model", "files", "integrations", "tools"]


def modules():
    """{dotted name: (path, source)} of every module of the package."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = (path, path.read_text())
    return found


def imports(name, path, source):
    """(imported module, imported name or None) for every import statement in the module, at any depth."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                yield target, alias.name
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None


def edges():
    mods = modules()
    graph = {m: set() for m in mods}
    private = []
    for m, (path, source) in mods.items():
        for target, name in imports(m, path, source):
            if not target.startswith("loldu_triton"):
                continue
            full = f"{target}.{name}" if name else target
            dest = full if full in mods else target
            if dest != m:
                graph[m].add(dest)
            if name and name.startswith("_") and not name.startswith("__"):
                private.append(f"{m} imports {name} from {target}")
    return graph, private


def layer_of(module):
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 else None  # None: the package's own __init__


def test_no_import_cycle_among_the_modules():
    graph, _ = edges()
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in graph[node]:
            if state.get(nxt) == "open":
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in graph:
        if node not in state:
            visit(node, [node])


def test_imports_run_from_higher_layers_to_lower_ones_only():
    graph, _ = edges()
    upward = [f"{m} ({LAYERS[layer_of(m)]}) imports {t} ({LAYERS[layer_of(t)]})"
              for m, targets in graph.items() if layer_of(m) is not None
              for t in targets if layer_of(t) is not None and layer_of(t) > layer_of(m)]
    assert not upward, "\n".join(upward)
    # the tools are never imported by the library, not even by the package's __init__
    assert not [t for t in graph["loldu_triton"] if ".tools" in t]


def test_no_private_name_crosses_a_module_boundary():
    _, private = edges()
    assert not private, "\n".join(private)


def test_no_module_is_longer_than_400_lines():
    long = {m: len(src.splitlines()) for m, (_, src) in modules().items() if len(src.splitlines()) > 400}
    assert not long, long


def test_every_package_folder_is_a_known_layer():
    folders = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__")
    assert folders == sorted(LAYERS[1:]), folders


def test_all_is_the_readme_api_table_and_every_name_is_importable():
    table = re.search(r"## API\n(.*?)\n## ", (REPO / "README.md").read_text(), flags=re.S).group(1)
    named = set()
    for row in table.splitlines():
        if row.startswith("| `"):
            for span in re.findall(r"`([^`]+)`", row.split(" | ")[0]):
                name = re.match(r"[A-Za-z_]\w*", span)
                if name and (hasattr(loldu_triton, name.group()) or name.group() in loldu_triton.__all__):
                    named.add(name.group())
    public = set(loldu_triton.__all__) - {"__version__"}
    assert named == public, ("in __all__, not in the README's table:", sorted(public - named),
                             "in the table, not in __all__:", sorted(named - public))
    for name in loldu_triton.__all__:
        assert getattr(loldu_triton, name) is not None, name


def test_internals_are_not_exported():
    for name in ("base_type", "LOLDU_LAYERS", "INITS", "LDUFactors", "loldu_merge"):
        assert name not in loldu_triton.__all__ and not hasattr(loldu_triton, name), name
