"""Import direction and package hygiene, read from the source (AST), so nothing has to be importable.

orchestration -> pipeline -> {model, tokenization}; model imports torch + stdlib (+ safetensors);
tokenization no torch/ray/mlflow; pipeline no ray/mlflow at module level; cuda/ holds no Python.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("model", "pipeline", "tokenization", "orchestration")


@dataclass(frozen=True)
class Import:
    file: str
    line: int
    top: str  # first component of the imported module, e.g. "torch" for torch.nn
    in_function: bool  # inside a def: runs only when called (a lazy import)


def imports_of(path: Path) -> list[Import]:
    found: list[Import] = []
    where = str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            names = []
            if isinstance(child, ast.Import):
                names = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                names = [child.module]
            found.extend(Import(where, child.lineno, name.split(".")[0], in_function) for name in names)
            visit(child, nested)

    visit(ast.parse(path.read_text(), filename=str(path)), in_function=False)
    return found


def package_imports(package: str) -> list[Import]:
    files = sorted((REPO / package).rglob("*.py"))
    assert files, f"no Python files under {package}/"
    return [imp for path in files for imp in imports_of(path)]


def offending(imports: list[Import], forbidden: set[str], module_level_only: bool = False) -> list[str]:
    return [
        f"{imp.file}:{imp.line} imports {imp.top}"
        for imp in imports
        if imp.top in forbidden and not (module_level_only and imp.in_function)
    ]


@pytest.mark.parametrize("package", ["model", "tokenization"])
def test_lower_packages_import_nothing_from_pipeline_or_orchestration(package):
    assert offending(package_imports(package), {"pipeline", "orchestration"}) == []


def test_model_imports_only_torch_stdlib_and_safetensors():
    imports = package_imports("model")
    assert offending(imports, {"deepspeed", "ray", "mlflow"}) == []
    # triton: torch's own kernel language (its CUDA builds ship it), for the optional fused kernels of
    # model/ln_shift_mix.py, imported on first use only.
    allowed = set(sys.stdlib_module_names) | {"torch", "safetensors", "model", "triton"}
    assert [f"{i.file}:{i.line} imports {i.top}" for i in imports if i.top not in allowed] == []


def test_tokenization_imports_no_torch_ray_or_mlflow():
    assert offending(package_imports("tokenization"), {"torch", "ray", "mlflow"}) == []


def test_pipeline_imports_no_ray_or_mlflow_at_module_level_and_nothing_from_orchestration():
    imports = package_imports("pipeline")
    assert offending(imports, {"ray", "mlflow"}, module_level_only=True) == []
    assert offending(imports, {"orchestration"}) == []


def test_the_checker_tells_module_level_from_lazy_imports(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import ray.train\ntry:\n    from mlflow import log\nexcept ImportError:\n    pass\n"
        "def f():\n    import mlflow\nclass K:\n    import deepspeed\n"
    )
    found = {(i.top, i.in_function) for i in imports_of(sample)}
    assert found == {("ray", False), ("mlflow", False), ("mlflow", True), ("deepspeed", False)}
    assert offending(imports_of(sample), {"mlflow"}, module_level_only=True) == [f"{sample}:3 imports mlflow"]


def test_cuda_folder_holds_no_python():
    # a cuda/__init__.py would shadow NVIDIA's `cuda` namespace package (reference/style.md §4)
    assert not (REPO / "cuda" / "__init__.py").exists()
    assert list((REPO / "cuda").glob("*.py")) == []


@pytest.mark.parametrize("package", PACKAGES)
def test_generic_package_names_resolve_inside_this_repository(package):
    spec = importlib.util.find_spec(package)
    assert spec is not None and spec.origin is not None, f"{package} is not importable"
    assert Path(spec.origin).resolve() == REPO / package / "__init__.py"
