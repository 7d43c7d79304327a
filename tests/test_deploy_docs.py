"""The deployment files agree with the settings object, so they cannot drift.

docs/DEPLOY.md's reference table lists exactly the variables of
``hub.config.known_variables()`` with their real defaults; compose.yaml has
the services it promises and sets only variables the hub reads, with values
the hub accepts. Pure: files only, no servers.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest

from hub.config import Settings, known_variables, load

ROOT = Path(__file__).resolve().parent.parent
DEPLOY_MD = ROOT / "docs" / "DEPLOY.md"
COMPOSE = ROOT / "compose.yaml"
DEPLOYMENT_FILES = [DEPLOY_MD, COMPOSE, ROOT / "Dockerfile", *sorted((ROOT / "deploy").iterdir())]
HUB_NAME = re.compile(r"\bHUB_[A-Z0-9_]+\b")
REFERENCE_HEADING = "## Settings reference"


def reference_rows() -> list[list[str]]:
    """The data rows of DEPLOY.md's settings table, as lists of cells."""
    text = DEPLOY_MD.read_text()
    assert REFERENCE_HEADING in text, f"docs/DEPLOY.md has no {REFERENCE_HEADING!r} section"
    section = text.split(REFERENCE_HEADING, 1)[1].split("\n## ", 1)[0]
    table = [line.strip() for line in section.splitlines() if line.strip().startswith("|")]
    assert len(table) > 2, "the settings reference has no table"
    header, separator, *rows = table
    assert "Variable" in header and "Default" in header
    assert set(separator.replace("|", "").split()) == {"---"}
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]


def row_variable(cells: list[str]) -> str:
    found = HUB_NAME.fullmatch(cells[0].strip("`"))
    assert found, f"a reference row does not start with a HUB_ variable: {cells[0]!r}"
    return found.group(0)


def test_reference_table_lists_every_setting_once() -> None:
    documented = [row_variable(cells) for cells in reference_rows()]
    duplicates = sorted({name for name in documented if documented.count(name) > 1})
    assert not duplicates, f"listed twice in docs/DEPLOY.md: {duplicates}"
    missing = sorted(set(known_variables()) - set(documented))
    unknown = sorted(set(documented) - set(known_variables()))
    assert not missing, f"settings missing from docs/DEPLOY.md's table: {missing}"
    assert not unknown, f"docs/DEPLOY.md's table names variables the hub does not read: {unknown}"


def test_reference_table_defaults_are_the_real_ones() -> None:
    defaults = {f.name: f.default for f in dataclasses.fields(Settings)}
    for cells in reference_rows():
        variable = row_variable(cells)
        attr = variable.removeprefix("HUB_").lower()
        cell = cells[1]
        if cell == "unset":
            assert defaults[attr] is None, (
                f"{variable}: documented unset, default {defaults[attr]!r}"
            )
            continue
        value = re.fullmatch(r"`([^`]+)`", cell)
        assert value, f"{variable}: default cell should be `value` or unset, not {cell!r}"
        parsed = getattr(load({variable: value.group(1)}), attr)
        assert parsed == defaults[attr], (
            f"{variable}: documented default {cell} means {parsed!r}, "
            f"the settings' default is {defaults[attr]!r}"
        )


@pytest.mark.parametrize("path", DEPLOYMENT_FILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_deployment_files_name_only_known_variables(path: Path) -> None:
    named = set(HUB_NAME.findall(path.read_text()))
    unknown = sorted(named - set(known_variables()))
    assert not unknown, f"{path.relative_to(ROOT)} names variables the hub does not read: {unknown}"


# -- compose.yaml ---------------------------------------------------------------


def compose() -> dict[str, Any]:
    yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read compose.yaml")
    doc = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(doc, dict) and isinstance(doc.get("services"), dict)
    return doc


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # the KEY=value list form
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def interpolate(value: str) -> str:
    """Compose's ``${VAR:-default}`` with nothing set: the default; ``$$`` is ``$``."""
    value = re.sub(r"\$\{[A-Za-z0-9_]+(?::?[-?]([^}]*))?\}", lambda m: m.group(1) or "", value)
    return value.replace("$$", "$")


def seconds(duration: str) -> float:
    """A compose duration such as ``30s`` or ``1m30s``."""
    units = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    parts = re.findall(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"bad duration {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


def hub_services(services: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in services.items() if "build" in s}


def test_compose_has_database_redis_two_hubs_and_a_balancer() -> None:
    services = compose()["services"]
    assert services["postgres"]["image"].startswith("postgres:16")
    assert "healthcheck" in services["postgres"]
    assert any(
        v.split(":")[0] in compose().get("volumes", {}) for v in services["postgres"]["volumes"]
    )
    assert services["redis"]["image"].startswith("redis:7")
    hubs = hub_services(services)
    assert len(hubs) == 2, f"want two hub replicas built from the Dockerfile, got {sorted(hubs)}"
    balancers = [
        name
        for name, s in services.items()
        if name not in hubs and any(str(p).split(":")[0] == "8080" for p in s.get("ports", []))
    ]
    assert len(balancers) == 1, f"want one load balancer published on 8080, got {balancers}"
    lb = services[balancers[0]]
    assert set(hubs) <= set(lb.get("depends_on", []))
    for mount in lb.get("volumes", []):
        source = str(mount).split(":")[0]
        if source.startswith("./"):
            assert (ROOT / source).is_file(), f"the balancer mounts {source}, which is missing"


def test_compose_hubs_are_configured_with_known_valid_settings() -> None:
    services = compose()["services"]
    for name, hub in hub_services(services).items():
        env = environment(hub)
        for required in ("HUB_DATABASE_URL", "HUB_REDIS_URL", "HUB_JWT_SECRET"):
            assert env.get(required), f"{name} does not set {required}"
        assert "HUB_ALLOWED_ORIGINS" in env
        assert "/health" in str(hub["healthcheck"]["test"])
        settings = load({k: interpolate(v) for k, v in env.items()})  # ConfigError if invalid
        assert settings.redis_url and settings.database_url
        grace = seconds(str(hub["stop_grace_period"]))
        assert grace > settings.shutdown_timeout_s, (
            f"{name}: stop_grace_period {grace}s must exceed HUB_SHUTDOWN_TIMEOUT_S"
        )
    for name, service in services.items():
        unknown = sorted(set(environment(service)) - set(known_variables()))
        unknown = [k for k in unknown if k.startswith("HUB_")]
        assert not unknown, f"{name} sets variables the hub does not read: {unknown}"
