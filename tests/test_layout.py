"""The layout's rules (docs/architecture.md): who may import whom, and every design reference resolves.

The import graph is read from the source (every import statement, including the lazy ones inside
functions), so that a rule broken anywhere fails here.
"""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "pcb_fast"
KERNELS = ROOT / "kernels"
ENGINE = ("core", "methods", "cpu", "gpu")  # the fast paths


def module_name(path: Path) -> str:
    if path.is_relative_to(KERNELS):
        parts = ("pcb_fast", "kernels") + path.relative_to(KERNELS).with_suffix("").parts
    else:
        parts = ("pcb_fast",) + path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The pcb_fast modules that ``path`` imports (absolute names; ``from x import y`` counts as x.y
    where y is a submodule, else as x)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    known = {module_name(p) for p in all_sources()}
    return {m for m in found if m in known and m != name}


def all_sources():
    return sorted(PACKAGE.rglob("*.py")) + sorted(KERNELS.rglob("*.py"))


def layer(module: str) -> str:
    """'core', 'methods', ..., or the top-level module's name."""
    return module.split(".")[1] if module.count(".") else ""


GRAPH = {module_name(p): imports_of(p) for p in all_sources()}


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if layer(m) == "reference"))
def test_the_oracles_import_nothing_of_the_engine(module):
    others = sorted(m for m in GRAPH[module] if layer(m) != "reference")
    assert not others, f"{module} imports {others}: the oracles must stay independent of the engine"


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if layer(m) in ENGINE))
def test_the_engine_never_imports_the_oracles(module):
    oracles = sorted(m for m in GRAPH[module] if layer(m) == "reference")
    assert not oracles, f"{module} imports {oracles}: the fast paths must not share code with the oracles"


# The C kernels' loader: a leaf (torch and the C library only), which core/ may use for its primitives
# (collection, order statistics) as it uses kernels/keys.py.
LEAVES = ("pcb_fast.cpu.native",)


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if layer(m) in ("core", "kernels")))
def test_the_bottom_layers_import_nothing_above_them(module):
    allowed = {"core": ("core", "kernels"), "kernels": ("kernels",)}[layer(module)]
    above = sorted(m for m in GRAPH[module] if layer(m) not in allowed and not (layer(module) == "core" and m in LEAVES))
    assert not above, f"{module} imports {above}; {layer(module)}/ may import only from {', '.join(allowed)}"


@pytest.mark.parametrize("module", LEAVES)
def test_the_leaves_import_nothing_of_ours(module):
    assert not GRAPH[module], f"{module} imports {sorted(GRAPH[module])}: a leaf must import nothing of pcb_fast"


# The layers in use (docs/architecture.md, "Dependency rules"): layer -> the other layers it may import.
# "pcb_fast" is the package itself (its __version__); "" marks a top-level module's own name.
LAYERS = {
    "kernels": set(),
    "reference": set(),
    "core": {"kernels", "cpu"},  # cpu/native.py only (test_the_bottom_layers_import_nothing_above_them)
    "cpu": {"core"},
    "methods": {"core", "cpu"},
    "gpu": {"core", "kernels", "methods"},
    "io": {"core", "cpu", "methods", "pcb_fast"},
    "api": {"core", "cpu", "gpu", "io", "methods", "reference", "pcb_fast"},
    "drivers": {"api", "core", "cpu", "gpu", "io", "methods", "pcb_fast"},
    "search": {"api", "core", "io", "methods"},
    "cli": {"api", "core", "drivers", "io", "methods", "search", "demo", "pcb_fast"},
    "demo": {"api", "pcb_fast"},
    "modules": {"api"},
    "integrations": {"modules"},
    "__main__": {"cli"},
    "pcb_fast": {"api", "drivers", "modules", "search"},
}


def layer_of(module: str) -> str:
    return module.split(".")[1] if module.count(".") else module


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_every_module_imports_only_the_layers_its_own_may_use(module):
    own = layer_of(module)
    assert own in LAYERS, f"{module}: its layer {own!r} is not in docs/architecture.md's rules (LAYERS here)"
    others = sorted(m for m in GRAPH[module] if layer_of(m) != own and layer_of(m) not in LAYERS[own])
    assert not others, f"{module} imports {others}; {own} may import only {sorted(LAYERS[own])}"


def test_the_graph_is_read():
    # the rules above would pass vacuously on an empty graph
    assert "pcb_fast.core.formulas" in GRAPH["pcb_fast.methods.ties"]
    assert "pcb_fast.kernels.keys" in GRAPH["pcb_fast.core.select"]
    assert len(GRAPH) > 30


# ---- every "design.md N.M" cited in the repository names a section of docs/design.md

DESIGN = ROOT / "docs" / "design.md"
CITATION = re.compile(r"design(?:\.md)?[ ,]+(?:section )?(\d+(?:\.\d+)?)(?:\s*-\s*(\d+(?:\.\d+)?))?", re.IGNORECASE)


def design_sections() -> set[str]:
    return set(re.findall(r"^#+ (\d+(?:\.\d+)?)[. ]", DESIGN.read_text(), re.MULTILINE))


def cited_sections():
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *all_sources(),
             *sorted((ROOT / "tests").glob("*.py")), *sorted((ROOT / "benchmarks").rglob("*.py"))]
    for path in files:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for match in CITATION.finditer(line):
                for section in match.groups():
                    if section:
                        yield f"{path.relative_to(ROOT)}:{number}", section


def test_every_design_reference_names_a_section_that_exists():
    sections = design_sections()
    assert {"2", "2.2", "3", "9"} <= sections, "docs/design.md lacks its numbered sections"
    citations = list(cited_sections())
    assert len(citations) > 20  # the references are found at all
    missing = [f"{where} cites {section}" for where, section in citations if section not in sections]
    assert not missing, "citations of sections docs/design.md does not have:\n" + "\n".join(missing)
