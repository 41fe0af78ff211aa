"""``dfm-stream bridge``: alarm events, camera state and part results to MQTT, OPC UA and Modbus TCP."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import socket
import threading
from typing import TYPE_CHECKING

from dfm_stream.commands.config_flags import add_section_flags, overlay
from dfm_stream.config import BridgeConfig, Config, settings_config
from dfm_stream.connect import add_redis_args, connect, settings_with_config
from dfm_stream.errors import ConfigError
from dfm_stream.metrics import add_metrics_args
from dfm_stream.signals import stop_on_signals

if TYPE_CHECKING:
    from dfm_stream.bridge.core import Adapter

log = logging.getLogger(__name__)

DEFAULT_METRICS_PORT = 9403
MQTT_FLAGS = tuple(f.name for f in dataclasses.fields(BridgeConfig) if f.name.startswith("mqtt"))
OPCUA_FLAGS = tuple(f.name for f in dataclasses.fields(BridgeConfig) if f.name.startswith("opcua"))
BRIDGE_FLAGS = tuple(f.name for f in dataclasses.fields(BridgeConfig))
"""Every ``[bridge]`` setting is also an option of ``dfm-stream bridge``."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``bridge`` to ``subparsers``."""
    p = subparsers.add_parser(
        "bridge",
        help="deliver events and part results to MQTT / OPC UA / Modbus TCP; take inspection jobs",
        description="Read dfm:alarms and every camera's results through an own consumer group and "
        "deliver them at least once (acknowledged in Redis only after the far side confirmed), publish "
        "camera state, and start part inspection jobs asked for over each protocol.",
    )
    b = p.add_argument_group("bridge (option > environment DFM__BRIDGE__KEY > [bridge] > default)")
    b.add_argument("--config", help="TOML config: its [redis] and [bridge] sections")
    add_section_flags(b, BridgeConfig, ("cameras", "group", "name", "job_timeout_s"))
    add_section_flags(p.add_argument_group("MQTT"), BridgeConfig, MQTT_FLAGS)
    add_section_flags(p.add_argument_group("Modbus TCP"), BridgeConfig, ("modbus", "modbus_cameras"))
    add_section_flags(p.add_argument_group("OPC UA"), BridgeConfig, OPCUA_FLAGS)
    add_redis_args(p)
    add_metrics_args(p, default_port=DEFAULT_METRICS_PORT)
    p.set_defaults(func=run)


def resolve(args: argparse.Namespace) -> tuple[Config, BridgeConfig]:
    """Return the config and its ``[bridge]`` with the options that were given laid over."""
    config = settings_config(args.config)
    return config, overlay(config.bridge, args, BRIDGE_FLAGS)


def _cameras(text: str) -> list[str]:
    return [c.strip() for c in text.split(",") if c.strip()]


def _adapters(section: BridgeConfig, name: str) -> list[Adapter]:
    adapters: list[Adapter] = []
    if section.mqtt:
        from dfm_stream.bridge.mqtt import MqttAdapter, MqttSettings

        adapters.append(
            MqttAdapter(
                MqttSettings(
                    url=section.mqtt,
                    prefix=section.mqtt_prefix,
                    qos=section.mqtt_qos,
                    protocol=section.mqtt_protocol,
                    client_id=section.mqtt_client_id or f"dfm-{name}",
                    username=section.mqtt_username or None,
                    password_file=section.mqtt_password_file or None,
                    ca_file=section.mqtt_ca_file or None,
                    cert_file=section.mqtt_cert_file or None,
                    key_file=section.mqtt_key_file or None,
                    scores=section.mqtt_scores,
                    scores_rate=section.mqtt_scores_rate,
                )
            )
        )
    if section.modbus:
        from dfm_stream.bridge.modbus import ModbusAdapter

        adapters.append(ModbusAdapter(section.modbus, _cameras(section.modbus_cameras or section.cameras)))
    if section.opcua:
        from dfm_stream.bridge.opcua import OpcuaAdapter, OpcuaSettings

        settings = OpcuaSettings(
            endpoint=section.opcua,
            cameras=_cameras(section.opcua_cameras or section.cameras),
            anonymous=section.opcua_anonymous,
            users_file=section.opcua_users or None,
            cert_file=section.opcua_cert or None,
            key_file=section.opcua_key or None,
            pki_dir=section.opcua_pki,
        )
        adapters.append(OpcuaAdapter(settings))
    return adapters


def run(args: argparse.Namespace) -> int:
    """Run the bridge until SIGTERM/SIGINT."""
    from dfm_stream.bridge.core import Bridge, BridgeMetrics, BridgeSettings
    from dfm_stream.metrics import new_registry, serve

    with stop_on_signals(threading.Event(), "stopping the bridge") as stop:
        config, section = resolve(args)
        name = section.name or f"bridge-{socket.gethostname()}"
        adapters = _adapters(section, name)
        if not adapters:
            raise ConfigError("bridge: give at least one of --mqtt, --opcua, --modbus")
        redis_settings = settings_with_config(args, config.redis)
        settings = BridgeSettings(
            prefix=redis_settings.prefix,
            group=section.group,
            name=name,
            cameras=_cameras(section.cameras) or None,
            job_timeout_s=section.job_timeout_s,
        )
        registry = new_registry()
        client = connect(redis_settings)
        bridge = Bridge(client, adapters, settings, BridgeMetrics.create(registry))
        bridge.stop_event = stop
        server = None
        if args.metrics_port >= 0:
            server = serve(registry, args.metrics_host, args.metrics_port, ready=bridge.ready)
        log.info("bridge %s: %s", name, ", ".join(a.protocol for a in adapters))
        try:
            bridge.run()
        finally:
            if server is not None:
                server.close()
            client.close()
    return 0
