"""Shadow candidates, promote and camera rollback in a real Redis; the comparison's statistics."""

from __future__ import annotations

import numpy as np
import pytest
import redis
from registry_helpers import tiny_artifact

from dfm_stream import keys
from dfm_stream.errors import RegistryError
from dfm_stream.promotion import Promotions
from dfm_stream.registry import ModelRef, ModelRegistry
from dfm_stream.shadow import pearson, spearman


@pytest.fixture
def promotions(redis_client: redis.Redis) -> Promotions:
    registry = ModelRegistry(redis_client)
    registry.push("m", tiny_artifact("layer1", seed=0))
    registry.push("m", tiny_artifact("layer1", seed=0, data_seed=7))
    registry.rollback("m")  # current: m@1
    return Promotions(registry)


def test_promote_pins_the_candidate_and_camera_rollback_restores_what_the_camera_had(
    promotions: Promotions, redis_client: redis.Redis
) -> None:
    registry = promotions.registry
    registry.assign("cam1", ModelRef("m"))
    redis_client.hset(keys.shadow_stats_key("cam1"), "frames", 5)  # a comparison of an older candidate
    assert promotions.shadow("cam1", ModelRef("m", 2)) == ModelRef("m", 2)
    assert promotions.shadows() == {"cam1": ModelRef("m", 2)}
    assert not redis_client.exists(keys.shadow_stats_key("cam1")), "a new candidate starts a new comparison"

    switch = promotions.promote("cam1")
    assert (switch.before, switch.after) == (ModelRef("m"), ModelRef("m", 2))
    assert registry.assignments()["cam1"] == ModelRef("m", 2)
    assert promotions.shadows() == {}, "shadowing stops on promote"

    back = promotions.rollback("cam1")
    assert (back.before, back.after) == (ModelRef("m", 2), ModelRef("m"))
    assert registry.resolve("cam1") == ModelRef("m", 1)
    again = promotions.rollback("cam1")  # a second rollback re-applies what the first undid
    assert registry.assignments()["cam1"] == again.after == ModelRef("m", 2)


def test_rollback_of_a_first_assignment_unassigns_the_camera(promotions: Promotions) -> None:
    registry = promotions.registry
    with pytest.raises(RegistryError, match="no recorded earlier assignment"):
        promotions.rollback("cam2")
    registry.assign("cam2", ModelRef("m", 1))
    assert promotions.rollback("cam2").after is None
    assert "cam2" not in registry.assignments()
    assert promotions.rollback("cam2").after == ModelRef("m", 1)


def test_shadow_commands_refuse_what_cannot_be_done(promotions: Promotions) -> None:
    with pytest.raises(RegistryError, match="no shadow candidate"):
        promotions.promote("cam1")
    with pytest.raises(RegistryError, match="no shadow candidate"):
        promotions.unshadow("cam1")
    with pytest.raises(RegistryError, match="has no version 9"):
        promotions.shadow("cam1", ModelRef("m", 9))
    with pytest.raises(RegistryError, match="unknown model"):
        promotions.shadow("cam1", ModelRef("other"))
    with pytest.raises(RegistryError, match="invalid camera id"):
        promotions.shadow("bad camera", ModelRef("m", 2))
    assert promotions.shadow("cam1", ModelRef("m")) == ModelRef("m", 1), "NAME is pinned to its current"
    assert promotions.unshadow("cam1") == ModelRef("m", 1)


def test_correlations_match_numpy() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=200)
    y = 0.7 * x + rng.normal(size=200) * 0.5
    sums = {"sx": x.sum(), "sy": y.sum(), "sxx": (x * x).sum(), "syy": (y * y).sum(), "sxy": (x * y).sum()}
    assert pearson(200, sums) == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-9)
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    assert spearman(list(x), list(y)) == pytest.approx(np.corrcoef(rx, ry)[0, 1], abs=1e-9)
    assert spearman([1.0, 2.0, 2.0, 3.0], [1.0, 2.0, 2.0, 3.0]) == pytest.approx(1.0)
    assert pearson(1, sums) is None and spearman([1.0], [2.0]) is None
    assert spearman([1.0, 1.0], [1.0, 2.0]) is None
