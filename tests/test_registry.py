"""The model registry against a real redis-server: versions, chunks, checksums, rollback, routing."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from pathlib import Path

import pytest
import redis
from redis.cluster import RedisCluster
from registry_helpers import tiny_artifact
from support import wait_until

from dfm_stream import keys
from dfm_stream.artifact import read_info
from dfm_stream.embedded_redis import EmbeddedRedis
from dfm_stream.errors import RegistryError
from dfm_stream.registry import ModelRef, ModelRegistry, VersionInfo


@pytest.fixture
def registry(redis_client: redis.Redis) -> ModelRegistry:
    return ModelRegistry(redis_client)


def _truncated() -> bytes:
    data = tiny_artifact("layer1")
    return data[: len(data) // 2]


def _tampered() -> bytes:
    data = bytearray(tiny_artifact("layer1"))
    data[-100] ^= 0xFF
    return bytes(data)


BAD_ARTIFACTS = {
    "truncated": _truncated,
    "tampered": _tampered,
    "not an artifact": lambda: b"just some text, not a model\n" * 10,
    "empty": lambda: b"",
}


def test_model_ref_parses_name_and_optional_version() -> None:
    assert ModelRef.parse("bottle") == ModelRef("bottle", None)
    assert ModelRef.parse("bottle@3") == ModelRef("bottle", 3)
    assert ModelRef.parse("bottle@v3") == ModelRef("bottle", 3)
    assert str(ModelRef("bottle", 3)) == "bottle@3"
    assert str(ModelRef("bottle", None)) == "bottle"
    for bad in ("", "@3", "bottle@", "bottle@x", "bottle@0", "a b", "{x}", "bottle@3@4"):
        with pytest.raises(RegistryError, match=r"NAME@VERSION|start at 1"):
            ModelRef.parse(bad)


def test_push_stores_versions_and_makes_the_newest_current(registry: ModelRegistry) -> None:
    first, second = tiny_artifact("layer1"), tiny_artifact("layer2")
    v1 = registry.push("bottle", first)
    v2 = registry.push("bottle", second)
    assert (v1.version, v2.version) == (1, 2)
    assert registry.names() == ["bottle"]
    assert registry.current("bottle") == 2
    assert [v.version for v in registry.versions("bottle")] == [1, 2]
    assert v2.layer == "layer2" and v1.layer == "layer1"
    assert v2.backbone == "resnet18" and v2.score_type == "fre" and v2.image_size == (64, 64)
    assert v2.sha256 == hashlib.sha256(second).hexdigest()
    assert v2.size == len(second)
    assert v2.content_hash == read_info(second).content_hash
    assert registry.version_info("bottle", 1) == v1
    shown = registry.show("bottle")
    assert shown["current"] == 2
    assert [v["version"] for v in shown["versions"]] == [1, 2]
    assert shown["cameras"] == {}
    json.dumps(shown)  # JSON-ready
    assert VersionInfo.from_json(json.dumps(v2.to_dict()), "test") == v2


def test_small_chunks_split_the_artifact_and_round_trip_byte_identical(redis_client: redis.Redis) -> None:
    data = tiny_artifact("layer1")
    registry = ModelRegistry(redis_client, chunk_size=100_000)
    info = registry.push("bottle", data)
    expected_chunks = -(-len(data) // 100_000)
    assert info.chunks == expected_chunks > 1
    assert redis_client.llen(keys.model_chunks_key("bottle", 1)) == expected_chunks
    assert registry.get_bytes("bottle", 1) == data
    # a registry with another chunk size reads it the same
    assert ModelRegistry(redis_client).get_bytes("bottle", 1) == data


@pytest.mark.parametrize("kind", list(BAD_ARTIFACTS))
def test_bad_push_is_refused_and_leaves_nothing_behind(
    registry: ModelRegistry, redis_client: redis.Redis, kind: str
) -> None:
    with pytest.raises(RegistryError, match=r"refused to push model 'bottle': "):
        registry.push("bottle", BAD_ARTIFACTS[kind]())
    assert redis_client.keys("*") == []
    good = registry.push("bottle", tiny_artifact("layer1"))
    generation = registry.generation()
    with pytest.raises(RegistryError, match="refused"):
        registry.push("bottle", BAD_ARTIFACTS[kind]())
    assert [v.version for v in registry.versions("bottle")] == [good.version]
    assert registry.current("bottle") == good.version
    assert registry.generation() == generation
    assert not redis_client.exists(keys.model_chunks_key("bottle", good.version + 1))


def test_bad_model_names_are_refused(registry: ModelRegistry) -> None:
    with pytest.raises(RegistryError, match="invalid model id"):
        registry.push("bad name{x}", tiny_artifact("layer1"))
    with pytest.raises(RegistryError, match="unknown model 'nothing'"):
        registry.versions("nothing")
    with pytest.raises(RegistryError, match="unknown model"):
        registry.current("nothing")


def test_get_bytes_detects_corrupt_and_missing_chunks(redis_client: redis.Redis) -> None:
    registry = ModelRegistry(redis_client, chunk_size=200_000)
    data = tiny_artifact("layer1")
    registry.push("bottle", data)
    chunks_key = keys.model_chunks_key("bottle", 1)
    chunk = bytearray(redis_client.lindex(chunks_key, 1))
    chunk[10] ^= 0x01
    redis_client.lset(chunks_key, 1, bytes(chunk))
    with pytest.raises(RegistryError, match=r"bottle@1 failed its checksum"):
        registry.get_bytes("bottle", 1)
    redis_client.rpop(chunks_key)
    with pytest.raises(RegistryError, match=r"bottle@1 is incomplete"):
        registry.get_bytes("bottle", 1)
    with pytest.raises(RegistryError, match=r"no version 5 \(versions: \[1\]\)"):
        registry.get_bytes("bottle", 5)


def test_rollback_defaults_to_the_previous_version_and_accepts_a_target(registry: ModelRegistry) -> None:
    for layer, seed in (("layer1", 0), ("layer2", 0), ("layer1", 1)):
        registry.push("bottle", tiny_artifact(layer, seed=seed))
    assert registry.current("bottle") == 3
    assert registry.rollback("bottle") == 2
    assert registry.rollback("bottle") == 1
    assert registry.current("bottle") == 1
    with pytest.raises(RegistryError, match="no version before the current one"):
        registry.rollback("bottle")
    assert registry.rollback("bottle", to=3) == 3
    with pytest.raises(RegistryError, match=r"no version 9"):
        registry.rollback("bottle", to=9)
    assert registry.current("bottle") == 3
    with pytest.raises(RegistryError, match="unknown model"):
        registry.rollback("nothing")
    # the next push numbers after the highest version, whatever is current
    registry.rollback("bottle", to=1)
    assert registry.push("bottle", tiny_artifact("layer2")).version == 4


def test_assign_resolves_pinned_and_current_versions(registry: ModelRegistry) -> None:
    registry.push("bottle", tiny_artifact("layer1"))
    registry.push("bottle", tiny_artifact("layer2"))
    registry.assign("cam1", ModelRef("bottle"))
    registry.assign("cam2", ModelRef("bottle", 1))
    assert registry.assignments() == {"cam1": ModelRef("bottle"), "cam2": ModelRef("bottle", 1)}
    assert registry.resolve("cam1") == ModelRef("bottle", 2)
    assert registry.resolve("cam2") == ModelRef("bottle", 1)
    assert registry.resolve("cam3") is None
    registry.rollback("bottle")
    assert registry.resolve("cam1") == ModelRef("bottle", 1)
    assert registry.show("bottle")["cameras"] == {"cam1": "bottle", "cam2": "bottle@1"}
    registry.unassign("cam2")
    assert registry.resolve("cam2") is None
    with pytest.raises(RegistryError, match="has no model assigned"):
        registry.unassign("cam2")


def test_assign_refuses_unknown_models_versions_and_cameras(registry: ModelRegistry) -> None:
    registry.push("bottle", tiny_artifact("layer1"))
    with pytest.raises(RegistryError, match="unknown model 'cable'"):
        registry.assign("cam1", ModelRef("cable"))
    with pytest.raises(RegistryError, match=r"model bottle has no version 7"):
        registry.assign("cam1", ModelRef("bottle", 7))
    with pytest.raises(RegistryError, match="invalid camera id"):
        registry.assign("cam:1", ModelRef("bottle"))
    assert registry.assignments() == {}


def test_every_change_bumps_the_generation_and_is_published(
    registry: ModelRegistry, redis_client: redis.Redis
) -> None:
    pubsub = redis_client.pubsub()
    pubsub.subscribe(registry.changes_channel)
    wait_until(lambda: pubsub.get_message(timeout=0.1), what="the subscribe confirmation")
    assert registry.generation() == 0
    registry.push("bottle", tiny_artifact("layer1"))
    registry.push("bottle", tiny_artifact("layer2"))
    registry.rollback("bottle")
    registry.assign("cam1", ModelRef("bottle"))
    registry.unassign("cam1")
    assert registry.generation() == 5
    messages: list[dict] = []

    def collect() -> bool:
        msg = pubsub.get_message(timeout=0.1)
        if msg and msg["type"] == "message":
            messages.append(json.loads(msg["data"]))
        return len(messages) == 5

    wait_until(collect, timeout=10, what="five change messages")
    pubsub.close()
    assert [m["event"] for m in messages] == ["push", "push", "rollback", "assign", "unassign"]
    assert [m["generation"] for m in messages] == [1, 2, 3, 4, 5]
    assert messages[2] == {"event": "rollback", "generation": 3, "model": "bottle", "version": 1}
    assert messages[3]["camera"] == "cam1"


def test_pushing_identical_bytes_stores_no_new_version(registry: ModelRegistry) -> None:
    first, second = tiny_artifact("layer1"), tiny_artifact("layer2")
    assert registry.push_result("bottle", first).created
    again = registry.push_result("bottle", first)
    assert (again.info.version, again.created, again.previous_current) == (1, False, 1)
    assert registry.generation() == 1, "nothing changed: nothing is announced"
    assert registry.push("bottle", second).version == 2
    back = registry.push_result("bottle", first)
    assert (back.info.version, back.created, back.previous_current) == (1, False, 2)
    assert registry.current("bottle") == 1
    assert [v.version for v in registry.versions("bottle")] == [1, 2]
    assert registry.generation() == 3, "making version 1 current again is announced"
    # another model keeps its own versions, even with the same bytes
    assert registry.push_result("cable", first).created


def test_concurrent_pushes_get_distinct_versions(redis_server: EmbeddedRedis) -> None:
    results: list[int] = []
    errors: list[BaseException] = []

    def push(layer: str, seed: int) -> None:
        client = redis.Redis.from_url(redis_server.url)
        try:
            results.append(ModelRegistry(client).push("bottle", tiny_artifact(layer, seed=seed)).version)
        except BaseException as e:
            errors.append(e)
        finally:
            client.close()

    for layer in ("layer1", "layer2"):  # build them before the race (four different artifacts)
        tiny_artifact(layer, seed=0), tiny_artifact(layer, seed=1)
    threads = [
        threading.Thread(target=push, args=(layer, seed)) for layer in ("layer1", "layer2") for seed in (0, 1)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert sorted(results) == [1, 2, 3, 4]
    registry = ModelRegistry(redis.Redis.from_url(redis_server.url))
    for info in registry.versions("bottle"):
        assert hashlib.sha256(registry.get_bytes("bottle", info.version)).hexdigest() == info.sha256


def test_prefixes_keep_deployments_apart(redis_client: redis.Redis) -> None:
    a, b = ModelRegistry(redis_client, prefix="a"), ModelRegistry(redis_client, prefix="b")
    a.push("bottle", tiny_artifact("layer1"))
    a.assign("cam1", ModelRef("bottle"))
    assert b.names() == []
    assert b.resolve("cam1") is None
    assert b.generation() == 0
    assert b.changes_channel != a.changes_channel


def _cluster_ports() -> int:
    """A free port P (<= 55535) whose cluster bus port P + 10000 is free too."""
    for _ in range(200):
        with socket.socket() as a, socket.socket() as b:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            if port > 55535:
                continue
            try:
                b.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
            return int(port)
    pytest.fail("no free port pair for a cluster node")


def _cluster_state(client: redis.Redis) -> str:
    state = client.cluster("info")["cluster_state"]
    return state.decode() if isinstance(state, bytes) else str(state)


def test_registry_works_on_a_redis_cluster(tmp_path: Path) -> None:
    server = EmbeddedRedis(
        port=_cluster_ports(),
        workdir=tmp_path,
        extra_args=["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"],
    )
    server.start()
    try:
        plain = redis.Redis.from_url(server.url)
        plain.execute_command("CLUSTER ADDSLOTS", *range(16384))
        wait_until(lambda: _cluster_state(plain) == "ok", what="the one-node cluster to be ok")
        plain.close()
        client = RedisCluster.from_url(server.url)
        registry = ModelRegistry(client, chunk_size=300_000)
        data = tiny_artifact("layer1")
        registry.push("bottle", data)
        registry.push("cable", tiny_artifact("layer2"))
        registry.push("bottle", tiny_artifact("layer1", seed=1))
        assert registry.rollback("bottle") == 1
        registry.assign("cam1", ModelRef("bottle"))
        assert registry.resolve("cam1") == ModelRef("bottle", 1)
        assert registry.get_bytes("bottle", 1) == data
        assert registry.names() == ["bottle", "cable"]
        assert registry.generation() == 5
        client.close()
    finally:
        server.close()


def test_version_metadata_from_a_newer_release_is_read_and_garbage_is_reported(
    registry: ModelRegistry, redis_client: redis.Redis
) -> None:
    info = registry.push("bottle", tiny_artifact("layer1"))
    key = keys.model_versions_key("bottle")
    redis_client.hset(key, "1", json.dumps({**info.to_dict(), "added_later": True}))
    assert registry.version_info("bottle", 1) == info
    redis_client.hset(key, "1", b"{not json")
    with pytest.raises(RegistryError, match=r"corrupt version metadata in dfm:\{model:bottle\}:versions"):
        registry.versions("bottle")
