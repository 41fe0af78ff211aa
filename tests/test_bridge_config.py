"""The ``[bridge]`` config section: the bridge's options from a file, the command line winning."""

import pytest

from dfm_stream.cli import build_parser
from dfm_stream.commands.bridge import _with_config
from dfm_stream.config import config_from_dict
from dfm_stream.errors import ConfigError

TOML = """
[redis]
url = "redis://10.0.0.9:6379/1"

[bridge]
cameras = "line1,line2"
mqtt = "mqtt://broker:1883"
mqtt_qos = 0
modbus = "0.0.0.0:5020"
opcua_anonymous = true
"""


def parse(*argv: str):
    return build_parser().parse_args(["bridge", *argv])


def test_options_come_from_the_bridge_section_unless_given(tmp_path):
    path = tmp_path / "site.toml"
    path.write_text(TOML)
    args = parse("--config", str(path), "--mqtt-qos", "2", "--name", "b7")
    redis = _with_config(args)
    assert redis.url == "redis://10.0.0.9:6379/1"
    assert (args.cameras, args.mqtt, args.modbus, args.opcua) == (
        "line1,line2",
        "mqtt://broker:1883",
        "0.0.0.0:5020",
        None,
    )
    assert (args.mqtt_qos, args.name, args.opcua_anonymous, args.group) == (2, "b7", True, "dfm-bridge")
    assert (args.mqtt_prefix, args.job_timeout_s, args.opcua_pki) == ("dfm", 10.0, "opcua-pki")


def test_without_a_config_the_defaults_apply():
    args = parse("--mqtt", "mqtt://127.0.0.1")
    assert _with_config(args) is None
    assert (args.mqtt_qos, args.mqtt_protocol, args.group, args.opcua_anonymous) == (
        1,
        "5",
        "dfm-bridge",
        False,
    )
    assert args.name.startswith("bridge-")


def test_the_section_is_checked_and_takes_environment_overrides():
    with pytest.raises(ConfigError, match="mqtt_qos=3"):
        config_from_dict({"bridge": {"mqtt_qos": 3}})
    with pytest.raises(ConfigError, match="unknown key 'mqttt'"):
        config_from_dict({"bridge": {"mqttt": "x"}})
    config = config_from_dict({}, env={"DFM__BRIDGE__MODBUS": "127.0.0.1:502"})
    assert config.bridge.modbus == "127.0.0.1:502"
