"""Redis URL -> client: plain, TLS (``rediss://``), unix sockets, ACL users, and Redis Cluster.

Every command takes the same options (:func:`add_redis_args`); secrets come from the URL, the
environment (``DFM_REDIS_PASSWORD``) or a file (``--redis-password-file``), and never appear in a
``repr``, a log line or ``--help`` (:func:`dfm_stream.redact.safe_url`).
"""

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import redis
from redis.cluster import RedisCluster

from dfm_stream.config import RedisConfig
from dfm_stream.errors import RedisConnectError
from dfm_stream.keys import DEFAULT_PREFIX
from dfm_stream.redact import help_text, safe_url

DEFAULT_URL = "redis://127.0.0.1:6379/0"
SOCKET_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 5.0

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

    def __repr__(self) -> str:
        return f"RedisSettings(url={self.safe_url()!r}, cluster={self.cluster}, prefix={self.prefix!r})"

    def safe_url(self) -> str:
        """Return the URL with any password replaced by ``***`` (for logs and errors; never raises)."""
        return safe_url(self.url)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "RedisSettings":
        """Build settings from the options added by :func:`add_redis_args`."""
        password = os.environ.get("DFM_REDIS_PASSWORD") or None
        if getattr(args, "redis_password_file", None):
            path = Path(args.redis_password_file)
            try:
                password = path.read_text().strip()
            except OSError as e:
                raise RedisConnectError(f"cannot read the Redis password file {path}: {e}") from e
        return cls(
            url=args.redis,
            cluster=bool(getattr(args, "cluster", False)),
            prefix=getattr(args, "prefix", DEFAULT_PREFIX),
            ca_file=getattr(args, "redis_ca", None),
            cert_file=getattr(args, "redis_cert", None),
            key_file=getattr(args, "redis_key", None),
            password=password,
            username=os.environ.get("DFM_REDIS_USERNAME") or None,
        )


def settings_with_config(args: argparse.Namespace, config_redis: RedisConfig | None) -> RedisSettings:
    """Return settings from the command line, completed by a config file's ``[redis]`` section.

    The command line (or its environment variables) wins where it was given: the file's ``url``
    applies unless ``--redis``/``DFM_REDIS_URL`` is set, its ``prefix`` unless ``--prefix``/
    ``DFM_PREFIX`` is set, and ``cluster`` is on when either turns it on. Readers and workers use
    this one rule, so they always agree on the server and the keys.
    """
    settings = RedisSettings.from_args(args)
    if config_redis is None:
        return settings
    url, prefix = settings.url, settings.prefix
    if args.redis == DEFAULT_URL and "DFM_REDIS_URL" not in os.environ:
        url = config_redis.url
    if args.prefix == DEFAULT_PREFIX and "DFM_PREFIX" not in os.environ:
        prefix = config_redis.prefix
    cluster = settings.cluster or bool(config_redis.cluster)
    return dataclasses.replace(settings, url=url, prefix=prefix, cluster=cluster)


def add_redis_args(parser: argparse.ArgumentParser) -> None:
    """Add the Redis options every command shares (``--redis``, ``--cluster``, TLS, ``--prefix``)."""
    g = parser.add_argument_group("Redis")
    default_url = os.environ.get("DFM_REDIS_URL", DEFAULT_URL)
    g.add_argument(
        "--redis",
        default=default_url,
        help="Redis URL: redis://[user:pass@]host:port/db, rediss:// (TLS) or unix:///path.sock "
        f"(env DFM_REDIS_URL; default {help_text(default_url)}). DFM_REDIS_USERNAME/DFM_REDIS_PASSWORD "
        "override the URL's.",
    )
    g.add_argument(
        "--cluster",
        action="store_true",
        default=os.environ.get("DFM_REDIS_CLUSTER", "") in ("1", "true", "yes"),
        help="treat --redis as one seed node of a Redis Cluster (env DFM_REDIS_CLUSTER=1)",
    )
    g.add_argument("--redis-ca", default=os.environ.get("DFM_REDIS_CA"), help="CA bundle for rediss://")
    g.add_argument("--redis-cert", default=os.environ.get("DFM_REDIS_CERT"), help="client certificate (mTLS)")
    g.add_argument("--redis-key", default=os.environ.get("DFM_REDIS_KEY"), help="client private key (mTLS)")
    g.add_argument("--redis-password-file", help="read the Redis password from this file (e.g. a Secret)")
    g.add_argument(
        "--prefix",
        default=os.environ.get("DFM_PREFIX", DEFAULT_PREFIX),
        help="prefix of every Redis key (env DFM_PREFIX; default %(default)s)",
    )


def connect(settings: RedisSettings, **overrides: object) -> RedisClient:
    """Return a client for ``settings`` (binary replies). Connection happens lazily, on first use."""
    scheme = urlsplit(settings.url).scheme
    if scheme not in ("redis", "rediss", "unix"):
        raise RedisConnectError(
            f"unsupported Redis URL scheme {scheme!r} in {settings.safe_url()}: use redis://, rediss:// or unix://"
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
    if scheme == "rediss":
        kwargs.update(_tls_kwargs(settings))
    kwargs.update(overrides)
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
