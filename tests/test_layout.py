"""The package's layout: one backend seam, imports that point one way, no cycles.

- Outside ``keras_parallel/_backend/`` (the package and ``keras_parallel_cli.py``),
  no module imports a backend's modules or compares the backend with a backend's
  name: they ask ``keras_parallel._backend`` (one exception, named below).

- Public modules -> ``keras_parallel._backend`` (the dispatcher) -> ``_backend/common``:
  a module under ``_backend/`` never imports a public keras_parallel module, and
  ``_backend/common`` imports no backend folder and no framework.
- With ``KERAS_BACKEND=jax`` or ``torch``, keras_parallel imports without TensorFlow
  (checked in that backend's own flavour of tests/run_flavours.py, where it is installed).
- The modules' imports form no cycle, top-level imports alone nor with the imports
  made inside functions.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from keras_parallel._compat import backend_name

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "keras_parallel"
BACKEND = PACKAGE / "_backend"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
MODULES["keras_parallel_cli"] = ROOT / "keras_parallel_cli.py"  # the command line, on top


def _is_package(name: str) -> bool:
    return MODULES.get(name, Path()).name == "__init__.py"


def _is_main_block(node) -> bool:
    """`if __name__ == "__main__":`."""
    return (
        isinstance(node, ast.If)
        and isinstance(node.test, ast.Compare)
        and isinstance(node.test.left, ast.Name)
        and node.test.left.id == "__name__"
    )


def _imports(path: Path, top_level_only: bool) -> list[tuple[int, str]]:
    """(line, module) of every import in `path`: the modules named, absolute.

    ``from a.b import c`` names ``a.b.c`` when that is a keras_parallel module,
    else ``a.b``. Top level means outside functions (an import inside ``if`` or
    ``try`` at module level runs at import time, so it counts).
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    name = _module_name(path)
    package = name if _is_package(name) else name.rpartition(".")[0]
    found = []

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if top_level_only and isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            if _is_main_block(child):
                continue  # run as a script, not imported: not part of the import graph
            if isinstance(child, ast.Import):
                found.extend((child.lineno, alias.name) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - child.level + 1]
                    module = ".".join(base + ([child.module] if child.module else []))
                else:
                    module = child.module
                for alias in child.names:
                    candidate = f"{module}.{alias.name}"
                    found.append((child.lineno, candidate if candidate in MODULES else module))
            visit(child)

    visit(tree)
    return found


def _is_public(module: str) -> bool:
    """keras_parallel modules whose path has no private (``_``) part: the public ones."""
    parts = module.split(".")
    return parts[0] == "keras_parallel" and not any(p.startswith("_") for p in parts[1:])


BACKEND_FILES = sorted(BACKEND.rglob("*.py"))


def test_backend_folders_have_the_same_modules():
    names = {"devices.py", "memory.py", "probes.py", "accumulation.py"}
    for backend in ("common", "tensorflow", "jax", "torch"):
        present = {p.name for p in (BACKEND / backend).glob("*.py")}
        assert names <= present, (backend, sorted(names - present))


@pytest.mark.parametrize("path", BACKEND_FILES, ids=lambda p: str(p.relative_to(BACKEND)))
def test_backend_modules_import_no_public_module(path):
    bad = [
        f"line {line}: {module}"
        for line, module in _imports(path, top_level_only=False)
        if _is_public(module)
    ]
    assert not bad, f"{path.relative_to(ROOT)} imports public modules: {bad}"


@pytest.mark.parametrize("path", sorted((BACKEND / "common").rglob("*.py")), ids=lambda p: p.name)
def test_common_imports_no_backend_and_no_framework_at_import(path):
    own = ("keras_parallel._backend.tensorflow", "keras_parallel._backend.jax")
    own += ("keras_parallel._backend.torch",)
    heavy = ("tensorflow", "tf_keras", "jax", "torch", "pynvml", "psutil")
    bad = [
        f"line {line}: {module}"
        for line, module in _imports(path, top_level_only=False)
        if module.startswith(own)
    ]
    bad += [
        f"line {line}: {module}"
        for line, module in _imports(path, top_level_only=True)
        if module.split(".")[0] in heavy
    ]
    assert not bad, f"{path.relative_to(ROOT)}: {bad}"


# -- one seam: backend decisions live under _backend/ ------------------------------

BACKEND_NAMES = {"tensorflow", "jax", "torch"}
#: Every module outside the seam: the package's own and the command line.
OUTSIDE_SEAM = [p for p in sorted(PACKAGE.rglob("*.py")) if BACKEND not in p.parents] + [
    ROOT / "keras_parallel_cli.py"
]
#: The one module allowed to name a backend, and why: `keras_parallel.multi_worker`
#: is TensorFlow's MultiWorkerMirroredStrategy by definition; its checks refuse
#: other backends (and Keras 3, which cannot fit there) before anything runs.
NAMES_A_BACKEND = {"keras_parallel/multi_worker.py"}


def _names_backend(node) -> bool:
    """`backend_name()`, `BACKEND` or `_backend.BACKEND`: the expression that names one."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name | ast.Attribute):
        func = node.func
        return (func.id if isinstance(func, ast.Name) else func.attr) == "backend_name"
    if isinstance(node, ast.Name):
        return node.id == "BACKEND"
    return isinstance(node, ast.Attribute) and node.attr == "BACKEND"


def _backend_checks(path: Path) -> list[str]:
    """Lines of `path` that compare the backend with a backend's name."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if not isinstance(node, ast.Compare):
            continue
        sides = [node.left, *node.comparators]
        named = any(_names_backend(side) for side in sides)
        literal = [
            side.value
            for side in ast.walk(node)
            if isinstance(side, ast.Constant) and isinstance(side.value, str)
        ]
        if named and BACKEND_NAMES & set(literal):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


@pytest.mark.parametrize("path", OUTSIDE_SEAM, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_backend_decision_outside_the_seam(path):
    """No module outside _backend/ imports a backend's modules or tests a backend's name."""
    relative = str(path.relative_to(ROOT))
    imports = [
        f"line {line}: {module}"
        for line, module in _imports(path, top_level_only=False)
        if module.startswith(tuple(f"keras_parallel._backend.{b}" for b in BACKEND_NAMES))
    ]
    checks = [] if relative in NAMES_A_BACKEND else _backend_checks(path)
    assert not imports and not checks, (
        f"{relative} decides by backend outside keras_parallel/_backend/ (ask the "
        f"backend's modules through keras_parallel._backend instead): {imports + checks}"
    )


def test_the_seam_check_finds_a_backend_check(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "from keras_parallel._compat import backend_name\n"
        "if backend_name() == 'jax':\n    pass\n"
        "if _backend.BACKEND in ('torch', 'x'):\n    pass\n"
        "if other == 'jax':\n    pass\n"
    )
    assert [c.split(":")[0] for c in _backend_checks(sample)] == ["line 2", "line 4"]


def test_every_backend_has_every_seam_module():
    """The dispatcher gives every backend the same modules (a backend's own, or common's)."""
    from keras_parallel import _backend

    for name in ("devices", "memory", "probes", "accumulation", "replicas"):
        assert getattr(_backend, name) is not None, name
    for name in ("cpu_devices", "stand_in_cpus", "CAN_SPLIT_CPU"):
        assert hasattr(_backend.devices, name), name
    assert hasattr(_backend.memory, "CPU_FIGURES")
    for name in ("call", "compile_jit", "check_fit_supported", "MASKS_READABLE", "SUPPORTS_JIT"):
        assert hasattr(_backend.replicas, name), name


def _cycle(top_level_only: bool) -> list[str] | None:
    graph = {
        name: sorted({m for _, m in _imports(path, top_level_only) if m in MODULES and m != name})
        for name, path in MODULES.items()
    }
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in graph:
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


@pytest.mark.parametrize("top_level_only", [True, False], ids=["top level", "with lazy"])
def test_no_import_cycle(top_level_only):
    cycle = _cycle(top_level_only)
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_check_finds_a_cycle(tmp_path, monkeypatch):
    # The check itself: two modules that import each other are a cycle.
    package = tmp_path / "keras_parallel"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from keras_parallel import b\n")
    (package / "b.py").write_text("def f():\n    from keras_parallel.a import x\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    modules = {_module_name(p): p for p in package.glob("*.py")}
    monkeypatch.setattr(sys.modules[__name__], "MODULES", modules)
    assert _cycle(top_level_only=True) is None  # the lazy import hides it ...
    assert _cycle(top_level_only=False) in (  # ... from the top-level check only
        ["keras_parallel.a", "keras_parallel.b", "keras_parallel.a"],
        ["keras_parallel.b", "keras_parallel.a", "keras_parallel.b"],
    )


_WITHOUT_TENSORFLOW = """
import sys

# As if TensorFlow and tf-keras were not installed: `import tensorflow` raises
# ImportError, and `importlib.util.find_spec("tensorflow")` is None.
sys.modules["tensorflow"] = None
sys.modules["tf_keras"] = None
sys.path.insert(0, sys.argv[1])
import keras_parallel
import keras_parallel.callbacks
import keras_parallel.memory
import keras_parallel.plan
import keras_parallel.probes
from keras_parallel import _backend

print("BACKEND", _backend.BACKEND, _backend.devices.__name__)
frameworks = ("tensorflow", "tf_keras")
loaded = [m for m, v in sys.modules.items() if v is not None and m.split(".")[0] in frameworks]
print("LOADED", sorted(loaded))
"""


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_keras_parallel_imports_without_tensorflow_on_other_backends(backend):
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed")
    if backend_name() != backend:
        # The subprocess is the same whatever the flavour that starts it: run it once.
        label = {"jax": "JAX", "torch": "torch"}[backend]
        pytest.skip(f"the Keras 3 ({label}) flavour of tests/run_flavours.py runs this check")
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    env["KERAS_BACKEND"] = backend
    done = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TENSORFLOW, str(ROOT)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines() if " " in line)
    assert lines["BACKEND"] == f"{backend} keras_parallel._backend.{backend}.devices"
    assert lines["LOADED"] == "[]"
