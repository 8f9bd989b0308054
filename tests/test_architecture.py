"""The layers of docs/architecture.md, checked on the source: every module under neurokern/ is
parsed with `ast` (nothing is imported, not even torch), placed in its layer, and each of its
imports of neurokern modules, at module level or inside a function, is held to the rules.

    base     neurokern.errors, neurokern.params, neurokern.state_dicts  imports base only
    ops      neurokern.ops.*, neurokern._C                           base
    methods  neurokern.methods.*, neurokern.models, neurokern.merging  ops, base
    tint     neurokern.tint.*                                        ops, base
    engine   neurokern.engine.*, neurokern.config, neurokern.checkpoint  methods, ops, base
    cli      neurokern.cli, neurokern.__main__                       engine, base
    integrations neurokern.integrations.*                            cli, engine, methods, tint, ops, base;
                                                                     no library module imports it
    root     neurokern (the package __init__)                        base; the rest lazily

The tooling (bench/, the accuracy suite bench/accuracy/ among it) lives outside the package: it
uses the public API like a user, and no library module imports it.

Besides the table: a `_` name or module is private to its layer; another layer reaches the ops
through neurokern.ops and neurokern.ops.triton only, and the methods through neurokern.methods,
neurokern.models and neurokern.merging (nk.merge) only; neurokern.ops.reference and
neurokern.methods.reference are for the tests. Where the code breaks a rule today, KNOWN_EXCEPTIONS says so (docs/architecture.md,
"Known exceptions"); a new violation fails, and so does an entry that no longer matches anything.
"""
import ast
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "neurokern"
LIBRARY = ("base", "ops", "methods", "tint", "engine", "cli", "integrations", "root")

# Which layers a layer may import from (its own included).
ALLOWED = {
    "base": {"base"},
    "ops": {"base", "ops"},
    "methods": {"base", "ops", "methods"},
    "tint": {"base", "ops", "tint"},
    "engine": {"base", "ops", "methods", "engine"},
    "cli": {"base", "engine", "cli"},
    # other tools' formats, APIs and programs (mergekit's methods and mergekit-yaml, PEFT adapters,
    # FusionBench algorithms): the top layer; no other layer imports it
    "integrations": {"base", "ops", "methods", "tint", "engine", "cli", "integrations"},
    "root": {"base"},  # import neurokern stays light; its lazy attributes (_LAZY) load the layers
}
# What another layer may import of a layer (modules; names from them must not start with _).
SURFACE = {
    "ops": {"neurokern.ops", "neurokern.ops.triton"},
    "methods": {"neurokern.methods", "neurokern.models", "neurokern.merging"},
}
# The meaning of the ops and the methods in plain PyTorch: what the tests compare against.
REFERENCES = {"neurokern.ops.reference", "neurokern.methods.reference"}

# Today's violations, (rule, importing module, what it imports): each one a line of
# docs/architecture.md's "Known exceptions". Fix one and delete its entry (the test says so).
KNOWN_EXCEPTIONS: set[tuple[str, str, str]] = set()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def parse_all() -> dict[str, tuple[Path, ast.Module]]:
    return {module_name(p): (p, ast.parse(p.read_text(), str(p))) for p in sorted(PACKAGE.rglob("*.py"))}


TREES = parse_all()
MODULES = set(TREES) | {"neurokern._C"}  # _C: the compiled extension (csrc/), part of the ops


def is_package(module: str) -> bool:
    return module in TREES and TREES[module][0].name == "__init__.py"


def bound_names(module: str) -> set[str]:
    """Names a module binds at its top level (defs, classes, assignments, imports)."""
    names = set()
    for node in TREES[module][1].body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def root_lazy() -> dict[str, str]:
    """neurokern/__init__.py's _LAZY: attribute name -> module it comes from."""
    for node in TREES["neurokern"][1].body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_LAZY" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("neurokern/__init__.py has no _LAZY map")


LAZY = root_lazy()
ROOT_OWN = bound_names("neurokern") - set(LAZY)


def layer(module: str) -> str:
    """The layer a neurokern module belongs to (docs/architecture.md)."""
    top = module.split(".")[1] if "." in module else ""
    if module == "neurokern":
        return "root"
    if module in ("neurokern.errors", "neurokern.params", "neurokern.state_dicts"):
        return "base"
    if top in ("ops", "_C"):
        return "ops"
    if top in ("methods", "models", "merging"):
        return "methods"
    if top == "tint":
        return "tint"
    if top in ("engine", "config", "checkpoint"):
        return "engine"
    if top in ("cli", "__main__"):
        return "cli"
    if top == "integrations":
        return "integrations"
    raise AssertionError(f"{module}: no layer; place it in tests/test_architecture.py and docs/architecture.md")


@dataclass(frozen=True)
class Import:
    importer: str
    line: int
    target: str  # the neurokern module it loads (a submodule where the name is one)
    name: Optional[str]  # the name taken from target (None: the module itself)

    @property
    def what(self) -> str:
        return self.target if self.name is None else f"{self.target}.{self.name}"


def resolve(importer: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".") if is_package(importer) else importer.split(".")[:-1]
    base = base[:len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(importer: str) -> list[Import]:
    out = []
    for node in ast.walk(TREES[importer][1]):
        if isinstance(node, ast.Import):
            out += [Import(importer, node.lineno, a.name, None) for a in node.names
                    if a.name == "neurokern" or a.name.startswith("neurokern.")]
        elif isinstance(node, ast.ImportFrom):
            module = resolve(importer, node)
            if module != "neurokern" and not module.startswith("neurokern."):
                continue
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                if module == "neurokern" and alias.name in LAZY:  # nk.merge, nk.METHODS, ...
                    target = LAZY[alias.name]
                    out.append(Import(importer, node.lineno, target, None if target == sub else alias.name))
                elif sub in MODULES and not (module in TREES and alias.name in bound_names(module)):
                    out.append(Import(importer, node.lineno, sub, None))
                else:
                    out.append(Import(importer, node.lineno, module, alias.name))
    return out


def tooling_imports(node: ast.AST) -> list[str]:
    """The modules of bench/ an import statement loads (bench is a namespace package at the repo root)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and not node.level:
        names = [node.module or ""]
    else:
        return []
    return [n for n in names if n == "bench" or n.startswith("bench.")]


IMPORTS = [imp for module in sorted(TREES) for imp in imports_of(module)]


def target_layer(imp: Import) -> str:
    if imp.target == "neurokern" and imp.name in ROOT_OWN:
        return "base"  # neurokern.__version__: a constant of the root, which imports only base
    return layer(imp.target)


def is_private(imp: Import) -> bool:
    parts = imp.what.split(".")
    return any(p.startswith("_") and not p.endswith("__") for p in parts)


def rule_broken(imp: Import) -> Optional[str]:
    """The rule imp breaks, if any (one rule per import)."""
    mine, theirs = layer(imp.importer), target_layer(imp)
    if imp.target in REFERENCES:
        return "reference"
    if theirs == "root" or theirs not in ALLOWED[mine]:
        return "layer"
    if mine != theirs and is_private(imp):
        return "private"
    if mine != theirs and theirs in SURFACE and imp.target not in SURFACE[theirs]:
        return "surface"
    return None


def found(rule: str) -> list[str]:
    """This rule's violations that KNOWN_EXCEPTIONS does not list, one line each."""
    return [f"{imp.importer} (line {imp.line}, {layer(imp.importer)}) imports {imp.what} ({target_layer(imp)})"
            for imp in IMPORTS
            if rule_broken(imp) == rule and (rule, imp.importer, imp.what) not in KNOWN_EXCEPTIONS]


# ---------------------------------------------------------------------------------------------

def test_every_module_has_a_layer():
    assert {layer(m) for m in TREES} == set(LIBRARY)


def test_the_walk_sees_function_level_imports():
    """The rules cover imports inside functions (the lazy ones that keep `neurokern merge` light)."""
    assert any(imp.importer == "neurokern.cli" and imp.what == "neurokern.engine.merge_models"
               for imp in IMPORTS)  # inside merge_command
    assert any(imp.importer == "neurokern.engine.run" and imp.what == "neurokern.__version__" for imp in IMPORTS)


def test_each_layer_imports_only_the_layers_below_it():
    assert not found("layer"), "\n".join(found("layer"))


def test_private_names_stay_in_their_layer():
    assert not found("private"), "\n".join(found("private"))


def test_other_layers_use_the_public_surface_of_ops_and_methods():
    assert not found("surface"), "\n".join(found("surface"))


def test_no_library_module_imports_the_tooling():
    """bench/ (the accuracy suite, the benchmarks) is outside the library: nothing in it is imported."""
    tooling = [f"{module} (line {node.lineno}) imports {name}"
               for module, (_, tree) in TREES.items() for node in ast.walk(tree)
               for name in tooling_imports(node)]
    assert not tooling, "\n".join(tooling)


def test_no_library_module_imports_a_reference():
    assert not found("reference"), "\n".join(found("reference"))


def test_no_library_module_imports_the_ops_reference_at_all():
    """neurokern.ops.reference (each op's meaning in plain PyTorch) is for the tests only: no module
    under neurokern/ imports it, not even as a known exception (the Triton launchers run more tasks
    than their kernel slots in chunks, on the device)."""
    importers = [f"{imp.importer} (line {imp.line})" for imp in IMPORTS
                 if imp.target == "neurokern.ops.reference" or imp.what.startswith("neurokern.ops.reference.")]
    assert not importers, "\n".join(importers)
    assert not [e for e in KNOWN_EXCEPTIONS if e[2].startswith("neurokern.ops.reference")]


def test_the_root_loads_library_layers_lazily():
    """`import neurokern` imports only base (no torch); its lazy attributes name library layers."""
    assert {layer(module) for module in LAZY.values()} <= {"ops", "methods", "tint", "engine"}


def test_every_known_exception_still_happens():
    """An exception fixed in the code leaves the list: it must not excuse a later violation."""
    current = {(rule_broken(imp), imp.importer, imp.what) for imp in IMPORTS}
    stale = sorted(KNOWN_EXCEPTIONS - current)
    assert not stale, "fixed, delete from KNOWN_EXCEPTIONS (and docs/architecture.md): " + "; ".join(map(str, stale))
