"""``dfm-stream model ...`` end to end: real subprocesses against a real redis-server."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import redis
from registry_helpers import tiny_artifact
from support import Processes

from dfm_stream.artifact import read_info
from dfm_stream.registry import ModelRef, ModelRegistry

TIMEOUT_S = 120


def _run(procs: Processes, name: str, *args: str) -> tuple[int, str]:
    """Run one ``dfm-stream`` command to completion; return its exit code and output."""
    proc = procs.dfm(*args, name=name)
    try:
        code = proc.wait(TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return code, procs.log(proc)


def _json(output: str) -> object:
    """The JSON document a ``--json`` command printed (its last non-log line)."""
    lines = [line for line in output.splitlines() if line.startswith(("{", "["))]
    return json.loads(lines[-1])


def test_push_list_show_rollback_assign_pull(
    procs: Processes, redis_url: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    first, second = tmp_path / "v1.dfm", tmp_path / "v2.dfm"
    first.write_bytes(tiny_artifact("layer1"))
    second.write_bytes(tiny_artifact("layer2"))
    r = ("--redis", redis_url)

    code, out = _run(procs, "push1", "model", "push", *r, "--name", "bottle", "--file", str(first))
    assert code == 0, out
    assert "pushed bottle version 1" in out
    assert hashlib.sha256(first.read_bytes()).hexdigest() in out
    code, out = _run(procs, "push2", "model", "push", *r, "--name", "bottle", "--file", str(second), "--json")
    assert code == 0, out
    pushed = _json(out)
    assert pushed["version"] == 2 and pushed["layer"] == "layer2"

    code, out = _run(procs, "list", "model", "list", *r, "--json")
    assert code == 0, out
    assert _json(out) == [
        {"name": "bottle", "current": 2, "versions": [1, 2], "candidates": [], "cameras": []}
    ]

    code, out = _run(procs, "rollback", "model", "rollback", "bottle", *r)
    assert code == 0, out
    assert "current version is now 1 (was 2)" in out
    code, out = _run(procs, "rollback-to", "model", "rollback", "bottle", "--to", "2", *r, "--json")
    assert code == 0, out
    assert _json(out) == {"name": "bottle", "current": 2, "previous": 1}

    code, out = _run(procs, "assign", "model", "assign", *r, "--camera", "cam1", "--model", "bottle@1")
    assert code == 0, out
    assert "camera cam1 -> bottle@1" in out
    assert ModelRegistry(redis_client).resolve("cam1") == ModelRef("bottle", 1)

    code, out = _run(procs, "show", "model", "show", "bottle", *r)
    assert code == 0, out
    shown = json.loads(out[out.index("{") :])
    assert shown["current"] == 2
    assert [v["version"] for v in shown["versions"]] == [1, 2]
    assert shown["cameras"] == {"cam1": "bottle@1"}

    pulled = tmp_path / "pulled.dfm"
    code, out = _run(procs, "pull", "model", "pull", "bottle@1", "--out", str(pulled), *r)
    assert code == 0, out
    assert pulled.read_bytes() == first.read_bytes()
    content_hash = read_info(first).content_hash
    assert f"file sha256 {hashlib.sha256(first.read_bytes()).hexdigest()}, content hash {content_hash}" in out

    code, out = _run(procs, "unassign", "model", "unassign", *r, "--camera", "cam1")
    assert code == 0, out
    assert ModelRegistry(redis_client).resolve("cam1") is None

    # the same bytes again: no version 3; version 1 is current again, and the output says so
    code, out = _run(procs, "push-again", "model", "push", *r, "--name", "bottle", "--file", str(pulled))
    assert code == 0, out
    assert "byte-identical to bottle version 1: no new version stored (now current again, was 2)" in out
    assert f"file sha256 {hashlib.sha256(first.read_bytes()).hexdigest()}, content hash " in out
    code, out = _run(
        procs, "push-same", "model", "push", *r, "--name", "bottle", "--file", str(first), "--json"
    )
    assert code == 0, out
    assert {k: _json(out)[k] for k in ("version", "created", "previous_current")} == {
        "version": 1,
        "created": False,
        "previous_current": 1,
    }
    assert [v.version for v in ModelRegistry(redis_client).versions("bottle")] == [1, 2]


def test_bad_push_is_refused_without_storing_anything(
    procs: Processes, redis_url: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    data = tiny_artifact("layer1")
    truncated = tmp_path / "truncated.dfm"
    truncated.write_bytes(data[: len(data) // 3])
    code, out = _run(
        procs, "bad", "model", "push", "--redis", redis_url, "--name", "bottle", "--file", str(truncated)
    )
    assert code == 2, out
    assert f"error: refused to push model 'bottle' from {truncated}" in out
    assert "truncated" in out
    assert "Traceback" not in out
    assert redis_client.keys("*") == []

    code, out = _run(
        procs, "missing", "model", "push", "--redis", redis_url, "--name", "bottle", "--file", "/nonexistent"
    )
    assert code == 2, out
    assert "error: cannot read artifact /nonexistent" in out


def test_user_errors_exit_2_without_a_traceback(procs: Processes, redis_url: str) -> None:
    r = ("--redis", redis_url)
    cases = {
        "unknown-show": (("model", "show", "nothing", *r), "unknown model 'nothing'"),
        "unknown-assign": (("model", "assign", *r, "--camera", "c1", "--model", "x@2"), "unknown model 'x'"),
        "bad-ref": (("model", "assign", *r, "--camera", "c1", "--model", "x@y"), "bad model reference"),
        "no-redis": (("model", "list", "--redis", "redis://127.0.0.1:1/0"), "cannot reach Redis"),
    }
    for name, (args, message) in cases.items():
        code, out = _run(procs, name, *args)
        assert code == 2, (name, out)
        assert out.startswith("error: ") or "\nerror: " in out, (name, out)
        assert message in out, (name, out)
        assert "Traceback" not in out, (name, out)
