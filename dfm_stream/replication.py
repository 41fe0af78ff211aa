"""Writes a replica confirmed (``--durability replicated``): the writes and ``WAIT 1`` in one round trip.

``WAIT`` counts the replicas that have every write made so far *on its own connection*, so it
must follow the writes on the connection that made them. On a single server (or the primary a
Sentinel names) that is a plain pipeline. On a Redis Cluster it is a pipeline to the primary that
holds the key's slot: the cluster client would send a bare ``WAIT`` to every primary, on other
connections, where it confirms nothing.

When that node no longer holds the slot (``MOVED``, ``ASK``, ``CLUSTERDOWN`` or ``TRYAGAIN``
after a failover) or cannot be reached, the cluster client's slot map is refreshed and the write
is reported as a ``ConnectionError``: every caller already retries those with backoff, and the
retry goes to the node that holds the slot now.
"""

import logging
from collections.abc import Callable
from typing import Any

import redis
from redis.client import Pipeline
from redis.cluster import RedisCluster
from redis.exceptions import AskError, ClusterDownError, TryAgainError

from dfm_stream.connect import REPLICA_WAIT_MS, RedisClient

log = logging.getLogger(__name__)

REPLICAS = 1
"""How many replicas must confirm a write before it counts."""

_SLOT_CHANGED = (AskError, ClusterDownError, TryAgainError)  # MovedError is an AskError
_UNREACHABLE = (redis.ConnectionError, redis.TimeoutError, OSError)


def write_confirmed(
    client: RedisClient, key: str, queue: Callable[[Pipeline], object]
) -> tuple[list[Any], bool]:
    """Send the writes ``queue`` adds to a pipeline, then ``WAIT``; return their replies and if confirmed.

    ``key`` names the slot every queued write touches (on a cluster they must share it, as a
    camera's keys do through their hash tag). Redis errors reach the caller; on a cluster a moved
    slot or a lost node reads as ``redis.ConnectionError`` after the slot map was refreshed.
    """
    if not isinstance(client, RedisCluster):
        return _execute(client.pipeline(transaction=False), queue)
    node = client.get_node_from_key(key)
    pipe = client.get_redis_connection(node).pipeline(transaction=False)
    try:
        return _execute(pipe, queue)
    except (*_SLOT_CHANGED, *_UNREACHABLE) as e:
        refresh_slots(client)
        raise redis.ConnectionError(f"cluster node {node.name} no longer serves {key!r}: {e}") from e


def _execute(pipe: Pipeline, queue: Callable[[Pipeline], object]) -> tuple[list[Any], bool]:
    queue(pipe)
    pipe.wait(REPLICAS, REPLICA_WAIT_MS)
    *replies, replicas = pipe.execute()
    return replies, int(replicas) >= REPLICAS


def refresh_slots(client: RedisCluster) -> None:
    """Ask the cluster again which node holds which slot (it may still be failing over: then later)."""
    try:
        client.nodes_manager.initialize()
    except (redis.RedisError, OSError) as e:
        log.debug("Redis Cluster: the slot map could not be refreshed yet (%s)", e)
