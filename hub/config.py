"""Settings: every ``HUB_*`` environment variable, read once into one typed object.

Each setting is also a ``hub serve`` flag (``HUB_MAX_CHANGES_PER_PUSH`` is
``--max-changes-per-push``); a flag wins over the variable. A bad value stops
start-up with a :class:`ConfigError` naming the variable. Secrets are kept
out of ``repr``. Pure: the environment is passed in.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

from .protocol import Limits

__all__ = ["ConfigError", "Settings", "add_arguments", "load"]


# JWT algorithms by key kind: a secret signs with HS*, a JWKS with the others.
HS_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
ASYMMETRIC_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "ES256", "ES384", "EdDSA"})


class ConfigError(Exception):
    """A setting has a bad value; the message names the variable."""


def _bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("want true or false")


def _list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _origins(text: str) -> tuple[str, ...]:
    """Origins as browsers send them: compared as exact strings on WebSockets,
    so a wildcard, a path or a trailing slash would never match there."""
    origins = _list(text)
    for origin in origins:
        parts = urlsplit(origin)
        try:
            port = parts.port
        except ValueError:
            port = -1
        port_ok = port is None or port > 0
        default_port = {"http": 80, "https": 443}.get(parts.scheme)
        port_text = parts.netloc.rpartition(":")[2] if port is not None else ""
        if (
            parts.scheme not in ("http", "https")
            or not parts.hostname
            or not port_ok
            or "@" in parts.netloc
            or "*" in origin
            or origin != f"{parts.scheme}://{parts.netloc}"
            or origin != origin.lower()
            or not origin.isascii()
            # (as browsers send it: no default port, no padded one)
            or port == default_port
            or port_text.startswith("0")
        ):
            raise ValueError(
                f"{origin!r} is not an origin: want scheme://host[:port], http or https, "
                "lowercase and ASCII (punycode), no default port, with no path (not even "
                "'/'), query or wildcard"
            )
    return origins


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError("must be at least 1")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise ValueError("must be a positive number")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError("must be 0..65535")
    return value


# The longest duration: PostgreSQL's timestamps end at 294276 AD, so "now minus
# HUB_TOMBSTONE_RETENTION" must stay far inside them; no timeout needs more.
MAX_DURATION_S = 100 * 365 * 86400.0


def _seconds(text: str) -> float:
    """A duration: plain seconds, or with a unit suffix s, m, h, d."""
    text = text.strip().lower()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    scale = 1
    if text and text[-1] in units:
        scale = units[text[-1]]
        text = text[:-1]
    try:
        value = float(text) * scale
    except ValueError:  # float's own message would quote the text without its unit
        raise ValueError("want seconds, or a number with a unit s, m, h or d") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError("must be a positive, finite duration")
    if value > MAX_DURATION_S:
        raise ValueError("must be at most 100 years (36500d)")
    return value


def _log_level(text: str) -> str:
    if text.lower() not in ("debug", "info", "warning", "error"):
        raise ValueError("want debug, info, warning or error")
    return text.lower()


def _log_format(text: str) -> str:
    if text not in ("json", "text"):
        raise ValueError("want json or text")
    return text


@dataclass(frozen=True)
class Settings:
    """The hub's configuration. Field ``x`` is variable ``HUB_X`` and flag ``--x``."""

    database_url: str | None = field(
        default=None, repr=False, metadata={"help": "PostgreSQL URL; unset: embedded server"}
    )
    redis_url: str | None = field(
        default=None, repr=False, metadata={"help": "Redis URL for fan-out across processes"}
    )
    jwt_secret: str | None = field(
        default=None, repr=False, metadata={"help": "HS256 secret; unset: a development secret"}
    )
    jwks_url: str | None = field(default=None, metadata={"help": "JWKS URL (RS256/ES256/EdDSA)"})
    jwt_algorithms: tuple[str, ...] | None = field(
        default=None,
        metadata={
            "cast": _list,
            "help": "accepted JWT algorithms (default HS256 with a secret, "
            "RS256,ES256,EdDSA with a JWKS)",
        },
    )
    jwks_min_refresh_s: float = field(
        default=30.0,
        metadata={"cast": _seconds, "help": "an unknown kid refetches the JWKS at most this often"},
    )
    jwt_audience: str | None = field(default=None, metadata={"help": "required JWT aud"})
    jwt_issuer: str | None = field(default=None, metadata={"help": "required JWT iss"})
    api_key_pepper: str | None = field(
        default=None,
        repr=False,
        metadata={
            "help": "secret mixed into stored API key hashes; unset: API keys are refused "
            "(503), except with the development secret, from which it derives"
        },
    )
    allowed_origins: tuple[str, ...] = field(
        default=("http://127.0.0.1:8080", "http://localhost:8080"),
        metadata={
            "cast": _origins,
            "help": "comma-separated browser origins allowed, each scheme://host[:port]",
        },
    )
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on"})
    port: int = field(default=8080, metadata={"cast": _port, "help": "port (0: any free)"})
    workers: int = field(default=1, metadata={"cast": _positive_int, "help": "processes"})
    data_dir: str = field(
        default=".hub", metadata={"help": "directory for the embedded servers' data"}
    )
    db_pool_size: int = field(
        default=10, metadata={"cast": _positive_int, "help": "PostgreSQL connections per process"}
    )
    db_timeout_s: float = field(
        default=5.0, metadata={"cast": _seconds, "help": "PostgreSQL statement/connect timeout"}
    )
    max_connections_per_user: int = field(
        default=10, metadata={"cast": _positive_int, "help": "open WebSockets per user"}
    )
    rate_messages_per_s: float = field(
        default=200.0,
        metadata={"cast": _positive_float, "help": "WebSocket messages per connection per second"},
    )
    rate_pushes_per_s: float = field(
        default=200.0,
        metadata={"cast": _positive_float, "help": "pushes per user per second, per process"},
    )
    rate_requests_per_s: float = field(
        default=200.0,
        metadata={
            "cast": _positive_float,
            "help": "HTTP requests per user per second, per process",
        },
    )
    rate_burst_s: float = field(
        default=2.0,
        metadata={"cast": _seconds, "help": "rate limits allow bursts of this many seconds"},
    )
    max_changes_per_push: int = field(
        default=1000, metadata={"cast": _positive_int, "help": "changes in one push"}
    )
    max_value_bytes: int = field(
        default=64 * 1024, metadata={"cast": _positive_int, "help": "encoded field value"}
    )
    max_clock_drift_ms: int = field(
        default=60_000, metadata={"cast": _positive_int, "help": "stamp ahead of hub clock"}
    )
    max_event_bytes: int = field(
        default=64 * 1024,
        metadata={"cast": _positive_int, "help": "larger events become sync_available"},
    )
    max_batch_pushes: int = field(
        default=512, metadata={"cast": _positive_int, "help": "pushes in one commit"}
    )
    auth_timeout_s: float = field(
        default=10.0, metadata={"cast": _seconds, "help": "time to send the auth message"}
    )
    heartbeat_s: float = field(
        default=30.0, metadata={"cast": _seconds, "help": "WebSocket ping interval"}
    )
    broker_check_s: float = field(
        default=5.0,
        metadata={
            "cast": _seconds,
            "help": "how often the Redis link is proved alive; two failed: reconnect",
        },
    )
    revocation_recheck_s: float = field(
        default=30.0,
        metadata={
            "cast": _seconds,
            "help": "how often each process looks its connections' devices and keys up: "
            "the bound on a revocation whose broadcast was lost",
        },
    )
    send_queue_size: int = field(
        default=256,
        metadata={"cast": _positive_int, "help": "messages queued per connection before 1013"},
    )
    tombstone_retention: float = field(
        default=30 * 86400.0,
        metadata={"cast": _seconds, "help": "keep tombstones this long (e.g. 30d)"},
    )
    retention_interval_s: float = field(
        default=3600.0,
        metadata={"cast": _seconds, "help": "how often one process purges tombstones"},
    )
    shutdown_timeout_s: float = field(
        default=10.0, metadata={"cast": _seconds, "help": "bound on graceful shutdown"}
    )
    log_format: str = field(default="json", metadata={"cast": _log_format, "help": "json or text"})
    log_level: str = field(
        default="info", metadata={"cast": _log_level, "help": "debug, info, warning, error"}
    )

    @functools.cached_property
    def limits(self) -> Limits:  # read for every push: made once
        return Limits(
            max_changes_per_push=self.max_changes_per_push,
            max_value_bytes=self.max_value_bytes,
            max_clock_drift_ms=self.max_clock_drift_ms,
        )

    @property
    def development_secret(self) -> bool:
        return self.jwt_secret is None and self.jwks_url is None


def _fields() -> list[dataclasses.Field[Any]]:
    return list(dataclasses.fields(Settings))


def env_name(name: str) -> str:
    return "HUB_" + name.upper()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one ``--flag`` per setting (default: unset, so the variable applies)."""
    for f in _fields():
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            default=None,
            metavar=_metavar(f),
            help=f"{f.metadata.get('help', '')} [{env_name(f.name)}]",
        )


def _metavar(f: dataclasses.Field[Any]) -> str:
    """What a flag's value looks like, from how it is read."""
    cast = f.metadata.get("cast")
    names = {
        _positive_int: "N",
        _port: "PORT",
        _seconds: "DURATION",
        _positive_float: "NUMBER",
        _list: "LIST",
        _origins: "LIST",
        _log_format: "json|text",
        _log_level: "LEVEL",
    }
    if cast in names:
        return names[cast]
    return "URL" if f.name.endswith("_url") else "TEXT"


def load(
    environ: Mapping[str, str], flags: argparse.Namespace | None = None, **overrides: Any
) -> Settings:
    """Read settings from the environment, then flags, then keyword overrides."""
    values: dict[str, Any] = {}
    for f in _fields():
        cast: Callable[[str], Any] = f.metadata.get("cast", str)
        raw = None
        source = env_name(f.name)
        if flags is not None and getattr(flags, f.name, None) is not None:
            raw, source = getattr(flags, f.name), "--" + f.name.replace("_", "-")
        elif environ.get(source, "") != "":
            raw = environ[source]
        if raw is None:
            continue
        try:
            values[f.name] = cast(raw)
        except ValueError as exc:
            raise ConfigError(f"{source}={raw!r} is not valid: {exc}") from None
    values.update(overrides)
    settings = Settings(**values)
    if settings.jwt_secret is not None and settings.jwks_url is not None:
        raise ConfigError(
            "HUB_JWT_SECRET and HUB_JWKS_URL are both set: HS and asymmetric algorithms are "
            "never mixed; set one"
        )
    _check_urls(settings)
    _check_algorithms(settings)
    return settings


def _check_urls(settings: Settings) -> None:
    # The URLs are not quoted back: they may hold a password.
    for name, url, schemes in (
        ("HUB_DATABASE_URL", settings.database_url, ("postgresql", "postgres")),
        ("HUB_REDIS_URL", settings.redis_url, ("redis", "rediss", "unix")),
        ("HUB_JWKS_URL", settings.jwks_url, ("https", "http")),
    ):
        if url is None:
            continue
        parts = urlsplit(url)
        try:  # (several hosts, "h1:5432,h2:5432", are for the driver to read)
            port_ok = "," in parts.netloc or parts.port is None or parts.port > 0
        except ValueError:
            port_ok = False
        # Without a host the drivers would quietly use local defaults. A Unix
        # socket is the host given another way: PostgreSQL's ?host=/dir, redis's unix://.
        host_ok = (
            bool(parts.hostname)
            or "," in parts.netloc
            or (parts.scheme == "unix" and bool(parts.path))
            or (schemes[0] == "postgresql" and bool(parse_qs(parts.query).get("host")))
        )
        if parts.scheme not in schemes or not port_ok or not host_ok:
            raise ConfigError(
                f"{name} is not a URL of the form {schemes[0]}://[user[:password]@]host[:port]/..."
            )


def _check_algorithms(settings: Settings) -> None:
    if settings.jwt_algorithms is None:
        return
    allowed = ASYMMETRIC_ALGORITHMS if settings.jwks_url is not None else HS_ALGORITHMS
    if not settings.jwt_algorithms or not set(settings.jwt_algorithms) <= allowed:
        kind = "a JWKS" if settings.jwks_url is not None else "a JWT secret"
        raise ConfigError(
            f"HUB_JWT_ALGORITHMS={','.join(settings.jwt_algorithms)!r}: with {kind} "
            f"the algorithms are among {','.join(sorted(allowed))}"
        )


def known_variables() -> Sequence[str]:
    """Every environment variable the hub reads (documentation is checked against it)."""
    return [env_name(f.name) for f in _fields()]
