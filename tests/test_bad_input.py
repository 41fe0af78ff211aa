"""Bad config files, bad command-line arguments, unknown cameras and unknown models: clear errors.

Each case runs the real ``dfm-stream`` command in a child process and checks what an operator sees:
exit code 2, an ``error: ...`` message that names the key, file, camera, model or option that is
wrong, no Python traceback, and no password from the command line. (Parser-level cases of ``read``
and the config loader's unit tests are in ``test_read_cli.py`` and ``test_config.py``; these are the
cross-command cases.) The cases run six at a time in one fixture, since most of their time is
Python and torch start-up. A wrong camera *model* is not a startup error for a worker -- the
registry may get that model later -- so there the check is a clear log line and a
``model_load_failed`` event, with the worker still alive.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from registry_helpers import tiny_artifact
from support import REPO, Processes, wait_until

from dfm_stream.keys import alarms_key
from dfm_stream.wire import EventMsg

NOWHERE = "redis://127.0.0.1:1/0"  # nothing listens there: a case that wrongly starts cannot do harm
SECRET = "s3cret-Pw"


@dataclass(frozen=True)
class Case:
    """One bad invocation; ``{config}`` and ``{model}`` in args and needles are filled in at run time."""

    id: str
    args: tuple[str, ...]
    needles: tuple[str, ...]
    config: str | None = None
    env: tuple[tuple[str, str], ...] = ()
    xfail: str | None = None
    timeout: float = 60.0


CAMERA = '[[cameras]]\nid = "c1"\nsource = "synthetic:"\n'
CFG = ("--config", "{config}")
READ = ("read", "--redis", NOWHERE)
READ_ONE = ("read", "--camera", "c1", "--source", "synthetic:")
WORK = ("work", "--redis", NOWHERE, "--device", "cpu")
WORK_MODEL = (*WORK, "--model", "{model}")
WORK_C1 = (*WORK_MODEL, "--cameras", "c1")
_FOREIGN = "\x08\x00\x00\x00\x00\x00\x00\x00{}      "  # a valid, empty safetensors file

CASES = [
    # config files: the error names the file and the key
    Case("read-config-wrong-type", (*READ, *CFG), ("{config}", "[reader].fps", "'fast'"),
         '[reader]\nfps = "fast"\n' + CAMERA),
    Case("read-config-alarm-k-gt-n", (*READ, *CFG), ("{config}", "[alarms]", "k=3, n=2"),
         "[alarms]\nk = 3\nn = 2\n" + CAMERA),
    Case("read-config-bad-roi", (*READ, *CFG), ("{config}", "(c1)", "roi"), CAMERA + "roi = [1, 2]\n"),
    Case("work-config-wrong-type", (*WORK, *CFG), ("{config}", "[worker].batch_size"),
         '[worker]\nbatch_size = "x"\n'),
    Case("work-config-device", (*WORK, *CFG), ("{config}", "device='tpu'"), '[worker]\ndevice = "tpu"\n'),
    Case("work-config-camera-id", (*WORK, *CFG), ("{config}", "invalid camera id 'a b'"),
         '[[cameras]]\nid = "a b"\nsource = "synthetic:"\n'),
    Case("work-config-unknown-section", (*WORK, *CFG), ("{config}", "unknown key 'workers'"),
         "[workers]\nbatch_size = 2\n"),
    Case("work-config-claim-idle-0", (*WORK, *CFG), ("{config}", "claim_idle_s=0"),
         "[worker]\nclaim_idle_s = 0\n"),
    # environment overrides: the error names the variable
    Case("work-env-wrong-type", (*WORK, *CFG), ("DFM__WORKER__BATCH_SIZE", "'lots'"), CAMERA,
         env=(("DFM__WORKER__BATCH_SIZE", "lots"),)),
    Case("read-env-unknown-camera", (*READ, *CFG), ("DFM__CAMERAS__NOPE__FPS", "'NOPE'", "c1"), CAMERA,
         env=(("DFM__CAMERAS__NOPE__FPS", "3"),)),
    Case("read-env-unknown-key", (*READ, *CFG), ("DFM__READER__COLOUR", "'colour'"), CAMERA,
         env=(("DFM__READER__COLOUR", "red"),)),
    # unknown cameras, missing or broken model files
    Case("read-unknown-camera", (*READ, *CFG, "--camera", "c1,c9"),
         ("camera 'c9' is not in", "{config}", "c1, c2"), CAMERA + CAMERA.replace("c1", "c2")),
    Case("work-model-missing", (*WORK, "--model", "/no/such/model.safetensors", "--cameras", "c1"),
         ("/no/such/model.safetensors", "no such file")),
    Case("work-model-junk", (*WORK, "--model", "{config}", "--cameras", "c1"), ("{config}", "truncated"),
         "junk"),
    Case("work-model-foreign", (*WORK, "--model", "{config}", "--cameras", "c1"),
         ("{config}", "not a dfm-stream artifact"), _FOREIGN),
    # worker arguments
    Case("work-batch-size-type", (*WORK_MODEL, "--batch-size", "x"), ("argument --batch-size", "'x'")),
    Case("work-batch-size-0", (*WORK_C1, "--batch-size", "0"), ("--batch-size",)),
    Case("work-camera-id", (*WORK_MODEL, "--cameras", "ok,bad{{x}}"), ("invalid camera id 'bad{{x}}'",)),
    Case("work-device", (*WORK_C1, "--device", "tpu"), ("'tpu'",)),
    Case("work-alarm-k-gt-n", (*WORK_C1, "--alarm-k", "3", "--alarm-n", "2"), ("alarm",)),
    Case("work-max-age-negative", (*WORK_C1, "--max-age", "-5"), ("--max-age",)),
    Case("work-max-deliveries-0", (*WORK_C1, "--max-deliveries", "0"), ("--max-deliveries",)),
    Case("work-scores-maxlen-0", (*WORK_C1, "--scores-maxlen", "0"), ("--scores-maxlen",)),
    # Redis options: the error names the option, never the password
    Case("read-redis-scheme", (*READ_ONE, "--redis", f"http://u:{SECRET}@h:1/0"),
         ("unsupported Redis URL scheme", "u:***@")),
    Case("read-redis-bad-port", (*READ_ONE, "--redis", f"redis://u:{SECRET}@h:notaport/0"), ("notaport",)),
    Case("read-redis-missing-ca",
         (*READ_ONE, "--redis", f"rediss://u:{SECRET}@127.0.0.1:1/0", "--redis-ca", "/no/such/ca.pem"),
         ("/no/such/ca.pem",)),
    Case("work-redis-missing-password-file", (*WORK_C1, "--redis-password-file", "/no/pw"),
         ("/no/pw",)),
    # soak
    Case("soak-duration-0", ("soak", "--duration", "0"), ("--duration",)),
    Case("soak-cameras-type", ("soak", "--duration", "5", "--cameras", "many"), ("--cameras", "'many'")),
    Case("soak-model-missing", ("soak", "--duration", "5", "--model", "/no/such/m.safetensors"),
         ("/no/such/m.safetensors",)),
]  # fmt: skip


def dfm(args: list[str], env: dict[str, str], timeout: float) -> tuple[int | None, str]:
    """Run ``dfm-stream ARGS`` (metrics off for read/work); return (exit code or None on a hang, stderr)."""
    extra = ["--metrics-port", "-1"] if args[0] in ("read", "work") else []
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "dfm_stream.cli", *args, *extra],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=REPO,
            env={**os.environ, **env},
            check=False,
        )
    except subprocess.TimeoutExpired:
        return None, f"did not exit within {timeout} s: the bad input was accepted"
    return proc.returncode, proc.stderr


Outcomes = dict[str, tuple[int | None, str, dict[str, str]]]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> Outcomes:
    """Run every case, six at a time; return ``id -> (exit code, stderr, substitutions)``."""
    root = tmp_path_factory.mktemp("bad-input")
    model = root / "tiny.safetensors"
    model.write_bytes(tiny_artifact())
    jobs = {}
    for case in CASES:
        config = root / f"{case.id}.toml"
        if case.config is not None:
            config.write_bytes(case.config.encode("latin-1"))
        subs = {"config": str(config), "model": str(model)}
        timeout = 20.0 if case.xfail else case.timeout  # a known-accepted input just hangs: cut it short
        jobs[case.id] = ([a.format(**subs) for a in case.args], dict(case.env), timeout, subs)
    with ThreadPoolExecutor(max_workers=6) as pool:
        futures = {k: pool.submit(dfm, args, env, timeout) for k, (args, env, timeout, _) in jobs.items()}
        return {k: (*f.result(), jobs[k][3]) for k, f in futures.items()}


def assert_clear_error(code: int | None, err: str, *needles: str) -> None:
    """Exit 2, an ``error:`` (or argparse) message containing every needle, no traceback, no secret."""
    assert code == 2, f"exit code {code}, stderr:\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    assert SECRET not in err
    assert "error:" in err
    for needle in needles:
        assert needle in err, f"{needle!r} not in:\n{err[-3000:]}"


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(c, id=c.id, marks=[pytest.mark.xfail(strict=True, reason=c.xfail)] if c.xfail else [])
        for c in CASES
    ],
)
def test_bad_input_exits_2_with_a_message_naming_what_is_wrong(case: Case, outcomes: Outcomes) -> None:
    code, err, subs = outcomes[case.id]
    assert_clear_error(code, err, *(n.format(**subs) for n in case.needles))


def test_the_cases_cover_every_long_running_command() -> None:
    assert {c.args[0] for c in CASES} == {"read", "work", "soak"}
    assert len({c.id for c in CASES}) == len(CASES)


def _events(client: redis.Redis) -> list[EventMsg]:
    return [EventMsg.from_bytes(f[b"msg"]) for _, f in client.xrange(alarms_key())]


@pytest.mark.parametrize("model", ["ghost@3", "/no/such/dir/model.safetensors"], ids=["registry", "file"])
def test_unknown_camera_model_is_reported_and_the_worker_stays_up(
    tmp_path: Path, procs: Processes, redis_url: str, redis_client: redis.Redis, model: str
) -> None:
    config = tmp_path / "site.toml"
    config.write_text(f'[[cameras]]\nid = "line1"\nsource = "synthetic:"\nmodel = "{model}"\n')
    worker = procs.dfm("work", "--config", str(config), "--redis", redis_url, "--device", "cpu", name="w")
    failed = wait_until(
        lambda: [e for e in _events(redis_client) if e.type == "model_load_failed"],
        60,
        what="model_load_failed",
    )
    assert failed[0].camera == "line1" and failed[0].model == model
    assert failed[0].message
    log = procs.log(worker)
    assert "line1" in log and model in log
    assert worker.poll() is None, "a camera without a loadable model must not stop the worker"
    assert procs.stop(worker) == 0
