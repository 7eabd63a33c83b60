"""The package's floors (README, Layout): a module imports only from modules on lower floors, never
inside a function (optional packages aside), and export/ uses only lora_fx's public names.
Read from the source with ast: nothing is imported to check it."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# the README's Layout section, as data: module -> floor
FLOORS = {
    "lora_fx": {
        "errors": 0, "paths": 0, "report": 0, "diff": 0, "quantized": 0,
        "state": 1, "modes": 1, "generation": 1, "flat": 1, "ranks": 1, "peft_rules": 1, "recompute": 1,
        "graph_module": 2, "loftq": 2, "inits": 2,
        "capture": 3, "match": 3, "slot": 3,
        "rewrite": 4,
        "attach": 5,
        "regions": 6, "mixed": 6, "saved": 6, "hierarchy": 6,
        "inject": 7, "adapters": 7, "fold": 7, "checkpoints": 7,
        "adapter_io": 8, "combine": 8,
        "analysis": 9,
        "__init__": 10,
    },
    "export": {
        "onnx_diff": 0, "runtime": 0, "kv_cache": 0,
        "onnx_export": 1, "generation": 1,
        "serving": 2, "render": 2, "onnx_quantize": 2,
        "cli": 3, "gpu_check": 3,
        "__init__": 4,
    },
}
OPTIONAL = {"safetensors", "transformers", "matplotlib", "torchao", "peft"}  # may be imported where used: not every install has them


def _imports(package: str, path: Path):
    """(imported module of `package` or of another package, names, line, inside a function?) for
    each import in the file."""
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}

    def in_function(node):
        while node in parents:
            node = parents[node]
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                return True
        return False

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: within the package
                base = node.module or ""
                for alias in node.names:
                    target = base or alias.name
                    yield f"{package}.{target}", [alias.name], node.lineno, in_function(node)
            else:
                yield node.module, [a.name for a in node.names], node.lineno, in_function(node)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [], node.lineno, in_function(node)


def _cases():
    for package, floors in FLOORS.items():
        for path in sorted((ROOT / package).glob("*.py")):
            yield pytest.param(package, path, id=f"{package}/{path.name}")


def test_every_module_has_a_floor():
    for package, floors in FLOORS.items():
        assert {p.stem for p in (ROOT / package).glob("*.py")} == set(floors), package


@pytest.mark.parametrize("package, path", _cases())
def test_imports_point_down(package, path):
    floors = FLOORS[package]
    me = path.stem
    public = set(ast.literal_eval(next(
        n.value for n in ast.parse((ROOT / "lora_fx" / "__init__.py").read_text()).body
        if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "__all__")))
    for module, names, line, local in _imports(package, path):
        top = module.split(".")[0]
        where = f"{path.relative_to(ROOT)}:{line}"
        if local:
            assert top in OPTIONAL, f"{where} imports {module} inside a function"
        if top == package and module != package:
            target = module.split(".")[1]
            assert floors[target] < floors[me], f"{where}: {me} (floor {floors[me]}) imports {target} (floor {floors[target]})"
        if package == "export" and top == "lora_fx":
            assert module == "lora_fx", f"{where} imports {module}: export/ uses lora_fx's public names only"
            assert set(names) <= public, f"{where} imports {set(names) - public}, not in lora_fx.__all__"
        if package == "lora_fx":
            assert top != "export", f"{where}: lora_fx must not depend on export/"


def test_export_uses_only_public_attributes_of_lora_fx():
    """`lora_fx.<name>` in export/ names something lora_fx exports."""
    public = set(ast.literal_eval(next(
        n.value for n in ast.parse((ROOT / "lora_fx" / "__init__.py").read_text()).body
        if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "__all__")))
    for path in (ROOT / "export").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "lora_fx":
                assert node.attr in public, f"{path.name}:{node.lineno} uses lora_fx.{node.attr}"
