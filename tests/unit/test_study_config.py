"""Unit tests of study file validation: every malformed study fails before any training starts."""

import pytest
import yaml

from harness.study_config import load_study, parse_study, trial_config


def _study(**changes):
    tree = {
        "name": "s",
        "preset": "tiny",
        "search_space": {"entropy.loss_coeff": {"type": "float", "low": 1e-6, "high": 1e-4, "log": True}},
        "n_trials": 2,
    }
    tree.update(changes)
    return tree


def test_valid_study_parses():
    spec = parse_study(_study())
    assert spec.search_space[0].key == "entropy.loss_coeff"
    assert spec.directions == ["minimize"]


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"n_trails": 3}, "unknown key.*did you mean 'n_trials'"),
        ({"search_space": {}}, "search space is empty"),
        ({"search_space": {"entropy.tolerance": {"type": "float", "low": 0.3, "high": 0.1}}}, "low=0.3 is greater than high=0.1"),
        ({"search_space": {"optim.lr": {"type": "float", "low": 0.0, "high": 0.1, "log": True}}}, "log range needs low > 0"),
        ({"preset": "no_such_preset"}, "unknown preset 'no_such_preset'"),
        ({"search_space": {"entropy.tolerence": [0.1, 0.2]}}, "tolerence"),
        ({"search_space": {"entropy.reduction": ["row_sum", "mean"]}}, "reduction"),
        ({"search_space": {"x.y": {"type": "uniform", "low": 0, "high": 1}}}, "accepted values are"),
        ({"pruner": {"type": "asha"}}, "pruner.type"),
        ({"objectives": [{"metric": "accuracy"}]}, "objectives\\[0\\].metric"),
        ({"n_trials": 0}, "n_trials"),
    ],
)
def test_malformed_study_rejected(changes, message):
    with pytest.raises(ValueError, match=message):
        parse_study(_study(**changes))


def test_overrides_reach_trial_config(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(_study()))
    spec = load_study(path, ["train.max_steps=7", "n_trials=5"])
    assert spec.n_trials == 5
    cfg = trial_config(spec, {"entropy.loss_coeff": 3e-5}, 4)
    assert cfg.train.max_steps == 7
    assert cfg.entropy.loss_coeff == 3e-5
    assert cfg.name == "s/trial_4"


def test_grid_needs_discrete_dimensions():
    with pytest.raises(ValueError, match="grid sampling"):
        parse_study(_study(sampler={"type": "grid"}))


def test_missing_study_file_lists_available(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_study(tmp_path / "absent.yaml")


@pytest.mark.integration  # indexes lm-eval's task registry, about 9 s
def test_unknown_evaluation_task_rejected():
    with pytest.raises(ValueError, match="unknown tasks.*arc_eazy"):
        parse_study(_study(evaluation={"tasks": ["arc_eazy"]}))
