"""``dfm-stream bridge``: alarm events, camera state and part results to MQTT, OPC UA and Modbus TCP."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import socket
import threading
from typing import TYPE_CHECKING

from dfm_stream.connect import add_redis_args, connect, settings_with_config
from dfm_stream.errors import ConfigError
from dfm_stream.metrics import add_metrics_args
from dfm_stream.signals import stop_on_signals

if TYPE_CHECKING:
    from dfm_stream.bridge.core import Adapter
    from dfm_stream.config import RedisConfig

log = logging.getLogger(__name__)

DEFAULT_METRICS_PORT = 9403


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``bridge`` to ``subparsers``."""
    p = subparsers.add_parser(
        "bridge",
        help="deliver events and part results to MQTT / OPC UA / Modbus TCP; take inspection jobs",
        description="Read dfm:alarms and every camera's results through an own consumer group and "
        "deliver them at least once (acknowledged in Redis only after the far side confirmed), publish "
        "camera state, and start part inspection jobs asked for over each protocol.",
    )
    b = p.add_argument_group("bridge")
    b.add_argument("--config", help="TOML config: its [redis] and [bridge] sections (options win)")
    b.add_argument("--cameras", help="comma-separated camera ids (default: every camera in dfm:cameras)")
    b.add_argument("--group", help="consumer group (default dfm-bridge)")
    b.add_argument(
        "--name",
        help="consumer name, stable across restarts; each bridge of a pair its own (default bridge-<host>)",
    )
    b.add_argument(
        "--job-timeout", dest="job_timeout_s", type=float, help="seconds a job waits for frames (default 10)"
    )
    m = p.add_argument_group("MQTT")
    m.add_argument("--mqtt", help="broker URL: mqtt://[USER@]HOST[:PORT] or mqtts:// (TLS)")
    m.add_argument("--mqtt-prefix", help="topic prefix (default dfm)")
    m.add_argument("--mqtt-qos", type=int, help="QoS of events and results (default 1)")
    m.add_argument("--mqtt-protocol", choices=("3.1.1", "5"), help="MQTT version (default 5)")
    m.add_argument("--mqtt-client-id", help="client id (default dfm-bridge-<consumer name>)")
    m.add_argument("--mqtt-username", help="user name (or in the URL)")
    m.add_argument("--mqtt-password-file", help="file holding the password")
    m.add_argument("--mqtt-ca-file", help="CA bundle for mqtts://")
    m.add_argument("--mqtt-cert-file", help="client certificate for mqtts://")
    m.add_argument("--mqtt-key-file", help="client key for mqtts://")
    m.add_argument("--mqtt-scores", action="store_true", help="also publish per-frame scores")
    m.add_argument(
        "--mqtt-scores-rate", type=float, default=1.0, help="per-frame scores per second and camera"
    )
    mb = p.add_argument_group("Modbus TCP")
    mb.add_argument(
        "--modbus", help="serve Modbus TCP on HOST:PORT (e.g. 0.0.0.0:502); registers: docs/modbus.md"
    )
    mb.add_argument("--modbus-cameras", help="cameras of the register blocks, in order (default: --cameras)")
    o = p.add_argument_group("OPC UA")
    o.add_argument("--opcua", help="serve OPC UA on this endpoint, e.g. opc.tcp://0.0.0.0:4840/dfm/")
    o.add_argument("--opcua-cameras", help="cameras in the address space (default: --cameras)")
    o.add_argument("--opcua-users", help="file of user:password lines (Basic256Sha256 Sign&Encrypt)")
    o.add_argument(
        "--opcua-anonymous",
        action="store_true",
        default=None,
        help="also allow anonymous, unencrypted access",
    )
    o.add_argument("--opcua-cert", help="server certificate (DER); default: created in --opcua-pki")
    o.add_argument("--opcua-key", help="server private key (PEM) of --opcua-cert")
    o.add_argument("--opcua-pki", help="where the created certificate is kept (default opcua-pki)")
    add_redis_args(p)
    add_metrics_args(p, default_port=DEFAULT_METRICS_PORT)
    p.set_defaults(func=run)


def _with_config(args: argparse.Namespace) -> RedisConfig | None:
    """Fill the options not given on the command line from ``[bridge]`` (or its defaults)."""
    from dfm_stream.config import BridgeConfig, load_config

    config = load_config(args.config) if args.config else None
    section = config.bridge if config is not None else BridgeConfig()
    for f in dataclasses.fields(BridgeConfig):
        if getattr(args, f.name, None) is None:
            value = getattr(section, f.name)
            setattr(args, f.name, value if value != "" else None)
    args.name = args.name or f"bridge-{socket.gethostname()}"
    return config.redis if config is not None else None


def _adapters(args: argparse.Namespace) -> list[Adapter]:
    adapters: list[Adapter] = []
    if args.mqtt:
        from dfm_stream.bridge.mqtt import MqttAdapter, MqttSettings

        adapters.append(
            MqttAdapter(
                MqttSettings(
                    url=args.mqtt,
                    prefix=args.mqtt_prefix,
                    qos=args.mqtt_qos,
                    protocol=args.mqtt_protocol,
                    client_id=args.mqtt_client_id or f"dfm-{args.name}",
                    username=args.mqtt_username,
                    password_file=args.mqtt_password_file,
                    ca_file=args.mqtt_ca_file,
                    cert_file=args.mqtt_cert_file,
                    key_file=args.mqtt_key_file,
                    scores=args.mqtt_scores,
                    scores_rate=args.mqtt_scores_rate,
                )
            )
        )
    if args.modbus:
        from dfm_stream.bridge.modbus import ModbusAdapter

        cameras = args.modbus_cameras or args.cameras or ""
        adapters.append(ModbusAdapter(args.modbus, [c for c in cameras.split(",") if c]))
    if args.opcua:
        from dfm_stream.bridge.opcua import OpcuaAdapter, OpcuaSettings

        cameras = args.opcua_cameras or args.cameras or ""
        settings = OpcuaSettings(
            endpoint=args.opcua,
            cameras=[c for c in cameras.split(",") if c],
            anonymous=args.opcua_anonymous,
            users_file=args.opcua_users,
            cert_file=args.opcua_cert,
            key_file=args.opcua_key,
            pki_dir=args.opcua_pki,
        )
        adapters.append(OpcuaAdapter(settings))
    return adapters


def run(args: argparse.Namespace) -> int:
    """Run the bridge until SIGTERM/SIGINT."""
    from dfm_stream.bridge.core import Bridge, BridgeMetrics, BridgeSettings
    from dfm_stream.metrics import new_registry, serve

    with stop_on_signals(threading.Event(), "stopping the bridge") as stop:
        config_redis = _with_config(args)
        adapters = _adapters(args)
        if not adapters:
            raise ConfigError("bridge: give at least one of --mqtt, --opcua, --modbus")
        redis_settings = settings_with_config(args, config_redis)
        cameras = [c for c in args.cameras.split(",") if c] if args.cameras else None
        settings = BridgeSettings(
            prefix=redis_settings.prefix,
            group=args.group,
            name=args.name,
            cameras=cameras,
            job_timeout_s=args.job_timeout_s,
        )
        registry = new_registry()
        client = connect(redis_settings)
        bridge = Bridge(client, adapters, settings, BridgeMetrics.create(registry))
        bridge.stop_event = stop
        server = None
        if args.metrics_port >= 0:
            server = serve(registry, args.metrics_host, args.metrics_port, ready=bridge.ready)
        log.info("bridge %s: %s", args.name, ", ".join(a.protocol for a in adapters))
        try:
            bridge.run()
        finally:
            if server is not None:
                server.close()
            client.close()
    return 0
