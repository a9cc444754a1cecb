"""The registered final model says which rule chose it: tag and version description."""

from __future__ import annotations

import numpy as np
import pytest

from ratatouille.core.config import ConfigError, parse_config
from ratatouille.engine.models import build_classifier
from ratatouille.tracking.store import Tracker
from tiny import tiny_config


def test_the_model_version_carries_the_rule_as_tag_and_description(tmp_path):
    config = tiny_config(tmp_path)
    tracker = Tracker("final", config.tracking.mlflow_uri, entry_point="ratatouille run")
    tracker.start_parent(str(tmp_path / "run-1"), config.model_dump(mode="json"))
    run_id = tracker.reducer_run().info.run_id
    model = build_classifier("test_resnet", 3, seed=0).eval()
    why = "ratatouille_uniform: reduce.final_model=ratatouille_uniform (the paper's main method)"
    tags = {"strategy": "ratatouille_uniform", "selection_rule": "ratatouille_uniform"}
    example = np.zeros((1, 3, 16, 16), dtype=np.float32)
    version = tracker.log_final_model(
        run_id, model, "final-model", "model-rot30", tags, example, ["champion"], description=why
    )
    stored = tracker.client.get_model_version("final-model", version)
    assert stored.description == why
    assert stored.tags["selection_rule"] == "ratatouille_uniform"


@pytest.mark.parametrize("rule", ["", "ratatouile_uniform", "ensemble_soups", "ma"])
def test_config_refuses_a_rule_that_is_not_one_network_before_anything_trains(tmp_path, rule):
    raw = tiny_config(tmp_path).model_dump(mode="json")
    assert parse_config(raw).reduce.final_model == "ratatouille_uniform"
    raw["reduce"]["final_model"] = rule
    with pytest.raises(ConfigError, match="reduce.final_model.*best_id_val"):
        parse_config(raw)


def test_every_strategy_is_a_final_model_rule_or_not_one_network():
    from ratatouille.core.arms import MULTI_MODEL_STRATEGIES, final_model_rules
    from ratatouille.reducer.strategies import STRATEGIES

    rules = set(final_model_rules())
    assert rules == {"best_id_val", *STRATEGIES} - MULTI_MODEL_STRATEGIES
    assert {"ratatouille_uniform", "soup_greedy", "fusing", "erm"} <= rules
