"""The TOML config: strict keys and types, defaults that work, environment overrides."""

import dataclasses
from pathlib import Path

import pytest

import dfm_stream.config as config_module
from dfm_stream.config import (
    SECTIONS,
    AlarmsConfig,
    CameraConfig,
    WorkerConfig,
    field_help,
    load_config,
)
from dfm_stream.errors import ConfigError


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cameras.toml"
    path.write_text(text)
    return path


def test_the_documented_example_loads(tmp_path: Path) -> None:
    doc = config_module.__doc__
    example = doc.split("::\n", 1)[1].split("\nEnvironment", 1)[0]
    text = "\n".join(line[4:] for line in example.splitlines())
    cfg = load_config(_write(tmp_path, text), env={})
    assert [c.id for c in cfg.cameras] == ["line1", "demo"]
    assert cfg.cameras[0].roi == (100, 50, 640, 480)
    assert cfg.cameras[0].model == "bolts@3"
    assert cfg.cameras[1].size == (256, 256)  # inherited from [reader]
    assert cfg.worker.batch_size == 16
    assert (cfg.alarms.k, cfg.alarms.n) == (2, 3)
    assert "pass" not in repr(cfg.redis)


def test_an_empty_file_gives_working_defaults(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, ""), env={})
    assert cfg.cameras == ()
    assert cfg.redis.prefix == "dfm"
    assert cfg.worker == WorkerConfig()
    assert cfg.alarms == AlarmsConfig()
    assert CameraConfig(id="a", source="0").auto_maxlen(10) == 100
    assert CameraConfig(id="a", source="0").auto_maxlen(2) == 50
    assert CameraConfig(id="a", source="0", maxlen=7).auto_maxlen(30) == 7


def test_every_field_has_a_description() -> None:
    for cls in (*SECTIONS.values(), CameraConfig):
        for name, text in field_help(cls).items():
            assert len(text) > 10, f"{cls.__name__}.{name} has no description"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("colour = 1\n", "'colour'"),
        ("[worker]\nbatchsize = 4\n", "'batchsize'"),
        ('[[cameras]]\nid = "a"\nsource = "0"\nfsp = 3\n', "'fsp'"),
    ],
)
def test_unknown_keys_name_the_key_and_the_file(tmp_path: Path, text: str, needle: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path, env={})
    assert needle in str(e.value)
    assert str(path) in str(e.value)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('[worker]\nbatch_size = "8"\n', "batch_size: expected an integer"),
        ("[reader]\njpeg_quality = 0\n", "jpeg_quality=0"),
        ('[reader]\nsize = "64by48"\n', "WxH"),
        ('[[cameras]]\nid = "a b"\nsource = "0"\n', "invalid camera id"),
        ('[[cameras]]\nid = "a"\n', "'source' is required"),
        ('[[cameras]]\nid = "a"\nsource = "0"\n[[cameras]]\nid = "a"\nsource = "1"\n', "repeated: a"),
        ("[alarms]\nk = 3\nn = 2\n", "1 <= k <= n"),
        ("[worker]\ndevice = 'gpu'\n", "device='gpu'"),
        ("[worker]\nbackend = 'tensorrt'\n", "backend='tensorrt' must be one of auto, eager"),
        ("[worker]\nprecision = 'int4'\n", "precision='int4'"),
        ("[worker]\nthreads = -2\n", "threads=-2 must be >= 0"),
        ("[reader\n", "not valid TOML"),
    ],
)
def test_bad_values_are_clear_errors(tmp_path: Path, text: str, needle: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path, env={})
    assert needle in str(e.value)
    assert str(path) in str(e.value)


def test_cameras_inherit_reader_defaults_and_override_them(tmp_path: Path) -> None:
    text = """
[reader]
fps = 5
jpeg_quality = 70
[[cameras]]
id = "a"
source = "0"
[[cameras]]
id = "b"
source = "1"
fps = 12.5
encoding = "raw"
roi = "1,2,30,40"
"""
    a, b = load_config(_write(tmp_path, text), env={}).cameras
    assert (a.fps, a.jpeg_quality, a.encoding) == (5.0, 70, "jpeg")
    assert (b.fps, b.jpeg_quality, b.encoding, b.roi) == (12.5, 70, "raw", (1, 2, 30, 40))


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    text = '[worker]\nbatch_size = 4\n[[cameras]]\nid = "line-1"\nsource = "0"\n'
    env = {
        "DFM_REDIS_URL": "redis://10.0.0.1:6380/2",
        "DFM_PREFIX": "plant7",
        "DFM__WORKER__BATCH_SIZE": "16",
        "DFM__WORKER__MAX_AGE_S": "2.5",
        "DFM__READER__SIZE": "64x48",
        "DFM__CAMERAS__LINE_1__SOURCE": "rtsp://cam/stream",
        "DFM__CAMERAS__LINE_1__LOOP": "yes",
        "UNRELATED": "x",
    }
    cfg = load_config(_write(tmp_path, text), env=env)
    assert cfg.redis.url == "redis://10.0.0.1:6380/2"
    assert cfg.redis.prefix == "plant7"
    assert (cfg.worker.batch_size, cfg.worker.max_age_s) == (16, 2.5)
    cam = cfg.camera("line-1")
    assert (cam.source, cam.loop, cam.size) == ("rtsp://cam/stream", True, (64, 48))


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"DFM__WORKER__BATCH_SIZE": "lots"}, "DFM__WORKER__BATCH_SIZE"),
        ({"DFM__WORKER__BATCHES": "3"}, "no key 'batches'"),
        ({"DFM__NOPE__X": "3"}, "DFM__NOPE__X"),
        ({"DFM__CAMERAS__GHOST__SOURCE": "0"}, "no camera 'GHOST'"),
        ({"DFM__CAMERAS__A__COLOUR": "red"}, "DFM__CAMERAS__A__COLOUR"),
        ({"DFM__CAMERAS__A__LOOP": "maybe"}, "not a boolean"),
    ],
)
def test_bad_environment_overrides_name_the_variable(tmp_path: Path, env: dict, needle: str) -> None:
    path = _write(tmp_path, '[[cameras]]\nid = "a"\nsource = "0"\n')
    with pytest.raises(ConfigError) as e:
        load_config(path, env=env)
    assert needle in str(e.value)


def test_a_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.toml", env={})


def test_camera_lookup_names_the_known_cameras(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, '[[cameras]]\nid = "a"\nsource = "0"\n'), env={})
    with pytest.raises(ConfigError, match=r"cameras: a"):
        cfg.camera("b")
    with pytest.raises(ConfigError, match="jpeg_quality"):
        dataclasses.replace(cfg.cameras[0], jpeg_quality=101)
