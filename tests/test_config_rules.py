"""Every run-config rule lives in RunConfig (common/): `fedrad run` before submission, the coordinator and each
site refuse the same config with the same words, and a site parses the run config once per message."""

from __future__ import annotations

import pytest

from fedrad.common.run_config import DP_MODES, RunConfig

# Privacy rules that once lived in server/privacy.py (and, in part, again in the site's code).
BAD = [
    ({"dp": "central"}, "'dp': unknown"),
    ({"dp": "client", "dp-noise": 0.0}, "dp-noise"),
    ({"dp": "client", "dp-noise": 1.0, "strategy": "fedprox"}, "strategy=fedavg only"),
    ({"dp": "sample", "dp-noise": 1.0, "objective": "simclr"}, "couples the images of a batch"),
    ({"dp": "sample", "dp-noise": 1.0, "objective": "simsiam", "strategy": "fedprox"}, "fedprox"),
    ({"dp": "sample", "dp-noise": 1.0, "objective": "simsiam", "eval-in-train": True}, "eval-in-train"),
    ({"aug-gamma": 0.5}, "aug-gamma"),
]


@pytest.mark.parametrize("overrides,words", BAD)
def test_run_cli_coordinator_and_site_refuse_the_same_config(overrides: dict, words: str) -> None:
    from fedrad.deploy.run_command import app_run_config, validate_run_config

    fused = {**app_run_config(), **overrides}
    messages = []
    for check in (lambda: validate_run_config(overrides),  # `fedrad run`, before anything is submitted
                  lambda: RunConfig.from_flower(fused),  # the ServerApp (server/rounds.py)
                  lambda: RunConfig.of(fused)):  # the site's mods and handlers
        with pytest.raises(ValueError, match=words) as err:
            check()
        messages.append(str(err.value))
    assert len(set(messages)) == 1, messages


def test_site_policy_dp_modes_are_the_run_configs() -> None:
    from fedrad.client.site import policy

    assert policy.DP_MODES is DP_MODES


def test_a_message_parses_the_run_config_once() -> None:
    from fedrad.deploy.run_command import app_run_config

    fused = app_run_config()
    assert RunConfig.of(fused) is RunConfig.of(dict(fused))  # the policy mod's, the privacy mod's, the handler's
    assert RunConfig.of({**fused, "lr": 0.01}).lr == 0.01
    with pytest.raises(ValueError, match="unknown run-config keys: nope"):
        RunConfig.of({**fused, "nope": 1})
    with pytest.raises(ValueError, match="'batch-size'"):
        RunConfig.of({**fused, "batch-size": [1, 2]})  # not a TOML scalar: still named


def test_fedprox_term_only_under_fedprox() -> None:
    assert RunConfig(strategy="fedprox", proximal_mu=0.1).fedprox_mu == 0.1
    assert RunConfig(strategy="fedavg", proximal_mu=0.1).fedprox_mu == 0.0
    assert RunConfig(strategy="fedprox", proximal_mu=0.0).fedprox_mu == 0.0


def test_the_site_policy_is_parsed_once_per_version(tmp_path) -> None:
    from fedrad.client.site.policy import policy_for

    path = tmp_path / "site.toml"
    path.write_text("[training]\nmax_image_size = 32\n")
    node = {"policy": str(path)}
    first = policy_for(node)
    assert policy_for(dict(node)) is first  # the mod, the loader, the budget and the monitor share it
    path.write_text("[training]\nmax_image_size = 64\n")  # same size, maybe the same mtime: still re-read
    assert policy_for(node) is not first and policy_for(node).max_image_size == 64


def test_one_schema_mechanism_for_run_config_node_config_and_policy() -> None:
    """Recipe, RunConfig, NodeConfig and SitePolicy are pydantic models on one Schema base, and each refusal is one
    ConfigError line naming the key and, for a file, FILE:LINE."""
    from fedrad.client.site.policy import PolicyError, SitePolicy, parse_policy
    from fedrad.common.node_config import NodeConfig
    from fedrad.common.recipe import Recipe
    from fedrad.common.schema import ConfigError, Schema

    for kind in (Recipe, RunConfig, NodeConfig, SitePolicy):
        assert issubclass(kind, Schema), kind
    text = 'lr = 0.01\n\ndp = "central"\n'
    with pytest.raises(ConfigError) as err:
        RunConfig.from_flower({"lr": 0.01, "dp": "central"}, "run.toml", text)
    assert str(err.value).startswith("run.toml:3: run-config 'dp': unknown") and err.value.key == "dp"
    with pytest.raises(ConfigError, match=r"^node\.toml:2: node-config 'threads': ") as err:
        NodeConfig.of({"threads": "many"}, "node.toml", 'device = "cpu"\nthreads = "many"\n')
    assert "\n" not in str(err.value)
    with pytest.raises(PolicyError, match=r"^site\.toml:3: training\.max_batch_size must be a whole number"):
        parse_policy('[training]\n\nmax_batch_size = "big"\n', "site.toml")
    assert issubclass(PolicyError, ConfigError)
    with pytest.raises(ConfigError, match="unknown run-config keys: nope"):
        RunConfig.from_flower({"nope": 1})
    with pytest.raises(ConfigError, match="run-config 'batch-size'"):
        RunConfig(batch_size="many")  # a wrong type, one line like a broken rule


def test_a_copy_is_checked_like_a_new_config() -> None:
    cfg = RunConfig()
    assert cfg.replace(lr=0.01).lr == 0.01 and cfg.lr == RunConfig().lr  # frozen: a copy
    with pytest.raises(ValueError, match="aug-gamma"):
        cfg.replace(aug_gamma=0.5)
    with pytest.raises(ValueError):
        cfg.lr = 1.0  # frozen


def test_one_refusal_helper_at_the_site() -> None:
    """fedrad.client.app.error_reply.refuse is the one way a site refuses: no other client module builds an error reply
    (the wire guard only rewrites and blocks replies on their way out) or writes the refusals file."""
    from pathlib import Path

    root = Path(__file__).parents[1] / "client"
    others = []
    for path in sorted(root.rglob("*.py")):
        if path.name in ("error_reply.py", "wire_guard.py"):
            continue
        text = path.read_text(encoding="utf-8")
        if "error_reply(" in text or "record_refusal" in text or "REFUSALS_FILE)" in text:
            others.append(path.relative_to(root).as_posix())
    assert not others, f"refuse through fedrad.client.app.error_reply.refuse: {others}"
