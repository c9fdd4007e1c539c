"""The package is layered: a module imports only from its own folder or from layers below it.

The walk reads every `import` in the source (function-level ones included, since a lazy import is
still a dependency), so moving a helper into the wrong layer, importing a private name from another
module, or closing an import cycle fails here with the offending file and line.
"""

import ast
from pathlib import Path

import palm_rlhf

PACKAGE = Path(palm_rlhf.__file__).parent

# Bottom to top. A unit (a flat module or a folder) may import units of strictly lower layers and
# its own folder; units in one layer are peers and do not import each other.
LAYERS: list[tuple[str, ...]] = [
    ("progress", "storage"),
    ("config",),  # above storage: save_config writes atomically
    ("tokenizers",),
    ("losses",),  # pure tensor maths, below the model: PaLM.loss is losses.lm.lm_loss
    ("model",),
    ("data",),
    ("arithmetic",),  # a synthetic task (prompts from data/ + its reward function)
    ("generation",),
    ("training",),
    ("rl",),
    ("plot", "hf", "label", "chat", "plan"),
    ("demo",),
    ("cli",),
    ("__init__",),
]
LAYER_OF = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def unit_of(module: str) -> str:
    """'palm_rlhf.rl.ppo' -> 'rl'; 'palm_rlhf' -> '__init__'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def is_module(dotted: str) -> bool:
    where = PACKAGE.parent.joinpath(*dotted.split("."))
    return where.with_suffix(".py").exists() or where.is_dir()


def resolve(path: Path, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module_name(path).split(".")
    if not is_package(path):
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def internal_imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, names) for every import of palm_rlhf from this file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [
                (node.lineno, a.name, []) for a in node.names if a.name.startswith("palm_rlhf")
            ]
        elif isinstance(node, ast.ImportFrom):
            target = resolve(path, node)
            if target.split(".")[0] != "palm_rlhf":
                continue
            names = [a.name for a in node.names]
            # `from . import x` / `from ..data import corpus` import submodules.
            submodules = [n for n in names if is_module(f"{target}.{n}")]
            for name in submodules:
                found.append((node.lineno, f"{target}.{name}", []))
            rest = [n for n in names if n not in submodules]
            if rest or not submodules:
                found.append((node.lineno, target, rest))
    return found


def source_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for path in source_files():
        edges[module_name(path)] = {target for _, target, _ in internal_imports(path)}
    return edges


def test_every_unit_has_a_layer():
    units = {unit_of(module_name(path)) for path in source_files()}
    assert units - set(LAYER_OF) == set(), "add the new module or folder to LAYERS"
    assert set(LAYER_OF) - units == set(), "LAYERS names a unit that no longer exists"


def test_modules_import_only_their_folder_or_lower_layers():
    wrong = []
    for path in source_files():
        here = unit_of(module_name(path))
        for line, target, _ in internal_imports(path):
            there = unit_of(target)
            if there != here and LAYER_OF[there] >= LAYER_OF[here]:
                wrong.append(
                    f"{path.relative_to(PACKAGE.parent)}:{line} ({here}) imports {target} ({there})"
                )
    assert wrong == []


def test_no_private_name_is_imported_from_another_module():
    wrong = []
    for path in source_files():
        for line, target, names in internal_imports(path):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private and target != module_name(path):
                wrong.append(
                    f"{path.relative_to(PACKAGE.parent)}:{line} imports {private} from {target}"
                )
    assert wrong == []


def test_the_import_graph_has_no_cycles():
    edges = graph()
    # A package's __init__ re-exports its children, so the edge child -> package is not a cycle
    # worth reporting; everything else must be acyclic.
    for module in edges:
        edges[module] = {t for t in edges[module] if t in edges and not module.startswith(t + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for target in sorted(edges[module]):
            if state.get(target) == 1:
                cycles.append(stack[stack.index(target) :] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module)
    assert cycles == []


def test_every_folder_says_what_it_owns():
    for init in PACKAGE.rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc.split()) >= 8, (
            f"{init} needs a docstring saying what the folder owns"
        )


def test_the_walk_sees_relative_and_function_level_imports(tmp_path):
    """The checker itself: a lazy `from ..cli import main` inside a function is found."""
    imports = internal_imports(PACKAGE / "cli" / "rl.py")
    assert any(target.startswith("palm_rlhf.rl") for _, target, _ in imports)
    lazy = PACKAGE / "model" / "__init__.py"
    code = "def f():\n    from ..cli import main\n"
    node = ast.parse(code).body[0].body[0]
    assert resolve(lazy, node) == "palm_rlhf.cli"
    assert unit_of("palm_rlhf.cli") == "cli" and LAYER_OF["cli"] > LAYER_OF["model"]


def test_tests_mirror_the_package_tree():
    """Each package folder has its tests in the folder of the same name under tests/; the tests
    of flat modules and of the whole pipeline sit at the top; basenames stay unique (pytest
    imports test modules by basename)."""
    tests = Path(__file__).resolve().parent
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    test_folders = {p.name for p in tests.iterdir() if p.is_dir() and any(p.glob("test_*.py"))}
    assert test_folders == folders
    names = [p.name for p in tests.rglob("test_*.py")]
    assert len(names) == len(set(names))
