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
