"""Each setting is defined once (a field of a config section) and resolved by one rule everywhere:
command-line option > environment > config file > default, for every section and every command."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dfm_stream.cli import build_parser
from dfm_stream.commands import bridge, console, read, work
from dfm_stream.config import (
    SECTIONS,
    AlarmsConfig,
    BridgeConfig,
    CameraConfig,
    ConsoleConfig,
    ReaderConfig,
    RedisConfig,
    WorkerConfig,
    settings_config,
)
from dfm_stream.connect import REDIS_FLAGS, settings_with_config
from dfm_stream.errors import ConfigError

CAMERA = '[[cameras]]\nid = "a"\nsource = "synthetic:size=32x32"\n'


def _redis_prefix(args: Any) -> Any:
    return settings_with_config(args, settings_config(args.config).redis).prefix


@dataclasses.dataclass(frozen=True)
class Setting:
    """One setting of one section, as each of the four sources would give it."""

    section: str
    key: str
    command: str
    flag: str
    env: str
    values: tuple[str, str, str]  # file, environment, option (as written)
    expected: tuple[Any, Any, Any, Any]  # default, file, environment, option (as resolved)
    resolve: Callable[[Any], Any]


SETTINGS = [
    Setting(
        "redis",
        "prefix",
        "work",
        "--prefix",
        "DFM_PREFIX",
        ('"f"', "e", "o"),
        ("dfm", "f", "e", "o"),
        _redis_prefix,
    ),
    Setting(
        "reader",
        "jpeg_quality",
        "read",
        "--jpeg-quality",
        "DFM__READER__JPEG_QUALITY",
        ("50", "60", "70"),
        (90, 50, 60, 70),
        lambda a: read.select_cameras(a)[0][0].jpeg_quality,
    ),
    Setting(
        "worker",
        "batch_size",
        "work",
        "--batch-size",
        "DFM__WORKER__BATCH_SIZE",
        ("2", "3", "4"),
        (8, 2, 3, 4),
        lambda a: work.resolve(a)[1].batch_size,
    ),
    Setting(
        "alarms",
        "clear_after",
        "work",
        "--alarm-clear-after",
        "DFM__ALARMS__CLEAR_AFTER",
        ("2", "3", "4"),
        (5, 2, 3, 4),
        lambda a: work.resolve(a)[2].clear_after,
    ),
    Setting(
        "bridge",
        "mqtt_qos",
        "bridge",
        "--mqtt-qos",
        "DFM__BRIDGE__MQTT_QOS",
        ("0", "2", "1"),
        (1, 0, 2, 1),
        lambda a: bridge.resolve(a)[1].mqtt_qos,
    ),
    Setting(
        "console",
        "port",
        "console",
        "--port",
        "DFM__CONSOLE__PORT",
        ("8081", "8082", "8083"),
        (8080, 8081, 8082, 8083),
        lambda a: console.resolve(a)[1].port,
    ),
]


def _resolved(s: Setting, level: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    table = f"[{s.section}]\n{s.key} = {s.values[0]}\n" if level >= 1 else ""
    path = tmp_path / "site.toml"
    path.write_text(table + CAMERA)
    if level >= 2:
        monkeypatch.setenv(s.env, s.values[1])
    argv = [s.command, "--config", str(path), *((s.flag, s.values[2]) if level >= 3 else ())]
    return s.resolve(build_parser().parse_args(argv))


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.section)
@pytest.mark.parametrize("level", [0, 1, 2, 3], ids=["default", "file", "environment", "option"])
def test_each_source_overrides_the_ones_below_it(
    setting: Setting, level: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert _resolved(setting, level, tmp_path, monkeypatch) == setting.expected[level]


def test_every_section_has_a_precedence_case() -> None:
    assert {s.section for s in SETTINGS} == set(SECTIONS)


def test_an_option_given_with_the_default_value_still_beats_the_file(tmp_path: Path) -> None:
    path = tmp_path / "site.toml"
    path.write_text('[redis]\nurl = "redis://10.0.0.9:6379/1"\n[worker]\nbatch_size = 4\n')
    args = build_parser().parse_args(
        ["work", "--config", str(path), "--redis", "redis://127.0.0.1:6379/0", "--batch-size", "8"]
    )
    assert settings_with_config(args, settings_config(args.config).redis).url == "redis://127.0.0.1:6379/0"
    assert work.resolve(args)[1].batch_size == 8


def test_the_environment_applies_without_a_config_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DFM__WORKER__MAX_DELIVERIES", "7")
    monkeypatch.setenv("DFM__READER__FPS", "4")
    assert work.resolve(build_parser().parse_args(["work"]))[1].max_deliveries == 7
    cams, _ = read.select_cameras(build_parser().parse_args(["read", "--camera", "c", "--source", "0"]))
    assert cams[0].fps == 4.0


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["work", "--batch-size", "0"], "--batch-size 0: batch_size=0 must be >= 1"),
        (["work", "--alarm-k", "3", "--alarm-n", "2"], "--alarm-k 3, --alarm-n 2"),
        (["work", "--scores-maxlen", "50"], "--scores-maxlen 50"),
        (["bridge", "--mqtt-qos", "3"], "--mqtt-qos 3"),
        (["console", "--port", "70000"], "--port 70000"),
    ],
)
def test_an_option_the_section_refuses_is_named(argv: list[str], needle: str) -> None:
    args = build_parser().parse_args(argv)
    resolve = {"work": work.resolve, "bridge": bridge.resolve, "console": console.resolve}[argv[0]]
    with pytest.raises(ConfigError) as e:
        resolve(args)
    assert needle in str(e.value)


@pytest.mark.parametrize(
    ("section", "names", "not_options"),
    [
        (RedisConfig, REDIS_FLAGS, set()),
        (
            CameraConfig,
            read.CAMERA_FLAGS,
            {"id", "source", "model"},
        ),  # --camera, --source; model: config only
        (WorkerConfig, work.WORKER_FLAGS, {"model"}),  # --model is an artifact file for every camera
        (AlarmsConfig, work.ALARM_FLAGS, set()),
        (BridgeConfig, bridge.BRIDGE_FLAGS, set()),
        (ConsoleConfig, console.CONSOLE_FLAGS, set()),
    ],
)
def test_every_setting_of_a_section_is_also_an_option(section: type, names: tuple, not_options: set) -> None:
    assert {f.name for f in dataclasses.fields(section)} - set(names) == not_options


def test_camera_options_cover_every_reader_default() -> None:
    assert {f.name for f in dataclasses.fields(ReaderConfig)} <= set(read.CAMERA_FLAGS)
