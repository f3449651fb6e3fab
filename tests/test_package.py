"""The package itself: its public surface, its imports, its declared versions."""

import ast
import pathlib
import re

import keras
import tensorflow as tf

import tfpar
import tfpar.callbacks
import tfpar.strategies
from tests._subprocess import run_python
from tfpar._compat import SUPPORTED

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tfpar"


def test_every_public_name_imports_from_its_package():
    for package in (tfpar, tfpar.callbacks, tfpar.strategies):
        for name in package.__all__:
            assert getattr(package, name) is not None, f"{package.__name__}.{name}"
    assert tfpar.MirroredStrategy is tfpar.strategies.MirroredStrategy
    assert issubclass(tfpar.MirroredStrategy, tf.distribute.MirroredStrategy)
    assert issubclass(
        tfpar.ParameterServerStrategy, tf.distribute.ParameterServerStrategy
    )
    assert issubclass(tfpar.PipelineStrategy, tf.distribute.Strategy)


def test_a_broken_area_fails_its_strategy_alone_naming_the_versions():
    # A private internal an upgrade removed: the pipeline's _compat area
    # cannot be imported.
    proc = run_python(
        """
        import sys
        sys.modules["tfpar._compat.pipeline"] = None
        import tfpar
        tfpar.MirroredStrategy, tfpar.ParameterServerStrategy
        tfpar.callbacks.DeviceUtilization, tfpar.LocalCluster
        try:
            tfpar.PipelineStrategy
        except ImportError as error:
            print("ERROR", error)
        """,
        timeout=120,
    )
    message = proc.stdout.split("ERROR ", 1)[1]
    assert message.startswith("tfpar.PipelineStrategy cannot be loaded")
    assert f"TensorFlow {tf.__version__} and Keras {keras.__version__}" in message
    assert "tensorflow>=2.21,<2.22, keras>=3.15,<3.16" in message


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_imports(path: pathlib.Path, modules: set[str]) -> set[str]:
    """tfpar modules `path` imports when it runs (not under TYPE_CHECKING).

    `from package import module` is an edge to the module alone.
    """
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                name = f"{node.module}.{alias.name}"
                found.add(name if name in modules else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return found & modules


def test_no_import_cycle_inside_tfpar():
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {
        name: _runtime_imports(path, set(paths)) - {name}
        for name, path in paths.items()
    }
    assert sum(len(targets) for targets in graph.values()) > 50
    cycles = []
    state: dict[str, int] = {}

    def walk(node: str, stack: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycles.append([*stack[stack.index(target) :], target])
            elif target not in state:
                walk(target, [*stack, target])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            walk(name, [name])
    assert cycles == []


def test_supported_versions_are_declared_once_the_same_everywhere():
    pyproject = (ROOT / "pyproject.toml").read_text()
    for package, spec in SUPPORTED.items():
        assert f'"{package}{spec}"' in pyproject, package
    assert re.search(r'requires-python = ">=3.10"', pyproject)
    assert 'python_version = "3.10"' in pyproject
    assert "Python 3.10+" in (ROOT / "README.md").read_text()
    assert "Python 3.10+" in (ROOT / "Makefile").read_text()
