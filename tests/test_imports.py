"""The import graph: the production packages never reach into the sidecar's package or the dev tooling."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package -> top-level packages it must never import (at module level or inside a function)
FORBIDDEN = {
    "service": ("webhook", "authsvc", "tests", "bench"),
    "webhook": ("authsvc", "tests", "bench"),
    "authsvc": ("tests", "bench"),
    # The client package installs alone (grpcio + protobuf): it reaches into none of the server.
    "authsvc_client": ("service", "webhook", "authsvc", "tests", "bench"),
}
SOURCE = {"authsvc_client": ROOT / "clients/python/authsvc_client"}


def source(package: str) -> Path:
    return SOURCE.get(package, ROOT / package)


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, wherever the import statement sits."""
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module)
    return modules


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_never_imports_what_it_must_not(package: str) -> None:
    files = sorted(source(package).rglob("*.py"))
    assert files
    found = {
        f"{path.relative_to(ROOT)} imports {module}"
        for path in files
        for module in imported_modules(path)
        if module.split(".")[0] in FORBIDDEN[package]
    }
    assert not found, sorted(found)


def test_relative_imports_are_not_used() -> None:
    # The walk above reads absolute imports only; keep it that way.
    for package in FORBIDDEN:
        for path in source(package).rglob("*.py"):
            tree = ast.parse(path.read_text())
            assert not [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level], path


def test_the_walk_sees_imports_inside_functions(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from webhook.main import run_webhook\n    import authsvc.dev.run\n")
    assert imported_modules(module) == {"webhook.main", "authsvc.dev.run"}


@pytest.mark.parametrize(
    ("modules", "absent"),
    [
        ("service.app, service.command", ("webhook", "authsvc")),
        ("webhook.main, webhook.command", ("authsvc",)),
    ],
)
def test_loading_a_process_loads_nothing_it_must_not(modules: str, absent: tuple[str, ...]) -> None:
    script = f"import sys, {modules}; print(sorted(m for m in sys.modules if m.split('.')[0] in {absent!r}))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip() == "[]"
