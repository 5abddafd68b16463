"""The import rules of docs/ARCHITECTURE.md, read from the source: data flows one way."""

import ast

import pytest
from helpers import REPO


def imported_modules(path) -> set[str]:
    """Absolute names of the sadm modules a file imports (relative imports resolved against its package)."""
    package = path.relative_to(REPO).with_suffix("").parts[:-1]  # e.g. ("sadm", "models")
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else ()
            module = ".".join((*base, node.module) if node.module else base)
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return {name for name in names if name == "sadm" or name.startswith("sadm.")}


def forbidden(names: set[str], prefixes: tuple[str, ...]) -> list[str]:
    return sorted(name for name in names if any(name == p or name.startswith(p + ".") for p in prefixes))


# the training layer: what composes a step and the plumbing around it
TRAINING = (
    "sadm.accelerate_setup",
    "sadm.checkpointing",
    "sadm.export",
    "sadm.frame",
    "sadm.objective",
    "sadm.randomness",
    "sadm.step",
    "sadm.terms",
)


@pytest.mark.parametrize("path", sorted((REPO / "sadm" / "models").glob("*.py")), ids=lambda p: p.name)
def test_models_never_import_training_data_losses_or_evaluation(path):
    prefixes = (*TRAINING, "sadm.data", "sadm.losses", "sadm.metrics", "sadm.evaluation", "sadm.cli")
    assert forbidden(imported_modules(path), prefixes) == []


def test_the_training_sadm_py_is_gone():
    assert not (REPO / "sadm" / "training.py").exists()  # split by layer (docs/ARCHITECTURE.md): no re-export shim


def test_metrics_is_maths_only():
    assert imported_modules(REPO / "sadm" / "metrics.py") == set()


@pytest.mark.parametrize("path", sorted((REPO / "pipelines").glob("*.py")), ids=lambda p: p.name)
def test_pipelines_import_no_sadm_module(path):
    assert imported_modules(path) == set()  # each file also works as a single-file custom pipeline


@pytest.mark.parametrize(
    "path",
    [
        *(REPO / "sadm" / f"{name}.py" for name in ("data", "checkpointing", "export", "randomness", "frame", "step")),
        *sorted((REPO / "sadm" / "evaluation").glob("*.py")),
    ],
    ids=lambda p: p.name,
)
def test_the_library_never_parses_flags(path):
    assert "argparse" not in {
        alias.name
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    assert forbidden(imported_modules(path), ("sadm.cli",)) == []


@pytest.mark.parametrize(
    "path", [REPO / "sadm" / "data.py", *sorted((REPO / "sadm" / "evaluation").glob("*.py"))], ids=lambda p: p.name
)
def test_data_and_evaluation_never_import_training(path):
    assert forbidden(imported_modules(path), TRAINING) == []
