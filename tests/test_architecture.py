"""The shape of the house: no import circle, imports only downward, no private name borrowed from
another module, and every room (module) and every function in it either small or saying why it is not.

Every `import` / `from ... import` of the package counts, at module level and inside functions
(a lazy import is still a dependency). kernels/ is the package fastsae.kernels.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The layers, lowest first: a module may import from its own layer and the ones below it.
LAYERS = [
    ("fastsae._files", "fastsae._dtypes", "fastsae._version", "fastsae._openmp", "fastsae._kernels_package",
     "fastsae._hub", "fastsae.runs", "fastsae.distributed"),
    ("fastsae.kernels",),
    ("fastsae.ops",),
    ("fastsae.activations",),
    ("fastsae.spec", "fastsae.init", "fastsae.sae_config"),
    ("fastsae.formats",),
    ("fastsae.sae", "fastsae.saebench"),
    ("fastsae.sharded",),
    ("fastsae.model",),
    ("fastsae.train",),
    ("fastsae.plot", "fastsae.analysis", "fastsae.dashboard"),
    ("fastsae.cli", "fastsae.__main__", "fastsae"),
]
ROOM_LINES = 400  # a module longer than this says why in its docstring ("longer than")
FUNCTION_LINES = 80  # a function longer than this says why in its docstring ("Long because ..."); not a Triton kernel


def _modules() -> dict[str, Path]:
    found = {}
    for base, package in ((ROOT / "fastsae", "fastsae"), (ROOT / "kernels", "fastsae.kernels")):
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, str | None]]:
    """(module imported, name taken from it or None) for every import of a fastsae module."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, None) for alias in node.names if alias.name.startswith("fastsae")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            if not source.startswith("fastsae"):
                continue
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                out.append((submodule, None) if submodule in MODULES else (source, alias.name))
    return out


def _layer(module: str) -> int:
    best = None
    for rank, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (rank, len(prefix))
    assert best is not None, f"{module} is in no layer of tests/test_architecture.py"
    return best[0]


def _graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        graph[name] = {target for target, _ in _imports(name, path) if target in MODULES and target != name}
    return graph


def test_no_import_circle():
    graph = _graph()
    # Tarjan's strongly connected components: a component of more than one module is a circle
    index, low, on_stack, stack, circles, counter = {}, {}, set(), [], [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    assert not circles, f"import circles: {circles}"


def test_imports_go_downward_and_borrow_no_private_name():
    problems = []
    for name, path in sorted(MODULES.items()):
        for target, imported in _imports(name, path):
            if target not in MODULES and target.rsplit(".", 1)[0] not in MODULES:
                continue
            if target != name and _layer(target) > _layer(name) and not name.startswith(target + "."):
                problems.append(f"{name} imports upward from {target}")
            if imported and imported.startswith("_") and not imported.startswith("__") and target != name:
                problems.append(f"{name} borrows the private name {imported} from {target}")
    assert not problems, "\n".join(problems)


KERNEL_OPS = sorted(name.rsplit(".", 1)[1] for name in MODULES
                    if name.startswith("fastsae.kernels.") and not name.rsplit(".", 1)[1].startswith("_"))


def test_ops_import_their_kernels_by_name():
    """Each op's kernel file (kernels/<op>.py) is imported by name by its op (fastsae/ops/<op>.py):
    the graph shows the ops -> kernels arrows, no string resolved at run time hides them."""
    graph = _graph()
    assert KERNEL_OPS, "no kernel file found"
    missing = [op for op in KERNEL_OPS if f"fastsae.kernels.{op}" not in graph.get(f"fastsae.ops.{op}", ())]
    assert not missing, f"ops that do not import their kernel file: {missing}"
    unused = [name for name in MODULES if name.startswith("fastsae.kernels.")
              and not any(name in targets for source, targets in graph.items() if source != name)]
    assert not unused, f"kernel files nothing imports: {unused}"


def test_no_kernel_file_imports_another_ops():
    """A kernel file is one op (forward, backward, launchers); what ops share lives in the shared
    kernel modules (kernels/_tiles.py, kernels/_sparse_code.py, ...), which import no op's file."""
    problems = []
    for name, targets in sorted(_graph().items()):
        if not name.startswith("fastsae.kernels."):
            continue
        for target in sorted(targets):
            if target.startswith("fastsae.kernels.") and not target.rsplit(".", 1)[1].startswith("_"):
                problems.append(f"{name} imports the op file {target}")
    assert not problems, "\n".join(problems)


def test_every_room_is_small_or_says_why():
    long = []
    for name, path in sorted(MODULES.items()):
        lines = path.read_text().count("\n")
        docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
        if lines > ROOM_LINES and "longer than" not in docstring:
            long.append(f"{name}: {lines} lines")
    assert not long, "modules over ~400 lines whose docstring does not say why:\n" + "\n".join(long)


def _is_triton_kernel(node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """Decorated with @triton.jit (or @triton.jit(...))."""
    for decorator in node.decorator_list:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        if ast.unparse(target) in ("triton.jit", "jit"):
            return True
    return False


def test_every_function_is_short_or_says_why():
    """A function a reader cannot hold at once is split into named steps, or its docstring has a
    line starting "Long because" that says why it is one piece. kernels/ is held to this too, except
    its @triton.jit functions: a Triton kernel is one compiled unit, whose length the compile facts
    judge (registers, spills, shared memory: tests/compile_check.py), not this count; splitting
    one would also change its source and so every compile case key of it."""
    long = []
    for path in sorted(MODULES.values()):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if _is_triton_kernel(node):
                continue
            lines = node.end_lineno - node.lineno + 1
            docstring = ast.get_docstring(node) or ""
            if lines > FUNCTION_LINES and not any(line.strip().startswith("Long because")
                                                  for line in docstring.splitlines()):
                long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {lines} lines")
    assert not long, (f"functions over {FUNCTION_LINES} lines whose docstring has no line starting "
                      "'Long because':\n" + "\n".join(long))


@pytest.mark.parametrize("module", ["fastsae", "fastsae.sae", "fastsae.train", "fastsae.cli"])
def test_every_module_imports_on_its_own(module):
    """A fresh interpreter imports it (an import circle often shows only from one entry point)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
