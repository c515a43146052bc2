"""The layers of DESIGN.md hold: every import points down, read from the source with ``ast`` (not grep).

A module of ``prmim_jax`` imports only modules of a lower layer, or of its own package
(``models`` from ``models``); nothing imports a module inside a function (a way round
a cycle); configs read only what a config may (``config_args``, ``base_config`` and
the ``*_config`` functions and constants of the lower layers); no module outside
``methods/`` names a method.
"""

import ast
import pathlib

import pytest

from prmim_jax import methods

ROOT = pathlib.Path(__file__).parent.parent
PACKAGE = ROOT / "prmim_jax"

# Bottom to top. A module's layer is that of its longest listed prefix.
LAYERS = (
    # what everything stands on: models, targets, the token convention, the mesh, checkpoints, process life
    (
        "config_args",
        "masking",
        "sharding",
        "checkpoint_integrity",
        "preemption",
        "distributed",
        "metrics",
        "models",
        "throughput",
        "profiling",
        "compilation_cache",
    ),
    ("checkpoint",),
    ("targets", "masking_transforms", "optim", "mixing", "pictures", "interop"),
    ("data",),
    ("attention_maps", "base_config"),
    ("methods", "evaluate"),  # siblings: an evaluator gets predict functions, never a method
    ("config_validation", "runs"),
    ("train_step", "loop"),
    ("train",),
    ("tools",),
    ("main", "export"),  # entry points: export is the export tool under a short name
)
SIBLINGS_THAT_NEVER_MEET = {"methods": "evaluate", "evaluate": "methods"}


def layer_of(module: str) -> tuple[int, str]:
    """``(layer, the listed name)`` of ``prmim_jax.<module>``."""
    best = None
    for index, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and (best is None or len(name) > len(best[1])):
                best = (index, name)
    assert best is not None, f"prmim_jax.{module} has no layer in LAYERS; add it where it belongs"
    return best


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(dotted: str) -> bool:
    """Whether ``prmim_jax.<dotted>`` is a module or package (not a name inside one)."""
    path = PACKAGE.joinpath(*dotted.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def imports(path: pathlib.Path):
    """``(imported prmim_jax module, line, inside a function)`` for every import of ``path``."""
    tree = ast.parse(path.read_text())
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    local = {id(node) for function in functions for node in ast.walk(function)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name == "prmim_jax" or not name.startswith("prmim_jax."):
                continue
            dotted = name.removeprefix("prmim_jax.")
            while not is_module(dotted):  # ``from prmim_jax.methods import Method``: the module is methods
                dotted = dotted.rpartition(".")[0]
            yield dotted, node.lineno, id(node) in local


SOURCES = sorted(path for path in PACKAGE.rglob("*.py") if path != PACKAGE / "__init__.py")  # the version only


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_import_of_the_package_points_down(path):
    module = module_name(path)
    own_layer, own_name = layer_of(module)
    for imported, line, _ in imports(path):
        layer, name = layer_of(imported)
        where = f"{path.relative_to(ROOT)}:{line} imports prmim_jax.{imported}"
        assert layer < own_layer or name == own_name, f"{where}, a layer above or beside it ({LAYERS[layer]})"
        assert SIBLINGS_THAT_NEVER_MEET.get(own_name) != name, f"{where}: evaluators get predict functions"


@pytest.mark.parametrize("path", [*SOURCES, *sorted((ROOT / "configs").glob("*.py"))], ids=lambda p: p.name)
def test_nothing_imports_a_module_of_the_package_inside_a_function(path):
    local = [line for _, line, inside in imports(path) if inside]
    assert not local, f"{path.relative_to(ROOT)} imports prmim_jax inside a function at lines {local}"


CONFIG_HELPERS = ("config_args", "base_config")


def config_files():
    return sorted((ROOT / "configs").glob("*.py"))


@pytest.mark.parametrize("path", config_files(), ids=lambda p: p.name)
def test_configs_read_only_config_helpers(path):
    # A config imports configs/common.py, ml_collections, config_args, base_config and the modules of the
    # lower layers whose section functions (``*_config``) and constants it reads; nothing of the trainer.
    tree = ast.parse(path.read_text())
    aliases = {}
    for imported, line, _ in imports(path):
        layer, name = layer_of(imported)
        assert layer <= layer_of("methods")[0], f"{path.name}:{line} imports prmim_jax.{imported}, not a helper"
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("prmim_jax"):
            for alias in node.names:
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                aliases[alias.asname or alias.name] = alias.name
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)):
            continue
        target = aliases.get(node.value.id, "")
        if not target.startswith("prmim_jax.") or target.removeprefix("prmim_jax.") in CONFIG_HELPERS:
            continue
        used = node.attr
        assert used.endswith("_config") or used.isupper(), (
            f"{path.name}:{node.lineno} reads {node.value.id}.{used}; configs read only *_config functions and "
            "constants (and config_args, base_config)"
        )
    for name, target in aliases.items():  # names imported directly, not through their module
        if target.startswith("prmim_jax.") and not is_module(target.removeprefix("prmim_jax.")):
            assert name.endswith("_config") or name.isupper(), f"{path.name} imports {target}"


@pytest.mark.parametrize("path", [p for p in SOURCES if "methods" not in p.parts], ids=lambda p: p.name)
def test_no_module_outside_methods_names_a_method(path):
    # Neither a method's name compared with (``method.name == 'mae'``) nor a table keyed by method names
    # (``{'mae': ..., 'greenmim': ...}``): a framework is added by its own files alone.
    tree = ast.parse(path.read_text())
    names = set(methods.registered())
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            operands = (node.left, *node.comparators)
            named = [o.value for o in operands if isinstance(o, ast.Constant) and o.value in names]
            subjects = " ".join(ast.unparse(o) for o in operands if not isinstance(o, ast.Constant))
            assert not (named and ("name" in subjects or "method" in subjects)), (
                f"{path.relative_to(ROOT)}:{node.lineno} compares {subjects} with the method name {named[0]!r}"
            )
        if isinstance(node, ast.Dict):
            keys = [k.value for k in node.keys if isinstance(k, ast.Constant) and k.value in names]
            assert len(keys) < 2, f"{path.relative_to(ROOT)}:{node.lineno} keys a table by method names {keys}"
