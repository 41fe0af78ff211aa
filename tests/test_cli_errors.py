"""One error style everywhere (#15): every command answers a typical mistake with one line, exit 2.

Each case runs the real ``dfm-stream`` in a child process with a mistake an operator makes --
a bad number, a path that cannot be written, a taken metrics port, an unreachable Redis (a closed
loopback port), a wrong password, an unknown camera or model -- and checks what they see: exit
status 2, no traceback, stderr is exactly one line, and that line names the problem. A test also
checks that every subcommand of the parser has at least one case, so a new command gets one.
A bug of ours is the one exception: traceback, a line saying it is a bug, exit status 1.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
import redis
from registry_helpers import tiny_artifact
from support import REPO

from dfm_stream.cli import build_parser, main
from dfm_stream.embedded_redis import EmbeddedRedis
from dfm_stream.keys import scores_key

NOWHERE = "redis://127.0.0.1:1/0"  # a closed loopback port: Redis is unreachable
WRONG_PW = "wr0ng-Pw"


@dataclass(frozen=True)
class Case:
    """One mistake: ``{redis}``, ``{model}``, ``{tmp}``, ``{port}`` are filled in at run time."""

    id: str
    args: tuple[str, ...]
    needles: tuple[str, ...]


R = ("--redis", "{redis}")
NO_REDIS = ("--redis", NOWHERE)
MODEL = ("--model", "{model}")
IMAGES = ("--images", "{tmp}")
SYNTH = ("--camera", "c1", "--source", "synthetic:size=32x32")

CASES = [
    Case("no-command", (), ("required", "COMMAND")),
    Case("unknown-command", ("frobnicate",), ("invalid choice", "'frobnicate'")),
    # offline
    Case("fit-batch-size", ("fit", "--train", "{tmp}", "--out", "{tmp}/m.st", "--batch-size", "-1"),
         ("--batch-size", "-1")),
    Case("fit-train-missing", ("fit", "--train", "/no/such/train", "--out", "{tmp}/m.st"),
         ("/no/such/train",)),
    Case("fit-out-unwritable", ("fit", "--train", "{tmp}", "--out", "/proc/nope/m.st"),
         ("--out", "/proc/nope")),
    Case("score-batch-size", ("score", *MODEL, *IMAGES, "--out", "{tmp}/s.jsonl", "--batch-size", "0"),
         ("--batch-size", "0")),
    Case("score-out-unwritable", ("score", *MODEL, "--images", "{tmp}", "--out", "/proc/nope/u.jsonl"),
         ("--out", "/proc/nope")),
    Case("score-model-missing", ("score", "--model", "/no/m.st", *IMAGES, "--out", "{tmp}/s.jsonl"),
         ("/no/m.st",)),
    Case("eval-out-unwritable", ("eval", *MODEL, "--data", "{tmp}", "--out", "/proc/nope/eval"),
         ("--out", "/proc/nope")),
    Case("eval-batch-size", ("eval", *MODEL, "--data", "{tmp}", "--out", "{tmp}/eval", "--batch-size", "x"),
         ("--batch-size", "'x'")),
    Case("calibrate-batch-size", ("calibrate", *MODEL, "--data", "{tmp}", "--batch-size", "0"),
         ("--batch-size",)),
    Case("make-dataset-size", ("make-dataset", "--out", "{tmp}/ds", "--size", "0"), ("--size",)),
    Case("make-dataset-out-unwritable", ("make-dataset", "--out", "/proc/nope/ds"), ("--out", "/proc/nope")),
    # read
    Case("read-port-taken", ("read", *NO_REDIS, *SYNTH, "--metrics-port", "{port}"),
         ("127.0.0.1:{port}", "--metrics-port")),
    Case("read-roi-beyond-frame", ("read", *NO_REDIS, *SYNTH, "--roi", "0,0,64,16", "--metrics-port", "-1"),
         ("roi 0,0,64,16", "32x32")),
    Case("read-fps-negative", ("read", *NO_REDIS, *SYNTH, "--fps", "-3"), ("--fps",)),
    Case("read-no-source", ("read", *NO_REDIS, "--camera", "c1"), ("--source",)),
    Case("read-metrics-port-range", ("read", *NO_REDIS, *SYNTH, "--metrics-port", "70000"),
         ("--metrics-port",)),
    # work
    Case("work-port-taken",
         ("work", *NO_REDIS, *MODEL, "--cameras", "c1", "--device", "cpu", "--metrics-port", "{port}"),
         ("127.0.0.1:{port}", "--metrics-port")),
    Case("work-batch-size", ("work", *NO_REDIS, *MODEL, "--cameras", "c1", "--batch-size", "0"),
         ("--batch-size",)),
    Case("work-model-missing", ("work", *NO_REDIS, "--model", "/no/m.st", "--cameras", "c1"), ("/no/m.st",)),
    # alarms / scores
    Case("alarms-redis-unreachable", ("alarms", *NO_REDIS), ("cannot reach Redis", "127.0.0.1:1")),
    Case("alarms-cluster-unreachable", ("alarms", "--cluster", *NO_REDIS), ("Redis Cluster",)),
    Case("alarms-wrong-password", ("alarms", "--redis", "redis://dfm:" + WRONG_PW + "@{redis_host}/0"),
         ("refused the credentials", ":***@")),
    Case("alarms-since-garbage", ("alarms", *R, "--follow", "--since", "garbage"), ("--since", "'garbage'")),
    Case("alarms-count-0", ("alarms", *R, "--count", "0"), ("--count",)),
    Case("alarms-images-unwritable", ("alarms", *R, "--images", "/proc/nope/img"),
         ("--images", "/proc/nope")),
    Case("scores-redis-unreachable", ("scores", *NO_REDIS, "--camera", "c1"), ("cannot reach Redis",)),
    Case("scores-unknown-camera", ("scores", *R, "--camera", "nosuchcam"), ("'nosuchcam'", "c1")),
    Case("scores-since-garbage", ("scores", *R, "--camera", "c1", "--since", "1-x"), ("--since", "'1-x'")),
    Case("scores-bad-camera-id", ("scores", *R, "--camera", "a b"), ("invalid camera id 'a b'",)),
    # model registry
    Case("model-list-unreachable", ("model", "list", *NO_REDIS), ("cannot reach Redis",)),
    Case("model-push-missing-file", ("model", "push", *R, "--name", "m", "--file", "/no/f.st"),
         ("/no/f.st",)),
    Case("model-show-unknown", ("model", "show", *R, "nosuch"), ("nosuch",)),
    Case("model-rollback-to-0", ("model", "rollback", *R, "m", "--to", "0"), ("--to",)),
    Case("model-assign-bad-ref", ("model", "assign", *R, "--camera", "c1", "--model", "m@x"), ("'m@x'",)),
    Case("model-unassign-unreachable", ("model", "unassign", *NO_REDIS, "--camera", "c1"),
         ("cannot reach Redis",)),
    Case("model-shadow-unknown", ("model", "shadow", *R, "--camera", "c1", "--model", "nosuch@1"),
         ("nosuch",)),
    Case("model-compare-unreachable", ("model", "compare", *NO_REDIS, "--camera", "c1"),
         ("cannot reach Redis",)),
    Case("model-promote-no-candidate", ("model", "promote", *R, "--camera", "c1"), ("no shadow candidate",)),
    Case("quantize-model-missing", ("quantize", "/no/m.st", "{tmp}"), ("/no/m.st",)),
    Case("model-pull-unknown", ("model", "pull", *R, "nosuch", "--out", "{tmp}/p.st"), ("nosuch",)),
    # enrolment
    Case("enrol-unknown-model", ("enrol", *R, "--camera", "c1", "--model", "nosuch", "--out", "{tmp}/e"),
         ("unknown model 'nosuch'",)),
    Case("enrol-holdout-range", ("enrol", *R, "--camera", "c1", "--model", "m", "--holdout", "2"),
         ("--holdout",)),
    Case("enrol-since-garbage", ("enrol", *R, "--camera", "c1", "--model", "m", "--since", "yesterday"),
         ("--since", "'yesterday'")),
    # part inspections and the bridge
    Case("inspect-frames-0", ("inspect", *NO_REDIS, "--camera", "c1", "--part", "p", "--frames", "0"),
         ("--frames", "must be >= 1")),
    Case("inspect-redis-unreachable", ("inspect", *NO_REDIS, "--camera", "c1", "--part", "p"),
         ("redis_error",)),
    Case("results-redis-unreachable", ("results", *NO_REDIS, "--camera", "c1"), ("cannot reach Redis",)),
    Case("bridge-modbus-without-cameras", ("bridge", *NO_REDIS, "--modbus", "127.0.0.1:0"),
         ("--modbus", "--cameras")),
    # cameras
    Case("cameras-list-unreachable", ("cameras", "list", *NO_REDIS), ("cannot reach Redis",)),
    Case("cameras-remove-unknown", ("cameras", "remove", *R, "nosuch"), ("'nosuch'",)),
    # drift
    Case("drift-unknown-camera", ("drift", *R, "--camera", "nosuchcam"), ("'nosuchcam'", "c1")),
    Case("drift-redis-unreachable", ("drift", *NO_REDIS, "--camera", "c1"), ("cannot reach Redis",)),
    # console
    Case("console-port-range", ("console", *R, "--port", "70000"), ("--port", "70000")),
    Case("console-port-taken", ("console", *R, "--port", "{port}"), ("127.0.0.1:{port}", "--port")),
    Case("console-add-user-role", ("console", "add-user", "--users", "{tmp}/u.json", "--name", "x", "--role",
                                   "admin"), ("--role", "'admin'")),
    # demo, bench, soak
    Case("demo-cameras", ("demo", "--cameras", "9"), ("--cameras 9",)),
    Case("demo-duration-0", ("demo", "--duration", "0"), ("--duration",)),
    Case("demo-defect-rate", ("demo", "--defect-rate", "2"), ("--defect-rate",)),
    Case("bench-batch-size", ("bench", "--quick", "--batch-size", "0"), ("--batch-size",)),
    Case("bench-stages", ("bench", "--quick", "--stages", "nope"), ("--stages", "nope")),
    Case("soak-duration-0", ("soak", "--duration", "0"), ("--duration",)),
    Case("soak-model-missing", ("soak", "--duration", "5", "--model", "/no/m.st"), ("/no/m.st",)),
]  # fmt: skip


def _commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Yield every leaf command of ``parser`` (``("read",)``, ``("model", "push")``, ...)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield prefix
        return
    for name, child in subs[0].choices.items():
        yield from _commands(child, (*prefix, name))


def test_every_command_has_a_mistake_case() -> None:
    covered = {case.args[:2] for case in CASES} | {case.args[:1] for case in CASES}
    missing = [" ".join(cmd) for cmd in _commands(build_parser()) if cmd not in covered]
    assert missing == [], f"add a typical mistake for: {missing}"


Outcomes = dict[str, tuple[int | None, str, dict[str, str]]]


def _run(args: list[str]) -> tuple[int | None, str]:
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "dfm_stream.cli", *args],
            capture_output=True,
            text=True,
            timeout=90,
            cwd=REPO,
            env=dict(os.environ),
            check=False,
        )
    except subprocess.TimeoutExpired:
        return None, "did not exit within 90 s: the mistake was not reported"
    return proc.returncode, proc.stderr


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Outcomes]:
    """Run every case, four at a time, against one Redis that has scores for camera c1."""
    root = tmp_path_factory.mktemp("cli-errors")
    model = root / "tiny.safetensors"
    model.write_bytes(tiny_artifact())
    server = EmbeddedRedis(
        workdir=root / "redis", extra_args=["--user", "dfm", "on", ">right-Pw", "~*", "&*", "+@all"]
    )
    server.dir.mkdir()
    server.start(timeout=30)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        client = redis.Redis.from_url(server.url)
        client.xadd(scores_key("c1"), {"msg": b"x"})
        client.close()
        subs = {
            "{redis}": server.url,
            "{redis_host}": server.url.split("://", 1)[1].split("/", 1)[0],
            "{model}": str(model),
            "{port}": str(taken.getsockname()[1]),
        }

        def one(case: Case) -> tuple[str, tuple[int | None, str, dict[str, str]]]:
            tmp = root / case.id
            tmp.mkdir()
            fill = {**subs, "{tmp}": str(tmp)}
            args = [_fill(a, fill) for a in case.args]
            code, err = _run(args)
            return case.id, (code, err, fill)

        with ThreadPoolExecutor(max_workers=4) as pool:
            yield dict(pool.map(one, CASES))
    finally:
        taken.close()
        server.close()
        shutil.rmtree(root, ignore_errors=True)


def _fill(text: str, subs: dict[str, str]) -> str:
    for key, value in subs.items():
        text = text.replace(key, value)
    return text


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_a_mistake_is_one_line_and_exit_2(case: Case, outcomes: Outcomes) -> None:
    code, err, fill = outcomes[case.id]
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got {len(lines)}:\n{err}"
    assert code == 2, err
    assert lines[0].startswith("error: "), err
    for needle in case.needles:
        assert _fill(needle, fill) in lines[0], f"{needle!r} not in {lines[0]!r}"
    assert WRONG_PW not in err


def test_a_bug_prints_the_traceback_and_says_it_is_a_bug(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from dfm_stream.commands import soak

    def broken(args: argparse.Namespace) -> int:
        raise RuntimeError("an invariant of ours broke")

    monkeypatch.setattr(soak, "cmd_soak", broken)
    assert main(["soak", "--duration", "5"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: an invariant of ours broke" in err
    assert "this is a bug in dfm-stream" in err.strip().splitlines()[-1]
