"""Redis URL -> client: plain, TLS (``rediss://``), unix sockets, ACL users, Redis Cluster, and Sentinel.

``redis+sentinel://[user:pass@]host1:26379,host2:26379/SERVICE/DB`` (``rediss+sentinel://`` for
TLS) asks the sentinels for the primary of ``SERVICE`` and follows it: after a failover the next
connection goes to the promoted replica, and a connection still open to a demoted primary turns
its ``READONLY`` replies into a ``ConnectionError`` and reconnects, so callers treat a failover like
any short outage (their retry loops already handle ``ConnectionError``). The URL's user and
password (or ``DFM_REDIS_USERNAME`` / ``DFM_REDIS_PASSWORD`` / ``--redis-password-file``) are those
of the Redis servers; sentinels that require a password of their own get it from
``DFM_REDIS_SENTINEL_USERNAME`` / ``DFM_REDIS_SENTINEL_PASSWORD``.

``--durability replicated`` (``[redis] durability``, ``DFM_DURABILITY``) makes readers and
workers confirm each write with ``WAIT 1`` (:data:`REPLICA_WAIT_MS`) before they count it.

Every command takes the same options (:func:`add_redis_args`); secrets come from the URL, the
environment (``DFM_REDIS_PASSWORD``) or a file (``--redis-password-file``), and never appear in a
``repr``, a log line or ``--help`` (:func:`dfm_stream.redact.safe_url`).
"""

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

import redis
from redis.cluster import RedisCluster
from redis.connection import SSLConnection
from redis.sentinel import Sentinel, SentinelManagedConnection
from redis.utils import SENTINEL as _UNSET

from dfm_stream.commands.config_flags import add_section_flags, overlay
from dfm_stream.config import DEFAULT_REDIS_URL, RedisConfig, settings_config, with_environment
from dfm_stream.errors import RedisConnectError
from dfm_stream.keys import DEFAULT_PREFIX
from dfm_stream.redact import help_text, safe_url

DEFAULT_URL = DEFAULT_REDIS_URL
SOCKET_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 5.0

SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
SENTINEL_PORT = 26379
DURABILITY_LEVELS = ("local", "replicated")
REPLICA_WAIT_MS = 1000
"""``--durability replicated``: how long a write waits for one replica's confirmation (``WAIT``)."""

RedisClient = redis.Redis | RedisCluster


@dataclass(frozen=True)
class RedisSettings:
    """How to reach Redis. Build it with :meth:`from_args` (CLI) or directly (tests, library use)."""

    url: str = DEFAULT_URL
    cluster: bool = False
    prefix: str = DEFAULT_PREFIX
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    password: str | None = field(default=None, repr=False)
    username: str | None = None
    durability: str = "local"

    def __post_init__(self) -> None:
        if self.durability not in DURABILITY_LEVELS:
            raise RedisConnectError(f"durability {self.durability!r} must be 'local' or 'replicated'")

    def __repr__(self) -> str:
        return f"RedisSettings(url={self.safe_url()!r}, cluster={self.cluster}, prefix={self.prefix!r})"

    def safe_url(self) -> str:
        """Return the URL with any password replaced by ``***`` (for logs and errors; never raises)."""
        return safe_url(self.url)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "RedisSettings":
        """Build settings from the options added by :func:`add_redis_args` (and the environment)."""
        return settings_with_config(args, None)


REDIS_FLAGS = ("url", "cluster", "prefix", "durability")
"""The ``[redis]`` settings every command takes as options (``--redis``, ``--cluster``, ...)."""


def settings_with_config(args: argparse.Namespace, config_redis: RedisConfig | None) -> RedisSettings:
    """Return the settings of the command line over ``[redis]`` of a config file (or the defaults).

    One rule for every command: an option that was given wins, then the environment
    (``DFM_REDIS_URL``, ``DFM_PREFIX``, ``DFM_REDIS_CLUSTER``, ``DFM_DURABILITY``, ``DFM__REDIS__KEY``),
    then the file, then the default; readers, workers, bridges and consoles so always agree on the
    server and the keys. TLS files and the password come from their options or the environment.
    """
    file_or_default = with_environment(config_redis, "redis") if config_redis else settings_config(None).redis
    section = overlay(file_or_default, args, REDIS_FLAGS)
    password = os.environ.get("DFM_REDIS_PASSWORD") or None
    if getattr(args, "redis_password_file", None):
        path = Path(args.redis_password_file)
        try:
            password = path.read_text().strip()
        except OSError as e:
            raise RedisConnectError(f"cannot read the Redis password file {path}: {e}") from e
    return RedisSettings(
        url=section.url,
        cluster=section.cluster,
        prefix=section.prefix,
        ca_file=getattr(args, "redis_ca", None),
        cert_file=getattr(args, "redis_cert", None),
        key_file=getattr(args, "redis_key", None),
        password=password,
        username=os.environ.get("DFM_REDIS_USERNAME") or None,
        durability=section.durability,
    )


def add_redis_args(parser: argparse.ArgumentParser) -> None:
    """Add the Redis options every command shares (``--redis``, ``--cluster``, TLS, ``--prefix``)."""
    g = parser.add_argument_group("Redis (option > environment > [redis] in --config > default)")
    add_section_flags(g, RedisConfig, REDIS_FLAGS)
    if os.environ.get("DFM_REDIS_URL"):  # say which server a command without --redis will use
        url_option = next(a for a in g._group_actions if a.dest == "redis")
        url_option.help = f"{url_option.help}; now DFM_REDIS_URL={help_text(os.environ['DFM_REDIS_URL'])}"
    g.add_argument("--redis-ca", default=os.environ.get("DFM_REDIS_CA"), help="CA bundle for rediss://")
    g.add_argument("--redis-cert", default=os.environ.get("DFM_REDIS_CERT"), help="client certificate (mTLS)")
    g.add_argument("--redis-key", default=os.environ.get("DFM_REDIS_KEY"), help="client private key (mTLS)")
    g.add_argument("--redis-password-file", help="read the Redis password from this file (e.g. a Secret)")


def connect(settings: RedisSettings, **overrides: object) -> RedisClient:
    """Return a client for ``settings`` (binary replies). Connection happens lazily, on first use."""
    scheme = urlsplit(settings.url).scheme
    if scheme not in ("redis", "rediss", "unix", *SENTINEL_SCHEMES):
        raise RedisConnectError(
            f"unsupported Redis URL scheme {scheme!r} in {settings.safe_url()}: use redis://, rediss://, "
            "unix://, redis+sentinel:// or rediss+sentinel://"
        )
    kwargs: dict[str, object] = {
        "socket_timeout": SOCKET_TIMEOUT_S,
        "socket_connect_timeout": CONNECT_TIMEOUT_S,
        "health_check_interval": 30,
    }
    if settings.password is not None:
        kwargs["password"] = settings.password
    if settings.username is not None:
        kwargs["username"] = settings.username
    if scheme in ("rediss", "rediss+sentinel"):
        kwargs.update(_tls_kwargs(settings))
    kwargs.update(overrides)
    if scheme in SENTINEL_SCHEMES:
        if settings.cluster:
            raise RedisConnectError("--cluster and a redis+sentinel:// URL exclude each other")
        return _sentinel_client(settings, kwargs)
    try:
        if settings.cluster:
            if scheme == "unix":
                raise RedisConnectError("Redis Cluster needs a redis:// or rediss:// seed URL, not unix://")
            return RedisCluster.from_url(settings.url, **kwargs)
        return redis.Redis.from_url(settings.url, **kwargs)
    except ValueError as e:
        raise RedisConnectError(f"invalid Redis URL {settings.safe_url()}: {e}") from e


def _tls_kwargs(settings: RedisSettings) -> dict[str, object]:
    out: dict[str, object] = {}
    for name, path in (("ssl_ca_certs", settings.ca_file), ("ssl_certfile", settings.cert_file)):
        if path:
            if not Path(path).is_file():
                raise RedisConnectError(f"TLS file {path} ({name}) does not exist")
            out[name] = path
    if settings.key_file:
        out["ssl_keyfile"] = settings.key_file
    return out


@dataclass(frozen=True)
class SentinelUrl:
    """The parts of a ``redis+sentinel://`` URL."""

    sentinels: list[tuple[str, int]]
    service: str
    db: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False


def parse_sentinel_url(url: str) -> SentinelUrl:
    """Parse ``redis+sentinel://[user:pass@]host[:port],host[:port]/SERVICE[/DB]`` (errors name the part)."""
    parts = urlsplit(url)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    shown = RedisSettings(url=url).safe_url()
    sentinels = []
    for item in hosts.split(","):
        host, port = _host_port(item.strip(), shown)
        sentinels.append((host, port))
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2:
        raise RedisConnectError(f"invalid Sentinel URL {shown}: the path must be /SERVICE or /SERVICE/DB")
    try:
        db = int(path[1]) if len(path) == 2 else 0
    except ValueError:
        raise RedisConnectError(
            f"invalid Sentinel URL {shown}: database {path[1]!r} is not a number"
        ) from None
    user, colon, password = userinfo.partition(":")
    return SentinelUrl(
        sentinels,
        unquote(path[0]),
        db,
        unquote(user) or None,
        unquote(password) if colon else None,
        parts.scheme == "rediss+sentinel",
    )


def _host_port(item: str, shown: str) -> tuple[str, int]:
    if item.startswith("["):  # [v6]:port
        host, _, rest = item[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port = item.partition(":")
    if not host:
        raise RedisConnectError(f"invalid Sentinel URL {shown}: a sentinel address is empty")
    try:
        number = int(port) if port else SENTINEL_PORT
    except ValueError:
        raise RedisConnectError(f"invalid Sentinel URL {shown}: port {port!r} is not a number") from None
    if not 0 < number < 65536:
        raise RedisConnectError(f"invalid Sentinel URL {shown}: port {number} out of range")
    return host, number


class FailoverConnection(SentinelManagedConnection):
    """A connection to the service's primary that reports a primary refusing writes as unavailable.

    redis-py already turns ``READONLY`` (a demoted primary) into a ``ConnectionError``; this does
    the same for ``NOREPLICAS`` (a primary cut off from its replicas, ``min-replicas-to-write``),
    so readers and workers back off and ask the sentinels again instead of logging an error.
    """

    def read_response(
        self,
        disable_decoding: bool = False,
        *,
        timeout: float | object = _UNSET,
        disconnect_on_error: bool | None = False,
        push_request: bool | None = False,
    ) -> object:
        """Read a reply; raise ``ConnectionError`` (and disconnect) on a ``NOREPLICAS`` answer.

        The signature and defaults are :class:`SentinelManagedConnection`'s, passed on unchanged.
        """
        try:
            return super().read_response(
                disable_decoding,
                timeout=timeout,
                disconnect_on_error=disconnect_on_error,
                push_request=push_request,
            )
        except redis.ResponseError as e:
            if not str(e).startswith("NOREPLICAS"):
                raise
            self.disconnect()
            raise redis.ConnectionError(f"the primary refuses writes: {e}") from e


class FailoverSSLConnection(FailoverConnection, SSLConnection):
    """:class:`FailoverConnection` over TLS."""


def _sentinel_client(settings: RedisSettings, kwargs: dict[str, object]) -> redis.Redis:
    """Return a client of the service's primary that asks the sentinels again after each failover."""
    target = parse_sentinel_url(settings.url)
    kwargs = {**kwargs, "db": target.db}
    if target.password is not None and "password" not in kwargs:
        kwargs["password"] = target.password
    if target.username is not None and "username" not in kwargs:
        kwargs["username"] = target.username
    sentinel_kwargs: dict[str, object] = {
        k: v for k, v in kwargs.items() if k.startswith(("socket_", "ssl_"))
    }
    kwargs["connection_class"] = FailoverSSLConnection if target.tls else FailoverConnection
    if target.tls:
        sentinel_kwargs["ssl"] = True
    if os.environ.get("DFM_REDIS_SENTINEL_PASSWORD"):
        sentinel_kwargs["password"] = os.environ["DFM_REDIS_SENTINEL_PASSWORD"]
    if os.environ.get("DFM_REDIS_SENTINEL_USERNAME"):
        sentinel_kwargs["username"] = os.environ["DFM_REDIS_SENTINEL_USERNAME"]
    sentinel = Sentinel(target.sentinels, sentinel_kwargs=sentinel_kwargs, **kwargs)
    return sentinel.master_for(target.service)
