"""Settings from ``HUB_*`` variables and ``hub serve`` flags.

Pure: the environment is a dict, flags come from a parser built here.
"""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from hub.config import ConfigError, Settings, add_arguments, load
from hub.errors import PayloadTooLarge
from hub.protocol import Limits, parse_changes


def flags(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_defaults() -> None:
    s = load({})
    assert s == Settings()
    assert (s.database_url, s.redis_url, s.jwt_secret, s.jwks_url) == (None, None, None, None)
    assert s.allowed_origins == ("http://127.0.0.1:8080", "http://localhost:8080")
    assert (s.host, s.port, s.workers) == ("127.0.0.1", 8080, 1)
    assert s.max_connections_per_user == 10
    assert s.max_changes_per_push == 1000
    assert s.max_value_bytes == 64 * 1024
    assert s.max_clock_drift_ms == 60_000
    assert s.max_event_bytes == 64 * 1024
    assert s.heartbeat_s == 30.0
    assert s.tombstone_retention == 30 * 86400.0
    assert (s.log_format, s.log_level) == ("json", "info")
    assert s.development_secret


def test_unrelated_and_empty_variables_leave_defaults() -> None:
    assert load({"PORT": "1", "HUB_PORT": "", "HUB_WORKERS": "", "hub_port": "2"}) == Settings()


@pytest.mark.parametrize(
    ("variable", "raw", "attr", "expected"),
    [
        ("HUB_DATABASE_URL", "postgresql://h/db", "database_url", "postgresql://h/db"),
        ("HUB_REDIS_URL", "redis://h:6379/0", "redis_url", "redis://h:6379/0"),
        ("HUB_JWT_SECRET", "s", "jwt_secret", "s"),
        ("HUB_JWKS_URL", "https://id.example/jwks", "jwks_url", "https://id.example/jwks"),
        ("HUB_JWT_AUDIENCE", "app", "jwt_audience", "app"),
        ("HUB_JWT_ISSUER", "https://id.example", "jwt_issuer", "https://id.example"),
        (
            "HUB_ALLOWED_ORIGINS",
            " https://a.example , ,https://b.example,",
            "allowed_origins",
            ("https://a.example", "https://b.example"),
        ),
        (
            "HUB_ALLOWED_ORIGINS",
            "https://only.example",
            "allowed_origins",
            ("https://only.example",),
        ),
        ("HUB_HOST", "0.0.0.0", "host", "0.0.0.0"),
        ("HUB_PORT", "9000", "port", 9000),
        ("HUB_PORT", "0", "port", 0),
        ("HUB_PORT", "65535", "port", 65535),
        ("HUB_WORKERS", "4", "workers", 4),
        ("HUB_DATA_DIR", "/var/lib/hub", "data_dir", "/var/lib/hub"),
        ("HUB_DB_POOL_SIZE", "20", "db_pool_size", 20),
        ("HUB_DB_TIMEOUT_S", "2.5", "db_timeout_s", 2.5),
        ("HUB_MAX_CONNECTIONS_PER_USER", "3", "max_connections_per_user", 3),
        ("HUB_MAX_CHANGES_PER_PUSH", "50", "max_changes_per_push", 50),
        ("HUB_MAX_VALUE_BYTES", "1024", "max_value_bytes", 1024),
        ("HUB_MAX_CLOCK_DRIFT_MS", "1000", "max_clock_drift_ms", 1000),
        ("HUB_MAX_EVENT_BYTES", "2048", "max_event_bytes", 2048),
        ("HUB_MAX_BATCH_PUSHES", "64", "max_batch_pushes", 64),
        ("HUB_HEARTBEAT_S", "15", "heartbeat_s", 15.0),
        ("HUB_HEARTBEAT_S", "90s", "heartbeat_s", 90.0),
        ("HUB_HEARTBEAT_S", "2m", "heartbeat_s", 120.0),
        ("HUB_HEARTBEAT_S", "0.5", "heartbeat_s", 0.5),
        ("HUB_SEND_QUEUE_SIZE", "32", "send_queue_size", 32),
        ("HUB_TOMBSTONE_RETENTION", "7d", "tombstone_retention", 7 * 86400.0),
        ("HUB_TOMBSTONE_RETENTION", "12h", "tombstone_retention", 12 * 3600.0),
        ("HUB_TOMBSTONE_RETENTION", "1.5D", "tombstone_retention", 1.5 * 86400.0),
        ("HUB_TOMBSTONE_RETENTION", "36500d", "tombstone_retention", 36500 * 86400.0),
        ("HUB_SHUTDOWN_TIMEOUT_S", "3", "shutdown_timeout_s", 3.0),
        ("HUB_LOG_FORMAT", "text", "log_format", "text"),
        ("HUB_LOG_LEVEL", "debug", "log_level", "debug"),
    ],
)
def test_each_variable_is_read_and_cast(variable: str, raw: str, attr: str, expected: Any) -> None:
    s = load({variable: raw})
    assert getattr(s, attr) == expected
    assert type(getattr(s, attr)) is type(expected)
    # Nothing else moved.
    others = {k: v for k, v in vars_of(s).items() if k != attr}
    assert others == {k: v for k, v in vars_of(Settings()).items() if k != attr}


def vars_of(s: Settings) -> dict[str, Any]:
    return {name: getattr(s, name) for name in Settings.__dataclass_fields__}


@pytest.mark.parametrize(
    ("variable", "raw"),
    [
        ("HUB_PORT", "http"),
        ("HUB_PORT", "65536"),
        ("HUB_PORT", "-1"),
        ("HUB_PORT", "80.5"),
        ("HUB_WORKERS", "0"),
        ("HUB_WORKERS", "two"),
        ("HUB_DB_POOL_SIZE", "1.5"),
        ("HUB_MAX_CHANGES_PER_PUSH", "0"),
        ("HUB_MAX_CLOCK_DRIFT_MS", "-5"),
        ("HUB_MAX_VALUE_BYTES", "64KiB"),
        ("HUB_SEND_QUEUE_SIZE", "none"),
        ("HUB_DB_TIMEOUT_S", "0"),
        ("HUB_HEARTBEAT_S", "-5"),
        ("HUB_HEARTBEAT_S", "soon"),
        ("HUB_HEARTBEAT_S", "m"),
        ("HUB_HEARTBEAT_S", "5w"),
        ("HUB_TOMBSTONE_RETENTION", "-1d"),
        ("HUB_TOMBSTONE_RETENTION", "99999999d"),
        ("HUB_TOMBSTONE_RETENTION", "36501d"),
        ("HUB_DB_TIMEOUT_S", "1e300"),
        ("HUB_SHUTDOWN_TIMEOUT_S", "0s"),
        ("HUB_LOG_FORMAT", "xml"),
        ("HUB_LOG_FORMAT", "JSON"),
        pytest.param(
            "HUB_HEARTBEAT_S",
            "nan",
        ),
        pytest.param(
            "HUB_LOG_LEVEL",
            "loud",
        ),
    ],
)
def test_bad_value_names_the_variable(variable: str, raw: str) -> None:
    with pytest.raises(ConfigError) as info:
        load({variable: raw})
    message = str(info.value)
    assert message.startswith(variable + "=")
    assert repr(raw) in message


@pytest.mark.parametrize(("raw", "unit"), [("bad", "d"), ("5w", "w"), ("soon", "")])
def test_a_bad_duration_is_quoted_whole(raw: str, unit: str) -> None:
    with pytest.raises(ConfigError) as info:
        load({"HUB_HEARTBEAT_S": raw})
    # Only the value as given: never a piece of it (as 'ba' of 'bad').
    assert str(info.value).count("'") == 2, str(info.value)
    assert "want seconds, or a number with a unit s, m, h or d" in str(info.value)


@pytest.mark.parametrize(
    "raw",
    [
        "*",
        "https://app.example.com/",
        "https://app.example.com/app",
        "https://app.example.com?x=1",
        "https://app.example.com#top",
        "https://*.example.com",
        "https://user@app.example.com",
        "https://App.example.com",
        "app.example.com",
        "ftp://app.example.com",
        "https://",
        "https://app.example.com:0",
        "https://app.example.com:99999",
        "https://a.example,*",
        # Never sent so by a browser: a default port, a padded one, a host
        # that is not in its ASCII form.
        "https://app.example.com:443",
        "http://app.example.com:80",
        "http://app.example.com:080",
        "http://bücher.example",
    ],
)
def test_allowed_origins_are_exact_origins(raw: str) -> None:
    # WebSocket upgrades compare the Origin header as a string, HTTP CORS
    # reads '*' as a wildcard: anything but scheme://host[:port] would make
    # them disagree, or never match.
    with pytest.raises(ConfigError) as info:
        load({"HUB_ALLOWED_ORIGINS": raw})
    assert str(info.value).startswith("HUB_ALLOWED_ORIGINS=")
    assert "scheme://host[:port]" in str(info.value)


def test_allowed_origins_take_ports_and_addresses() -> None:
    raw = "https://app.example.com:8443,http://127.0.0.1:3000,http://[::1]:8080,http://localhost"
    assert load({"HUB_ALLOWED_ORIGINS": raw}).allowed_origins == tuple(raw.split(","))


def test_first_bad_variable_stops_loading_even_with_good_ones_around() -> None:
    with pytest.raises(ConfigError, match="HUB_WORKERS"):
        load({"HUB_PORT": "9000", "HUB_WORKERS": "many", "HUB_LOG_FORMAT": "text"})


def test_flags_win_over_environment() -> None:
    env = {"HUB_PORT": "7000", "HUB_HEARTBEAT_S": "5", "HUB_WORKERS": "3"}
    s = load(env, flags("--port", "9000", "--heartbeat-s", "1m"))
    assert (s.port, s.heartbeat_s) == (9000, 60.0)
    # A variable without a flag still applies.
    assert s.workers == 3


def test_flags_without_environment_are_cast() -> None:
    s = load(
        {},
        flags(
            "--allowed-origins",
            "https://a.example,https://b.example",
            "--max-changes-per-push",
            "5",
        ),
    )
    assert s.allowed_origins == ("https://a.example", "https://b.example")
    assert s.max_changes_per_push == 5


def test_unset_flags_leave_the_environment() -> None:
    assert load({"HUB_PORT": "7000"}, flags()).port == 7000


def test_bad_flag_names_the_flag() -> None:
    with pytest.raises(ConfigError) as info:
        load({"HUB_PORT": "7000"}, flags("--port", "x"))
    assert str(info.value).startswith("--port=")


def test_keyword_overrides_win_over_flags_and_environment() -> None:
    s = load({"HUB_PORT": "7000"}, flags("--port", "9000"), port=0)
    assert s.port == 0


def test_every_setting_has_a_flag() -> None:
    ns = flags()
    assert set(vars(ns)) == set(Settings.__dataclass_fields__)
    assert all(v is None for v in vars(ns).values())


def test_secrets_are_not_in_repr() -> None:
    env = {
        "HUB_DATABASE_URL": "postgresql://hub:pg-pass-123@db/hub",
        "HUB_REDIS_URL": "redis://:redis-pass-456@cache:6379",
        "HUB_JWT_SECRET": "jwt-secret-789",
        "HUB_API_KEY_PEPPER": "pepper-000",
        "HUB_JWT_AUDIENCE": "aud-public",
    }
    s = load(env)
    for text in (repr(s), str(s), f"{s}", f"{s!r}"):
        for secret in (
            "pg-pass-123",
            "redis-pass-456",
            "jwt-secret-789",
            "pepper-000",
            "database_url",
            "redis_url",
            "jwt_secret",
            "api_key_pepper",
        ):
            assert secret not in text
        # Non-secret settings are still shown.
        assert "aud-public" in text
    # The values themselves are kept.
    assert s.database_url == env["HUB_DATABASE_URL"]
    assert s.redis_url == env["HUB_REDIS_URL"]
    assert s.jwt_secret == env["HUB_JWT_SECRET"]
    assert not s.development_secret


def test_settings_limits_feed_the_protocol() -> None:
    s = load(
        {
            "HUB_MAX_CHANGES_PER_PUSH": "2",
            "HUB_MAX_VALUE_BYTES": "100",
            "HUB_MAX_CLOCK_DRIFT_MS": "5",
        }
    )
    assert s.limits == Limits(max_changes_per_push=2, max_value_bytes=100, max_clock_drift_ms=5)
    change = {"collection": "c", "id": "i", "op": "delete", "hlc": "0000000000001-0000-d"}
    with pytest.raises(PayloadTooLarge):
        parse_changes([change] * 3, s.limits, 0)


def test_a_jwt_secret_and_a_jwks_together_stop_start_up() -> None:
    env = {"HUB_JWT_SECRET": "s" * 40, "HUB_JWKS_URL": "https://id.example/jwks"}
    with pytest.raises(ConfigError, match="HUB_JWT_SECRET and HUB_JWKS_URL"):
        load(env)


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"HUB_DATABASE_URL": "not-a-url"}, "HUB_DATABASE_URL"),
        ({"HUB_DATABASE_URL": "mysql://db/hub"}, "HUB_DATABASE_URL"),
        ({"HUB_DATABASE_URL": "postgresql://hub:s3cret@db:notaport/hub"}, "HUB_DATABASE_URL"),
        ({"HUB_REDIS_URL": "localhost:6379"}, "HUB_REDIS_URL"),
        ({"HUB_DATABASE_URL": "postgresql://"}, "HUB_DATABASE_URL"),
        ({"HUB_DATABASE_URL": "postgresql:///hub"}, "HUB_DATABASE_URL"),
        ({"HUB_DATABASE_URL": "postgresql://hub:s3cret@/hub"}, "HUB_DATABASE_URL"),
        ({"HUB_DATABASE_URL": "postgresql://:5432/hub"}, "HUB_DATABASE_URL"),
        ({"HUB_REDIS_URL": "redis://"}, "HUB_REDIS_URL"),
        ({"HUB_REDIS_URL": "rediss://:s3cret@/0"}, "HUB_REDIS_URL"),
        ({"HUB_REDIS_URL": "unix://"}, "HUB_REDIS_URL"),
        ({"HUB_JWKS_URL": "https:///jwks.json"}, "HUB_JWKS_URL"),
        ({"HUB_JWKS_URL": "file:///etc/keys.json"}, "HUB_JWKS_URL"),
        ({"HUB_JWT_ALGORITHMS": "none"}, "HUB_JWT_ALGORITHMS"),
        ({"HUB_JWT_SECRET": "x" * 40, "HUB_JWT_ALGORITHMS": "HS256,RS256"}, "HUB_JWT_ALGORITHMS"),
        ({"HUB_JWKS_URL": "https://idp/jwks", "HUB_JWT_ALGORITHMS": "HS256"}, "HUB_JWT_ALGORITHMS"),
    ],
)
def test_urls_and_algorithms_are_checked_at_start_up(env: dict[str, str], names: str) -> None:
    # Found now, with the setting named, not as a traceback once serving;
    # and a URL's password is never repeated back.
    with pytest.raises(ConfigError) as info:
        load(env)
    assert names in str(info.value)
    assert "s3cret" not in str(info.value)


@pytest.mark.parametrize(
    "env",
    [
        {"HUB_DATABASE_URL": "postgresql://hub:pw@db.internal:5432/hub?sslmode=require"},
        {"HUB_DATABASE_URL": "postgres:///hub?host=/var/run/postgresql"},
        {"HUB_DATABASE_URL": "postgresql://hub@/hub?host=/tmp&sslmode=disable"},
        {"HUB_DATABASE_URL": "postgresql://[::1]:5432/hub"},
        {"HUB_DATABASE_URL": "postgresql://hub:pw@db1:5432,db2:5432/hub"},
        {"HUB_REDIS_URL": "rediss://:pw@cache:6380/0"},
        {"HUB_REDIS_URL": "unix:///run/redis.sock"},
        {"HUB_JWKS_URL": "https://idp.example.com/.well-known/jwks.json"},
        {"HUB_JWT_SECRET": "x" * 40, "HUB_JWT_ALGORITHMS": "HS256,HS512"},
    ],
)
def test_usual_urls_and_algorithms_are_accepted(env: dict[str, str]) -> None:
    load(env)
