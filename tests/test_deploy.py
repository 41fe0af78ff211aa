"""What ships in deploy/: Dockerfiles, Compose, Kubernetes (kustomize base + overlays) and KEDA.

No Docker engine and no kustomize run here, so these tests check what can be checked without
them: every file parses; every file a manifest references exists; every command line a container
runs parses with the real ``dfm-stream`` argument parser (so the subcommands and flags exist);
health checks probe ``/healthz`` (and readiness ``/readyz``) on the port the process is told to
serve metrics on, and the health-check one-liners work against a real metrics server; the
Kubernetes resources of the base and of each overlay, resolved by a small kustomize of our own,
validate against the Kubernetes schemas (kubernetes-validate, offline); the KEDA and Prometheus
Operator resources, which it has no schema for, get our own checks of the fields their
documentation requires.
"""

import copy
import fnmatch
import re
import shlex
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from dfm_stream import keys
from dfm_stream.cli import build_parser
from dfm_stream.config import config_from_dict, load_config
from dfm_stream.embedded_redis import free_port
from dfm_stream.metrics import new_registry, serve

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = ("cpu", "gpu", "sentinel")
K8S_VERSIONS = ("1.30.0", "1.34.0")
"""Kubernetes releases whose schemas (bundled with kubernetes-validate) every resource must meet."""
METRICS_PORTS = {"read": 9400, "work": 9401, "bridge": 9403}
"""The metrics ports of readers, workers and the bridge: deploy/prometheus/prometheus.yml scrapes these."""
BRIDGE_PORTS = {"opcua": 4840, "modbus": 5020}
"""The ports the bridge serves PLCs on (``--opcua`` endpoint, ``--modbus`` HOST:PORT)."""
BRIDGE_FILE_OPTIONS = ("mqtt_password_file", "opcua_users", "opcua_cert", "opcua_key")
"""Bridge options that name a secret file: each must come from a mounted secret, never inline."""
CONSOLE_PORT = 8080
"""The operator console's port (``dfm-stream console --port``): pages, /healthz and /readyz."""
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
SCRIPT_SUBCOMMAND = {"dfm-stream": [], "dfm-stream-reader": ["read"], "dfm-stream-worker": ["work"]}
CRD_GROUPS = ("keda.sh/", "monitoring.coreos.com/")


# ---------------------------------------------------------------------------------------------
# helpers: YAML, Dockerfiles, the CLI
# ---------------------------------------------------------------------------------------------


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def load_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """Return ``(INSTRUCTION, arguments)`` pairs, with continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, f"{path}: dangling line continuation at the end"
    return out


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    starts = [i for i, (word, _) in enumerate(instructions) if word == "FROM"]
    return instructions[starts[-1] :]


def exec_form(args: str) -> list[str]:
    """Parse a JSON-array (exec form) instruction argument; fail on the shell form."""
    value = yaml.safe_load(args)
    assert isinstance(value, list), f"not exec form (a JSON array): {args}"
    return [str(v) for v in value]


def image_entrypoint(image: str) -> list[str]:
    """Return the ENTRYPOINT of one of our images, from the Dockerfile its tag names (-cpu/-cuda)."""
    flavour = image.rsplit("-", 1)[-1]
    dockerfile = DEPLOY / "docker" / f"Dockerfile.{flavour}"
    assert dockerfile.is_file(), f"image {image}: no {dockerfile.relative_to(REPO)} builds it"
    entry = [args for word, args in final_stage(dockerfile_instructions(dockerfile)) if word == "ENTRYPOINT"]
    assert entry, f"{dockerfile}: no ENTRYPOINT"
    return exec_form(entry[-1])


def parse_cli(entrypoint: list[str], args: list[str], where: str) -> Any:
    """Parse the command line a container runs with the real parser; fail naming ``where``."""
    script = entrypoint[0]
    assert script in SCRIPTS, f"{where}: {script!r} is not a console script of pyproject.toml"
    argv = [*SCRIPT_SUBCOMMAND[script], *entrypoint[1:], *args]
    try:
        return build_parser().parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"{where}: `{script} {shlex.join(argv)}` does not parse (exit {e.code})")


def flag_value(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


HEALTH_URL = re.compile(r"http://127\.0\.0\.1:(?P<port>\d+|%s)(?P<path>/[a-z]+)")


def probe_exit_code(code: str, port: int, env_port: int | None = None) -> int:
    """Run a health-check one-liner with its port pointed at ``port``; return its exit code.

    A literal port in the URL is replaced by ``port``; a ``%s`` one (filled from the environment
    by the one-liner itself) gets ``DFM_METRICS_PORT=env_port``.
    """

    def repoint(m: re.Match) -> str:
        return m[0] if m["port"] == "%s" else f"http://127.0.0.1:{port}{m['path']}"

    code = HEALTH_URL.sub(repoint, code, count=1)
    env = {"PATH": "/usr/bin:/bin"} | ({"DFM_METRICS_PORT": str(env_port)} if env_port else {})
    return subprocess.run([sys.executable, "-c", code], env=env, timeout=20, check=False).returncode


# ---------------------------------------------------------------------------------------------
# Dockerfiles
# ---------------------------------------------------------------------------------------------

DOCKERFILES = sorted((DEPLOY / "docker").glob("Dockerfile.*"))


def test_both_images_have_a_dockerfile() -> None:
    assert {p.name for p in DOCKERFILES} >= {"Dockerfile.cpu", "Dockerfile.cuda"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_is_multi_stage_from_pinned_base_images(dockerfile: Path) -> None:
    instructions = dockerfile_instructions(dockerfile)
    stages: list[str] = []
    for word, args in instructions:
        if word != "FROM":
            continue
        parts = args.split()
        image = parts[0]
        if image not in stages:  # a FROM of an earlier stage needs no tag
            name, _, tag = image.rpartition(":")
            assert name and "/" not in tag, f"{dockerfile.name}: base image {image} has no tag"
            assert tag != "latest" and "$" not in image, f"{dockerfile.name}: {image} is not pinned"
        if len(parts) == 3 and parts[1].upper() == "AS":
            stages.append(parts[2])
    assert len(stages) >= 2, f"{dockerfile.name}: expected a build and a runtime stage"
    copies_from = [a for w, a in final_stage(instructions) if w == "COPY" and a.startswith("--from=")]
    assert copies_from, f"{dockerfile.name}: the final stage copies nothing from the build stage"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_runs_as_non_root_with_a_console_script_entrypoint(dockerfile: Path) -> None:
    stage = final_stage(dockerfile_instructions(dockerfile))
    users = [args for word, args in stage if word == "USER"]
    assert users, f"{dockerfile.name}: the final stage sets no USER (it would run as root)"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"{dockerfile.name}: runs as {users[-1]}"
    entrypoint = image_entrypoint(f"dfm-stream:x-{dockerfile.suffix[1:]}")
    assert entrypoint[0] in SCRIPTS, f"{dockerfile.name}: ENTRYPOINT {entrypoint} is not a console script"
    cmd = [args for word, args in stage if word == "CMD"]
    default_args = [a for a in exec_form(cmd[-1]) if a != "--help"] if cmd else []
    if default_args:  # e.g. ["work", "--help"]: the subcommand must exist
        parse_cli(entrypoint, default_args, f"{dockerfile.name} CMD")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_healthcheck_probes_healthz_of_a_live_metrics_server(dockerfile: Path) -> None:
    checks = [
        args for word, args in final_stage(dockerfile_instructions(dockerfile)) if word == "HEALTHCHECK"
    ]
    assert checks, f"{dockerfile.name}: no HEALTHCHECK"
    _, _, cmd = checks[-1].partition("CMD ")
    argv = exec_form(cmd)
    assert argv[:2] == ["python", "-c"], f"{dockerfile.name}: expected python -c (no curl in the image)"
    assert "/healthz" in argv[2]
    server = serve(new_registry(process_metrics=False), "127.0.0.1", 0)
    try:
        # the port comes from DFM_METRICS_PORT: the real server answers, a dead port fails
        assert probe_exit_code(argv[2], 0, env_port=server.port) == 0
        assert probe_exit_code(argv[2], 0, env_port=free_port()) != 0
    finally:
        server.close()


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copies_files_that_exist_and_are_in_the_build_context(dockerfile: Path) -> None:
    ignore = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for word, args in dockerfile_instructions(dockerfile):
        if word != "COPY" or args.startswith("--from="):
            continue
        *sources, _dest = args.split()
        for src in sources:
            assert (REPO / src).exists(), f"{dockerfile.name}: COPY {src}: no such file in the repository"
            parts = Path(src).parts
            prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
            hit = [p for p in ignore for pre in prefixes if fnmatch.fnmatch(pre, p)]
            assert not hit, f"{dockerfile.name}: COPY {src} is excluded by .dockerignore ({hit})"


# ---------------------------------------------------------------------------------------------
# Compose
# ---------------------------------------------------------------------------------------------

COMPOSE = DEPLOY / "compose.yaml"
COMPOSE_GPU = DEPLOY / "compose.gpu.yaml"
COMPOSE_SENTINEL = DEPLOY / "compose.sentinel.yaml"


def compose_services(path: Path = COMPOSE) -> dict[str, dict]:
    doc = load_yaml(path)
    assert isinstance(doc.get("services"), dict), f"{path}: no services"
    return doc["services"]


def our_services(services: dict[str, dict]) -> Iterator[tuple[str, dict]]:
    for name, svc in services.items():
        if str(svc.get("image", "")).startswith("dfm-stream:") or "build" in svc:
            yield name, svc


def service_command(svc: dict) -> list[str]:
    cmd = svc.get("command", [])
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def test_compose_defines_every_service_of_the_pipeline() -> None:
    services = compose_services()
    assert {"redis", "prometheus", "grafana", "worker", "console", "bridge"} <= services.keys()
    config = load_config(DEPLOY / "config" / "cameras.example.toml", env={})
    assert len(config.cameras) >= 2
    for cam in config.cameras:
        svc = services.get(f"reader-{cam.id}")
        assert svc is not None, f"camera {cam.id} of the example config has no reader-{cam.id} service"
        assert flag_value(service_command(svc), "--camera") == cam.id
    worker = services["worker"]
    assert "container_name" not in worker, "a fixed container_name breaks --scale worker=N"
    assert "ports" not in worker, "fixed host ports break --scale worker=N"
    assert service_command(worker)[0] == "work"
    assert int(str(worker["stop_grace_period"]).rstrip("s")) >= 30, "a worker needs time to finish its batch"
    redis_cmd = service_command(services["redis"])
    assert flag_value(redis_cmd, "--appendonly") == "yes", "Redis must persist (AOF)"
    assert flag_value(redis_cmd, "--maxmemory-policy") == "noeviction"


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_GPU, COMPOSE_SENTINEL], ids=lambda p: p.name)
def test_compose_files_it_references_exist(path: Path) -> None:
    for name, svc in compose_services(path).items():
        build = svc.get("build")
        if build:
            context = (path.parent / build["context"]).resolve()
            assert context.is_dir(), f"{name}: build context {context} missing"
            assert (context / build["dockerfile"]).is_file(), f"{name}: {build['dockerfile']} missing"
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume["source"]
            if source.startswith((".", "/")):
                assert (path.parent / source).exists(), f"{name}: bind mount {source} does not exist"
    for name, secret in load_yaml(path).get("secrets", {}).items():
        assert (path.parent / secret["file"]).is_file(), f"secret {name}: {secret['file']} does not exist"


def test_compose_commands_parse_with_the_package_cli() -> None:
    parsed = 0
    for name, svc in our_services(compose_services()):
        entrypoint = svc.get("entrypoint") or image_entrypoint(svc["image"])
        parse_cli(entrypoint, service_command(svc), f"compose service {name}")
        parsed += 1
    assert parsed >= 4


def test_compose_healthchecks_probe_healthz_on_each_services_metrics_port() -> None:
    server = serve(new_registry(process_metrics=False), "127.0.0.1", 0)
    try:
        for name, svc in our_services(compose_services()):
            cmd = service_command(svc)
            if cmd[0] not in METRICS_PORTS:
                continue
            port = int(flag_value(cmd, "--metrics-port") or 0)
            assert port == METRICS_PORTS[cmd[0]], f"{name}: Prometheus scrapes {cmd[0]} on {METRICS_PORTS}"
            assert flag_value(cmd, "--metrics-host") == "0.0.0.0", f"{name}: metrics unreachable from outside"
            test = svc["healthcheck"]["test"]
            assert test[:3] == ["CMD", "python", "-c"], f"{name}: healthcheck must be python -c"
            match = HEALTH_URL.search(test[3])
            assert match, f"{name}: healthcheck has no http://127.0.0.1:PORT/PATH"
            assert (int(match["port"]), match["path"]) == (port, "/healthz"), f"{name}: {match[0]}"
            assert probe_exit_code(test[3], server.port) == 0, f"{name}: healthcheck fails on a live server"
        assert probe_exit_code(test[3], free_port()) != 0, "a healthcheck must fail when nothing listens"
    finally:
        server.close()


def test_compose_console_is_published_on_loopback_and_probed_on_its_port() -> None:
    console = compose_services()["console"]
    cmd = service_command(console)
    assert cmd[0] == "console" and int(flag_value(cmd, "--port")) == CONSOLE_PORT
    assert console["ports"] == [f"127.0.0.1:{CONSOLE_PORT}:{CONSOLE_PORT}"], "the console stays on loopback"
    match = HEALTH_URL.search(console["healthcheck"]["test"][3])
    assert match and (int(match["port"]), match["path"]) == (CONSOLE_PORT, "/healthz")


def test_compose_matches_the_prometheus_scrape_config() -> None:
    scrape = {
        job["job_name"]: job for job in load_yaml(DEPLOY / "prometheus" / "prometheus.yml")["scrape_configs"]
    }
    services = compose_services()
    readers = {t for sc in scrape["dfm-readers"]["static_configs"] for t in sc["targets"]}
    expected = {f"{name}:{METRICS_PORTS['read']}" for name in services if name.startswith("reader-")}
    assert readers == expected
    dns = scrape["dfm-workers"]["dns_sd_configs"][0]
    assert dns["names"] == ["worker"] and dns["port"] == METRICS_PORTS["work"]
    bridges = {t for sc in scrape["dfm-bridge"]["static_configs"] for t in sc["targets"]}
    assert bridges == {f"bridge:{METRICS_PORTS['bridge']}"}
    assert "bridge" in services


def bridge_args(argv: list[str], where: str) -> Any:
    """Return the ``[bridge]`` settings a ``bridge`` command line gives, resolved as at start."""
    from dfm_stream.commands import bridge

    args = build_parser().parse_args(argv)
    assert args.command == "bridge", where
    args.config = None  # the options a container gives; the config file adds cameras only
    return bridge.resolve(args)[1]


def test_compose_bridge_serves_plcs_and_reads_its_secrets_from_compose_secrets() -> None:
    doc = load_yaml(COMPOSE)
    svc = doc["services"]["bridge"]
    args = bridge_args(service_command(svc), "compose service bridge")
    assert args.opcua.startswith("opc.tcp://0.0.0.0:4840/") and args.modbus == "0.0.0.0:5020"
    assert not args.opcua_anonymous, "OPC UA must not be open to anonymous clients as shipped"
    published = {int(p.rsplit(":", 2)[-1]) for p in svc["ports"]}
    assert published == set(BRIDGE_PORTS.values())
    env = svc["environment"]
    secret_files = [args.opcua_users, env["DFM__BRIDGE__MQTT_PASSWORD_FILE"]]
    for path in secret_files:
        name = Path(path).name
        assert path == f"/run/secrets/{name}" and name in svc["secrets"], f"{path} is not a compose secret"
        assert name in doc["secrets"], f"secret {name} is not defined at the top level"
    volumes = {v.split(":")[1]: v.split(":")[0] for v in svc["volumes"]}
    assert volumes.get(args.opcua_pki) in doc["volumes"], "the OPC UA certificate must outlive the container"
    config = load_config(DEPLOY / "config" / "cameras.example.toml", env={})
    assert config.bridge.cameras.split(",") == [c.id for c in config.cameras]


def test_compose_mounts_what_prometheus_and_grafana_provisioning_expect() -> None:
    services = compose_services()
    prom_mounts = dict(v.split(":")[:2] for v in services["prometheus"]["volumes"])
    prom_dir = Path("/etc/prometheus")
    rule_files = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")["rule_files"]
    for rule_file in rule_files:
        assert str(prom_dir / rule_file) in prom_mounts.values(), f"rule file {rule_file} not mounted"
    graf_mounts = {dst: src for src, dst in (v.split(":")[:2] for v in services["grafana"]["volumes"])}
    assert graf_mounts["/etc/grafana/provisioning"] == "./grafana/provisioning"
    for provider in load_yaml(DEPLOY / "grafana" / "provisioning" / "dashboards" / "dfm-stream.yml")[
        "providers"
    ]:
        path = provider["options"]["path"]
        assert path in graf_mounts, f"the dashboards provider reads {path}, which compose does not mount"
        assert list((DEPLOY / graf_mounts[path]).glob("*.json")), f"no dashboard JSON in {graf_mounts[path]}"
    datasources = load_yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml")
    assert datasources["datasources"][0]["url"].startswith("http://prometheus:9090")


def sentinel_conf(svc: dict) -> list[str]:
    """The sentinel.conf lines a compose sentinel service writes (``printf '%s\\n' 'line' ... >``)."""
    script = shlex.split(service_command(svc)[2])
    return script[2 : script.index(">")]


def test_compose_sentinel_override_points_every_process_at_three_sentinels() -> None:
    from dfm_stream.connect import parse_sentinel_url

    base, services = compose_services(), compose_services(COMPOSE_SENTINEL)
    sentinels = sorted(n for n in services if n.startswith("sentinel-"))
    assert len(sentinels) == 3
    for name in sentinels:
        monitor = [
            line.split() for line in sentinel_conf(services[name]) if line.startswith("sentinel monitor")
        ]
        (_, _, service, host, port, quorum), *more = monitor
        assert not more and host in base and port == "6379" and quorum == "2", monitor
    replica = service_command(services["redis-replica"])
    assert replica[replica.index("--replicaof") + 1] == host
    for name in ("redis", "redis-replica"):
        cmd = service_command(services[name])
        assert flag_value(cmd, "--min-replicas-to-write") == "1", f"{name}: a cut-off primary must stop"
        assert flag_value(cmd, "--appendonly") == "yes"
    users = [n for n, svc in our_services(base) if "DFM_REDIS_URL" in svc.get("environment", {})]
    assert {"worker", "reader-cam1", "reader-cam2", "model-push", "console", "bridge"} <= set(users)
    for name in users:
        env = services[name]["environment"]
        target = parse_sentinel_url(env["DFM_REDIS_URL"])
        assert target.sentinels == [(n, 26379) for n in sentinels] and target.service == service, name
        assert env["DFM_DURABILITY"] == "replicated", name


def test_compose_sentinel_config_is_accepted_by_a_real_sentinel(tmp_path: Path) -> None:
    """The lines the compose sentinels write, pointed at a local server, make a working sentinel."""
    import redis

    from dfm_stream.embedded_redis import EmbeddedRedis, find_redis_server

    lines = sentinel_conf(compose_services(COMPOSE_SENTINEL)["sentinel-1"])
    port = free_port()
    (tmp_path / "primary").mkdir()
    with EmbeddedRedis(workdir=tmp_path / "primary") as primary:
        text = "\n".join(lines) + "\n"
        text = text.replace("port 26379", f"port {port}").replace(
            " redis 6379 ", f" 127.0.0.1 {primary.port} "
        )
        (tmp_path / "sentinel.conf").write_text(text + f"dir {tmp_path}\n")
        proc = subprocess.Popen([find_redis_server(), str(tmp_path / "sentinel.conf"), "--sentinel"])
        try:
            client = redis.Redis(port=port, decode_responses=True)
            deadline = time.monotonic() + 20
            while True:
                try:
                    state = client.sentinel_master("dfm")
                    break
                except redis.ConnectionError:
                    assert proc.poll() is None and time.monotonic() < deadline, "sentinel did not start"
                    time.sleep(0.1)
            assert int(state["port"]) == primary.port and int(state["quorum"]) == 2
            client.close()
        finally:
            proc.kill()
            proc.wait(10)


def test_compose_gpu_override_reserves_gpus_and_builds_the_cuda_image() -> None:
    worker = compose_services(COMPOSE_GPU)["worker"]
    assert worker["build"]["dockerfile"].endswith("Dockerfile.cuda")
    assert worker["image"].endswith("-cuda")
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)


# ---------------------------------------------------------------------------------------------
# Kubernetes: a small kustomize (resources + strategic-merge patch files) and checks
# ---------------------------------------------------------------------------------------------

SUPPORTED_KUSTOMIZATION_KEYS = {"apiVersion", "kind", "resources", "patches"}
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "volumes": "name",
    "env": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
    "imagePullSecrets": "name",
}
"""List fields merged item by item (by this key) in built-in kinds, as kubectl/kustomize do."""


def strategic_merge(base: Any, patch: Any, builtin: bool) -> Any:
    """Merge ``patch`` into ``base`` the way a strategic-merge patch does for the cases we use.

    Maps merge recursively (``null`` deletes a key). In built-in kinds the lists of
    :data:`MERGE_KEYS` merge item by item; every other list is replaced. Custom resources have no
    merge keys (kustomize treats their patches as JSON merge patches): their lists are replaced.
    """
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            if value is None:
                out.pop(key, None)
            elif key in out and builtin and key in MERGE_KEYS and isinstance(value, list):
                out[key] = merge_list(out[key], value, MERGE_KEYS[key])
            elif key in out:
                out[key] = strategic_merge(out[key], value, builtin)
            else:
                out[key] = copy.deepcopy(value)
        return out
    return copy.deepcopy(patch)


def merge_list(base: list, patch: list, key: str) -> list:
    out = [copy.deepcopy(item) for item in base]
    for item in patch:
        match = [i for i, old in enumerate(out) if old.get(key) == item.get(key)]
        if match:
            out[match[0]] = strategic_merge(out[match[0]], item, True)
        else:
            out.append(copy.deepcopy(item))
    return out


def ident(res: dict) -> tuple[str, str, str]:
    return res["kind"], res["metadata"]["name"], res["metadata"].get("namespace", "")


def kustomize(directory: Path) -> list[dict]:
    """Resolve ``directory/kustomization.yaml``: its resources (files or bases), then its patches."""
    kust = load_yaml(directory / "kustomization.yaml")
    unsupported = set(kust) - SUPPORTED_KUSTOMIZATION_KEYS
    assert not unsupported, (
        f"{directory}: keep kustomizations to {SUPPORTED_KUSTOMIZATION_KEYS}: {unsupported}"
    )
    resources: list[dict] = []
    for entry in kust.get("resources", []):
        path = directory / entry
        assert path.exists(), f"{directory / 'kustomization.yaml'}: resource {entry} does not exist"
        resources += kustomize(path) if path.is_dir() else load_all(path)
    ids = [ident(r) for r in resources]
    assert len(ids) == len(set(ids)), f"{directory}: duplicate resources {ids}"
    for entry in kust.get("patches", []):
        assert set(entry) == {"path"}, f"{directory}: patches must be files (path:), got {entry}"
        for patch in load_all(directory / entry["path"]):
            target = [i for i, r in enumerate(resources) if ident(r) == ident(patch)]
            assert target, f"{directory}/{entry['path']}: no resource {ident(patch)} to patch"
            builtin = not patch["apiVersion"].startswith(CRD_GROUPS)
            resources[target[0]] = strategic_merge(resources[target[0]], patch, builtin)
    return resources


BUILDS = {"base": K8S / "base", **{name: K8S / "overlays" / name for name in OVERLAYS}}


@pytest.fixture(scope="module", params=sorted(BUILDS))
def build(request: pytest.FixtureRequest) -> tuple[str, list[dict]]:
    return request.param, kustomize(BUILDS[request.param])


def of_kind(resources: list[dict], kind: str) -> list[dict]:
    return [r for r in resources if r["kind"] == kind]


def one(resources: list[dict], kind: str, name: str) -> dict:
    found = [r for r in resources if r["kind"] == kind and r["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def pod_specs(resources: list[dict]) -> Iterator[tuple[dict, dict]]:
    for res in resources:
        if res["kind"] in ("Deployment", "StatefulSet"):
            yield res, res["spec"]["template"]["spec"]


def dfm_containers(resources: list[dict]) -> Iterator[tuple[dict, dict, dict]]:
    for res, spec in pod_specs(resources):
        for container in spec["containers"]:
            if container["image"].startswith("dfm-stream:"):
                yield res, spec, container


def test_every_file_in_k8s_is_listed_by_a_kustomization() -> None:
    listed = set()
    for directory in BUILDS.values():
        kust = load_yaml(directory / "kustomization.yaml")
        listed |= {(directory / e).resolve() for e in kust.get("resources", []) if e.endswith(".yaml")}
        listed |= {(directory / p["path"]).resolve() for p in kust.get("patches", [])}
        listed.add((directory / "kustomization.yaml").resolve())
    on_disk = {p.resolve() for p in K8S.rglob("*.yaml")}
    assert on_disk - listed == set(), "manifests that no kustomization.yaml uses"


def test_every_resource_validates_against_the_kubernetes_schemas(build: tuple[str, list[dict]]) -> None:
    name, resources = build
    builtin = [r for r in resources if not r["apiVersion"].startswith(CRD_GROUPS)]
    assert {"Namespace", "Secret", "ConfigMap", "Deployment", "Service"} <= {r["kind"] for r in builtin}
    for res in builtin:
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(res, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(
                    f"{name}: {ident(res)} is not a valid {res['kind']} for Kubernetes {version}: {e}"
                )
    custom = {r["kind"] for r in resources if r["apiVersion"].startswith(CRD_GROUPS)}
    assert custom == {"ScaledObject", "TriggerAuthentication", "PodMonitor"}, custom


def test_every_namespaced_resource_is_in_the_namespace(build: tuple[str, list[dict]]) -> None:
    _, resources = build
    (namespace,) = of_kind(resources, "Namespace")
    for res in resources:
        if res["kind"] != "Namespace":
            assert res["metadata"].get("namespace") == namespace["metadata"]["name"], ident(res)


def test_containers_run_commands_the_cli_accepts(build: tuple[str, list[dict]]) -> None:
    name, resources = build
    seen = set()
    for res, _, container in dfm_containers(resources):
        entrypoint = container.get("command") or image_entrypoint(container["image"])
        args = parse_cli(entrypoint, container.get("args", []), f"{name}: {ident(res)}")
        seen.add(args.command)
        mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
        for option in ("config", "redis_password_file", *BRIDGE_FILE_OPTIONS):
            path = getattr(args, option, None)
            if path:
                assert str(Path(path).parent) in mounts, f"{ident(res)}: {option} {path} is not mounted"
    assert seen == {"read", "work", "console", "bridge"}


def test_probes_check_healthz_and_readyz_on_the_metrics_port(build: tuple[str, list[dict]]) -> None:
    _, resources = build
    for res, _, container in dfm_containers(resources):
        args = container["args"]
        if args[0] == "console":
            continue  # no metrics port: see the console's own test
        port = int(flag_value(args, "--metrics-port") or 0)
        assert port == METRICS_PORTS[args[0]], f"{ident(res)}: Prometheus rules expect {METRICS_PORTS}"
        assert flag_value(args, "--metrics-host") == "0.0.0.0", f"{ident(res)}: metrics unreachable"
        named = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert named.get("metrics") == port, f"{ident(res)}: port 'metrics' is not --metrics-port"
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            get = container[probe]["httpGet"]
            assert (get["path"], get["port"]) == (path, "metrics"), f"{ident(res)} {probe}"


def test_the_console_listens_on_all_interfaces_of_its_pod_and_is_probed_there(
    build: tuple[str, list[dict]],
) -> None:
    _, resources = build
    consoles = [(res, c) for res, _, c in dfm_containers(resources) if c["args"][0] == "console"]
    assert len(consoles) == 1
    res, container = consoles[0]
    args = container["args"]
    assert flag_value(args, "--host") == "0.0.0.0" and int(flag_value(args, "--port")) == CONSOLE_PORT
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"http": CONSOLE_PORT}
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = container[probe]["httpGet"]
        assert (get["path"], get["port"]) == (path, "http"), f"{ident(res)} {probe}"
    services = [s for s in of_kind(resources, "Service") if s["metadata"]["name"] == "dfm-console"]
    assert [p["targetPort"] for p in services[0]["spec"]["ports"]] == ["http"]


def test_pods_run_non_root_with_a_read_only_root_filesystem(build: tuple[str, list[dict]]) -> None:
    _, resources = build
    for res, spec in pod_specs(resources):
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] != 0, ident(res)
        assert pod["seccompProfile"]["type"] == "RuntimeDefault", ident(res)
        assert spec["automountServiceAccountToken"] is False, ident(res)
        for container in spec["containers"]:
            sc = container["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, f"{ident(res)} {container['name']}"
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
            name, _, tag = container["image"].rpartition(":")
            assert name and tag and tag != "latest", f"{ident(res)}: image {container['image']} not pinned"
            assert "memory" in container["resources"]["limits"], f"{ident(res)}: no memory limit"


def test_worker_has_time_to_terminate_gracefully(build: tuple[str, list[dict]]) -> None:
    _, resources = build
    spec = one(resources, "Deployment", "dfm-worker")["spec"]["template"]["spec"]
    assert spec["terminationGracePeriodSeconds"] >= 30


def test_overlay_picks_cpu_or_gpu_for_the_worker(build: tuple[str, list[dict]]) -> None:
    name, resources = build
    spec = one(resources, "Deployment", "dfm-worker")["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    resources_ = container["resources"]
    gpu = {k: v for part in resources_.values() for k, v in part.items() if k == "nvidia.com/gpu"}
    device = flag_value(container["args"], "--device")
    if name == "gpu":
        assert resources_["limits"]["nvidia.com/gpu"] == 1 == resources_["requests"]["nvidia.com/gpu"]
        assert container["image"].endswith("-cuda") and device == "cuda"
        assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    else:
        assert not gpu, f"{name}: the worker must not ask for a GPU"
        assert container["image"].endswith("-cpu") and device in ("cpu", "auto")
    if name == "cpu":
        assert resources_["requests"]["cpu"] == resources_["limits"]["cpu"], "whole, guaranteed cores"


def test_sentinel_overlay_sends_every_process_through_the_sentinels(build: tuple[str, list[dict]]) -> None:
    from dfm_stream.connect import parse_sentinel_url

    name, resources = build
    if name != "sentinel":
        pytest.skip("only the sentinel overlay runs Redis Sentinel")
    sentinels = one(resources, "StatefulSet", "dfm-redis-sentinel")
    script = sentinels["spec"]["template"]["spec"]["containers"][0]["command"][2]
    (monitor,) = re.findall(r"sentinel monitor (\S+) \S+ 6379 (\d+)", script)
    assert monitor[1] == "2" and sentinels["spec"]["replicas"] == 3, "quorum 2 of 3"
    redis_sts = one(resources, "StatefulSet", "dfm-redis")
    assert redis_sts["spec"]["replicas"] >= 2
    redis_cmd = redis_sts["spec"]["template"]["spec"]["containers"][0]
    assert "args" not in redis_cmd and "--min-replicas-to-write 1" in redis_cmd["command"][2]
    seen = set()
    for res, _, container in dfm_containers(resources):
        env = {e["name"]: e.get("value") for e in container["env"]}
        target = parse_sentinel_url(env["DFM_REDIS_URL"])
        assert target.service == monitor[0] and len(target.sentinels) == 3, ident(res)
        for host, port in target.sentinels:
            check_sentinel_pod_address(f"{host}.{namespace_of(res)}.svc:{port}", namespace_of(res), resources)
        assert env["DFM_DURABILITY"] == "replicated", ident(res)
        seen.add(container["args"][0])
    assert seen == {"read", "work", "console", "bridge"}
    (so,) = of_kind(resources, "ScaledObject")
    assert {t["metadata"]["sentinelMaster"] for t in so["spec"]["triggers"]} == {monitor[0]}


def test_the_bridge_serves_plcs_through_its_service_with_secrets_from_a_secret(
    build: tuple[str, list[dict]],
) -> None:
    _, resources = build
    deployment = one(resources, "Deployment", "dfm-bridge")
    spec = deployment["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    args = bridge_args(container["args"], ident(deployment))
    assert args.opcua.startswith(f"opc.tcp://0.0.0.0:{BRIDGE_PORTS['opcua']}/")
    assert args.modbus == f"0.0.0.0:{BRIDGE_PORTS['modbus']}"
    assert not args.opcua_anonymous, "OPC UA must not be open to anonymous clients as shipped"
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert named == {"metrics": METRICS_PORTS["bridge"], **BRIDGE_PORTS}
    service = one(resources, "Service", "dfm-bridge")
    assert {p["targetPort"]: p["port"] for p in service["spec"]["ports"]} == named
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    for option in ("mqtt_password_file", "opcua_users"):
        path = Path(getattr(args, option))
        volume = volumes[mounts[str(path.parent)]["name"]]
        secret = one(resources, "Secret", volume["secret"]["secretName"])
        items = {i["path"]: i["key"] for i in volume["secret"]["items"]}
        assert items[path.name] in secret["stringData"], f"{option}: no key {path.name} in the Secret"
    assert not any(a.startswith("mqtt://") and ":" in a.split("@")[0][7:] for a in container["args"]), (
        "no password in the MQTT URL"
    )
    pki = mounts[args.opcua_pki]
    assert not pki.get("readOnly"), "the OPC UA certificate is created on first start"
    claim = volumes[pki["name"]]["persistentVolumeClaim"]["claimName"]
    one(resources, "PersistentVolumeClaim", claim)  # kept across restarts: clients trust it once
    assert cameras_of(resources).bridge.cameras.split(",") == [c.id for c in cameras_of(resources).cameras]


def namespace_of(res: dict) -> str:
    return res["metadata"]["namespace"]


def cameras_of(resources: list[dict]) -> Any:
    (cm,) = of_kind(resources, "ConfigMap")
    return config_from_dict(tomllib.loads(cm["data"]["cameras.toml"]), "ConfigMap dfm-cameras", env={})


def test_each_camera_of_the_configmap_has_a_reader_and_a_service(build: tuple[str, list[dict]]) -> None:
    _, resources = build
    config = cameras_of(resources)
    assert config.cameras
    readers = {
        flag_value(c["args"], "--camera"): res
        for res, _, c in dfm_containers(resources)
        if c["args"][0] == "read"
    }
    assert set(readers) == {c.id for c in config.cameras}
    for cam, deployment in readers.items():
        assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate", (
            cam
        )
    for svc in of_kind(resources, "Service"):
        pods = [
            spec
            for res, spec in pod_specs(resources)
            if svc["spec"]["selector"].items() <= res["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert pods, f"Service {svc['metadata']['name']} selects no pods"
        named = {p.get("name") for spec in pods for c in spec["containers"] for p in c["ports"]}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in named, f"Service {svc['metadata']['name']}: {port['targetPort']}"


# --- KEDA: ScaledObject and TriggerAuthentication, checked against KEDA's documented fields ---

REDIS_STREAMS_ADDRESS = ("address", "host", "addressFromEnv", "hostFromEnv")
REDIS_STREAMS_TARGETS = ("pendingEntriesCount", "streamLength", "lagCount")
REDIS_STREAMS_FIELDS = {
    *REDIS_STREAMS_ADDRESS,
    *REDIS_STREAMS_TARGETS,
    "port",
    "portFromEnv",
    "stream",
    "consumerGroup",
    "activationLagCount",
    "databaseIndex",
    "enableTLS",
    "unsafeSsl",
    "usernameFromEnv",
    "passwordFromEnv",
}
"""The metadata of KEDA's redis-streams trigger (keda.sh/docs/latest/scalers/redis-streams)."""
REDIS_SENTINEL_STREAMS_ADDRESS = ("addresses", "hosts")
REDIS_SENTINEL_STREAMS_FIELDS = {
    *(REDIS_STREAMS_FIELDS - {*REDIS_STREAMS_ADDRESS, "port", "portFromEnv"}),
    *REDIS_SENTINEL_STREAMS_ADDRESS,
    "ports",
    "sentinelMaster",
    "sentinelMasterFromEnv",
    "sentinelUsernameFromEnv",
    "sentinelPasswordFromEnv",
}
"""The metadata of KEDA's redis-sentinel-streams trigger (keda.sh/docs/latest/scalers/, same page name)."""


def check_scaled_object(so: dict, resources: list[dict]) -> None:
    """Check a ScaledObject against the fields KEDA's ScaledObject spec requires or defines."""
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    spec = so["spec"]
    target = spec["scaleTargetRef"]
    assert (
        target.get("kind", "Deployment") == "Deployment" and target.get("apiVersion", "apps/v1") == "apps/v1"
    )
    one(resources, "Deployment", target["name"])  # mandatory, in the same namespace
    lo, hi = spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100)
    assert isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi, (lo, hi)
    for field in ("pollingInterval", "cooldownPeriod"):
        assert isinstance(spec.get(field, 30), int) and spec.get(field, 30) > 0, field
    assert spec["triggers"], "a ScaledObject needs at least one trigger"
    for trigger in spec["triggers"]:
        check_redis_streams_trigger(trigger, so["metadata"]["namespace"], resources)


def check_redis_streams_trigger(trigger: dict, namespace: str, resources: list[dict]) -> None:
    kind = trigger["type"]
    assert kind in ("redis-streams", "redis-sentinel-streams"), kind
    sentinel = kind == "redis-sentinel-streams"
    fields = REDIS_SENTINEL_STREAMS_FIELDS if sentinel else REDIS_STREAMS_FIELDS
    meta = trigger["metadata"]
    assert all(isinstance(v, str) for v in meta.values()), f"trigger metadata values must be strings: {meta}"
    assert set(meta) <= fields, f"unknown {kind} fields {set(meta) - fields}"
    assert "stream" in meta, "the stream name is required"
    addresses = REDIS_SENTINEL_STREAMS_ADDRESS if sentinel else REDIS_STREAMS_ADDRESS
    assert any(k in meta for k in addresses), f"{kind}: one of {addresses} is required"
    if sentinel:
        assert "sentinelMaster" in meta or "sentinelMasterFromEnv" in meta, "the sentinels' service name"
        for address in meta.get("addresses", "").split(","):
            check_sentinel_pod_address(address, namespace, resources)
    assert "consumerGroup" in meta, "without a consumerGroup KEDA scales on stream length, not on our backlog"
    targets = [k for k in REDIS_STREAMS_TARGETS if k in meta]
    assert len(targets) == 1 and meta[targets[0]].isdigit() and int(meta[targets[0]]) > 0, targets
    if "lagCount" in meta:
        assert meta.get("activationLagCount", "0").isdigit()
    if "address" in meta:  # the KEDA operator dials it from its own namespace: the full name
        host, _, port = meta["address"].rpartition(":")
        svc_name, svc_ns, *_ = host.split(".")
        assert svc_ns == namespace, f"{meta['address']} must name the namespace"
        svc = one(resources, "Service", svc_name)
        assert int(port) in {p["port"] for p in svc["spec"]["ports"]}
    auth = trigger["authenticationRef"]
    ta = one(resources, auth.get("kind", "TriggerAuthentication"), auth["name"])
    assert ta["metadata"]["namespace"] == namespace
    for ref in ta["spec"]["secretTargetRef"]:
        assert ref["parameter"] in (
            *("username", "password", "host", "port", "address"),
            *("sentinelUsername", "sentinelPassword", "sentinelMaster"),
        )
        secret = one(resources, "Secret", ref["name"])
        assert ref["key"] in {**secret.get("data", {}), **secret.get("stringData", {})}, ref


def check_sentinel_pod_address(address: str, namespace: str, resources: list[dict]) -> None:
    """``pod.service.namespace.svc:port`` of a StatefulSet pod behind a headless Service."""
    host, _, port = address.strip().rpartition(":")
    pod, svc_name, svc_ns, *_ = host.split(".")
    assert svc_ns == namespace, f"{address} must name the namespace"
    svc = one(resources, "Service", svc_name)
    assert svc["spec"].get("clusterIP") == "None", f"{address}: pod names need a headless Service"
    assert int(port) in {p["port"] for p in svc["spec"]["ports"]}, address
    sts = [r for r in of_kind(resources, "StatefulSet") if r["spec"]["serviceName"] == svc_name]
    assert len(sts) == 1, f"{address}: no StatefulSet behind {svc_name}"
    name, _, index = pod.rpartition("-")
    assert name == sts[0]["metadata"]["name"] and int(index) < sts[0]["spec"]["replicas"], address


def test_keda_scales_the_workers_on_the_lag_of_every_cameras_frame_stream(
    build: tuple[str, list[dict]],
) -> None:
    name, resources = build
    (so,) = of_kind(resources, "ScaledObject")
    check_scaled_object(so, resources)
    assert so["spec"]["scaleTargetRef"]["name"] == "dfm-worker"
    config = cameras_of(resources)
    streams = {t["metadata"]["stream"]: t["metadata"] for t in so["spec"]["triggers"]}
    expected = {keys.frames_key(c.id, config.redis.prefix) for c in config.cameras}
    assert set(streams) == expected, "one trigger per camera frame stream (a trigger watches one stream)"
    assert {m["consumerGroup"] for m in streams.values()} == {config.worker.group}
    if name == "gpu":
        assert so["spec"]["maxReplicaCount"] <= 4


def test_the_scaledobject_check_rejects_what_keda_would(build: tuple[str, list[dict]]) -> None:
    _, resources = build
    (so,) = of_kind(resources, "ScaledObject")
    broken = [
        ("stream", None),
        ("lagCount", 20),  # not a string
        ("address", "dfm-redis:6379"),  # short name: unresolvable from KEDA's namespace
        ("consumerGroup", None),
        ("lagCunt", "20"),
    ]
    for key, value in broken:
        bad = copy.deepcopy(so)
        meta = bad["spec"]["triggers"][0]["metadata"]
        meta.pop(key, None) if value is None else meta.__setitem__(key, value)
        with pytest.raises((AssertionError, KeyError, ValueError)):
            check_scaled_object(bad, resources)
    bad = copy.deepcopy(so)
    bad["spec"]["scaleTargetRef"]["name"] = "nope"
    with pytest.raises(AssertionError):
        check_scaled_object(bad, resources)


# --- Prometheus Operator: PodMonitors ---


def test_podmonitors_select_the_pods_and_name_the_scrape_jobs(build: tuple[str, list[dict]]) -> None:
    _, resources = build
    jobs = {job["job_name"] for job in load_yaml(DEPLOY / "prometheus" / "prometheus.yml")["scrape_configs"]}
    covered = set()
    for pm in of_kind(resources, "PodMonitor"):
        assert pm["apiVersion"] == "monitoring.coreos.com/v1"
        selector = pm["spec"]["selector"]["matchLabels"]
        pods = [
            (res, spec)
            for res, spec in pod_specs(resources)
            if selector.items() <= res["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert pods, f"PodMonitor {pm['metadata']['name']} selects no pods"
        for endpoint in pm["spec"]["podMetricsEndpoints"]:
            assert endpoint["path"] == "/metrics"
            for res, spec in pods:
                names = {p.get("name") for c in spec["containers"] for p in c.get("ports", [])}
                assert endpoint["port"] in names, f"{ident(res)} has no port {endpoint['port']}"
                covered.add(ident(res))
            job = [r["replacement"] for r in endpoint["relabelings"] if r.get("targetLabel") == "job"]
            assert job and job[0] in jobs, f"job {job} is not one the alert rules and dashboard use ({jobs})"
    readers_and_workers = {ident(r) for r, _, c in dfm_containers(resources) if c["args"][0] in METRICS_PORTS}
    assert readers_and_workers <= covered, readers_and_workers - covered


def test_our_kustomize_agrees_with_kubectl_kustomize_when_available() -> None:
    """Cross-check of the resolver above; kubectl is optional (not installed by scripts/setup.sh)."""
    import shutil

    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.skip("kubectl is not installed: the resolver above is the check")
    for name, directory in BUILDS.items():
        out = subprocess.run(
            [kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60, check=True
        ).stdout
        theirs = {ident(r): r for r in yaml.safe_load_all(out) if r}
        ours = {ident(r): r for r in kustomize(directory)}
        assert theirs.keys() == ours.keys(), name
        for key, res in ours.items():
            assert res == theirs[key], f"{name}: {key} differs from kubectl kustomize"
