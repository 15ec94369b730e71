"""The layout's rules (docs/architecture.md): who may import whom, read from the page itself; every
module named in its table of owners; every design reference resolves.

The import graph is read from the source (every import statement, including the lazy ones inside
functions), so that a rule broken anywhere fails here.
"""

import ast
import fnmatch
import re
import sys
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


ARCHITECTURE = ROOT / "docs" / "architecture.md"


def architecture_section(title: str) -> str:
    text = ARCHITECTURE.read_text()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start: end if end >= 0 else len(text)]


def layer_rules() -> tuple[dict, dict]:
    """docs/architecture.md's layer table, read from its "Dependency rules" section:
    ({layer: the layers it may import}, {(layer, other): the only module of other it may import})."""
    block = re.search(r"```\n(.*?)```", architecture_section("Dependency rules"), re.DOTALL).group(1)
    layers, only = {}, {}
    for line in block.splitlines():
        name, arrow, targets = line.partition("->")
        assert arrow, f"docs/architecture.md: a layer rule without '->': {line!r}"
        name = name.strip()
        layers[name] = set()
        for target in filter(None, (t.strip() for t in targets.split(","))):
            match = re.fullmatch(r"(\w+)(?: \((\w+)\.py\))?", target)
            assert match, f"docs/architecture.md: {target!r} in the rule of {name!r} is not 'layer' or 'layer (file.py)'"
            layers[name].add(match.group(1))
            if match.group(2):
                only[(name, match.group(1))] = f"pcb_fast.{match.group(1)}.{match.group(2)}"
    return layers, only


LAYERS, ONLY = layer_rules()


def layer_of(module: str) -> str:
    """'core', 'methods', ..., or a top-level module's own name ("pcb_fast" for the package's __init__)."""
    return module.split(".")[1] if module.count(".") else module


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_every_module_imports_only_the_layers_its_own_may_use(module):
    own = layer_of(module)
    assert own in LAYERS, f"{module}: its layer {own!r} is not in docs/architecture.md's dependency rules"
    others = sorted(m for m in GRAPH[module] if layer_of(m) != own and layer_of(m) not in LAYERS[own])
    assert not others, f"{module} imports {others}; {own} may import only {sorted(LAYERS[own])}"
    narrow = sorted(m for m in GRAPH[module] if (own, layer_of(m)) in ONLY and m != ONLY[own, layer_of(m)]
                    and m != f"pcb_fast.{layer_of(m)}")
    assert not narrow, f"{module} imports {narrow}; of those layers {own} may import only " \
                       f"{sorted(v for (o, _), v in ONLY.items() if o == own)}"


def test_the_rules_are_read():
    # the rules above would pass vacuously on an empty table
    assert {"core", "io", "drivers", "api", "cli"} <= set(LAYERS) and len(LAYERS) >= 15
    assert LAYERS["kernels"] == LAYERS["reference"] == set()
    assert ONLY == {("core", "kernels"): "pcb_fast.kernels.keys", ("core", "cpu"): "pcb_fast.cpu.native"}
    assert "drivers" in LAYERS["cli"] and "drivers" not in LAYERS["io"] | LAYERS["api"]


def test_io_imports_no_driver_nor_api_nor_gpu():
    up = sorted(f"{m} imports {o}" for m in GRAPH if layer_of(m) == "io" for o in GRAPH[m]
                if layer_of(o) in ("drivers", "api", "gpu"))
    assert not up, "io/ reads, writes and checks files; the merges live in drivers/: " + "; ".join(up)


def version_only_violations(path: Path) -> list:
    """The names other than __version__ (and subpackages) that ``path`` imports from the package itself."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if alias.name == "pcb_fast"]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module
            if target == "pcb_fast":
                found += [alias.name for alias in node.names
                          if alias.name != "__version__" and f"pcb_fast.{alias.name}" not in GRAPH]
    return found


@pytest.mark.parametrize("path", [p for p in all_sources() if module_name(p) != "pcb_fast"], ids=module_name)
def test_of_the_package_init_a_module_reads_only_the_version(path):
    names = version_only_violations(path)
    assert not names, f"{module_name(path)} imports {names} from pcb_fast; only __version__ may come from there"


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


@pytest.mark.parametrize("module", LEAVES)
def test_the_leaves_import_nothing_of_ours(module):
    assert not GRAPH[module], f"{module} imports {sorted(GRAPH[module])}: a leaf must import nothing of pcb_fast"


def third_party_imports(path: Path) -> set:
    """The top-level names of the absolute imports of ``path`` that are neither ours nor the standard library."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level:
            found.add(node.module.partition(".")[0])
    return {m for m in found if m not in sys.stdlib_module_names and m not in ("__future__", "pcb_fast")}


@pytest.mark.parametrize("path", sorted(KERNELS.rglob("*.py")), ids=lambda p: p.name)
def test_the_kernels_import_torch_and_triton_only(path):
    others = third_party_imports(path) - {"torch", "triton"}
    assert not others, f"kernels/{path.name} imports {sorted(others)}: kernels/ takes torch, triton and the standard library only"


def owners_table() -> set:
    """The paths (relative to pcb_fast/, globs allowed) that docs/architecture.md's "Who owns what" names."""
    rows = [line for line in architecture_section("Who owns what").splitlines() if line.startswith("| ")]
    return {path for row in rows for path in re.findall(r"`([\w/*]+\.(?:py|c))`", row.rpartition(" | ")[2])}


def test_every_module_is_in_the_owners_table_and_every_one_named_exists():
    named = owners_table()
    modules = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"
               and not p.is_relative_to(PACKAGE / "kernels")} | {f"kernels/{p.name}" for p in KERNELS.glob("*.py")}
    missing = sorted(m for m in modules if not any(fnmatch.fnmatch(m, n) for n in named))
    assert not missing, f"docs/architecture.md's 'Who owns what' does not name {missing}"
    stale = sorted(n for n in named if not any(fnmatch.fnmatch(m, n) for m in modules)
                   and not (PACKAGE / n).exists())
    assert not stale, f"docs/architecture.md's 'Who owns what' names {stale}, which do not exist"


def test_the_graph_is_read():
    # the rules above would pass vacuously on an empty graph
    assert "pcb_fast.core.formulas" in GRAPH["pcb_fast.methods.ties"]
    assert "pcb_fast.kernels.keys" in GRAPH["pcb_fast.core.select"]
    assert "pcb_fast.io.slices" in GRAPH["pcb_fast.io.mergekit_config"]  # imported inside a function
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
