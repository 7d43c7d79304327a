"""The import rules of STYLE.md: a pure core, adapters as the only drivers'
importers, and imports flowing one way (core, interfaces, adapters, runtime)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "hub"
CORE = {"errors", "hlc", "merge", "protocol", "config", "types", "ratelimit"}
# Third-party drivers and who alone may import them.
DRIVERS = {
    "asyncpg": {"store_postgres"},
    "redis": {"broker_redis", "presence_redis"},
    "websockets": {"client", "server"},
}
NOT_IN_CORE = {"asyncio", "asyncpg", "redis", "starlette", "uvicorn", "jwt", "socket"}


def imports(module: str) -> set[str]:
    """Top-level names a hub module imports (``hub.x`` as ``x``)."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # from .x import y / from . import x
                if node.module:
                    found.add(node.module.split(".")[0])
                else:
                    found |= {alias.name for alias in node.names}
            elif node.module:
                found.add(node.module.split(".")[0])
    return found


MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("module", sorted(CORE))
def test_the_core_is_pure(module: str) -> None:
    used = imports(module)
    assert not used & NOT_IN_CORE, f"hub/{module}.py imports {sorted(used & NOT_IN_CORE)}"
    local = used & set(MODULES)
    assert local <= CORE, f"hub/{module}.py imports runtime modules {sorted(local - CORE)}"


@pytest.mark.parametrize("driver", sorted(DRIVERS))
def test_only_adapters_import_drivers(driver: str) -> None:
    importers = {m for m in MODULES if driver in imports(m)}
    assert importers <= DRIVERS[driver], f"{driver} imported by {sorted(importers)}"
