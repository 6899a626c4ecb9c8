"""Recipe switches of the run config: the round learning rate (timm's cosine with warm-up, sent by the coordinator
and checked by the site against the signed config, recorded per round) and the augmentation keys."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedrad.common.augment import AugmentConfig, augment
from fedrad.common.lr_schedule import lr_table, round_lr
from fedrad.common.protocol import CONFIG, MESSAGE_CONFIG, ROUND_LR, SERVER_ROUND, ProtocolError
from fedrad.common.run_config import RunConfig


def test_cosine_with_warmup_is_timms_curve_per_round() -> None:
    lr, lr_min, rounds, warm = 0.4, 0.01, 10, 3
    got = lr_table(lr, rounds, "cosine", warm, lr_min)
    for r in range(1, warm):  # linear warm-up from lr-min, full lr at round `warm`
        assert got[r - 1] == pytest.approx(lr_min + r * (lr - lr_min) / warm)
    assert got[warm - 1] == pytest.approx(lr)
    span = rounds - warm + 1
    for r in range(warm, rounds + 1):  # then cosine to just above lr-min
        want = lr_min + 0.5 * (lr - lr_min) * (1 + math.cos(math.pi * (r - warm) / span))
        assert got[r - 1] == pytest.approx(want)
    assert all(a > b for a, b in zip(got[warm - 1:], got[warm:], strict=False))
    assert got[-1] > lr_min


def test_constant_and_cosine_without_warmup() -> None:
    assert lr_table(0.1, 4) == [0.1] * 4
    assert lr_table(0.1, 4, "constant", 2) == pytest.approx([0.05, 0.1, 0.1, 0.1])
    cos = lr_table(0.1, 5, "cosine")
    assert cos[0] == pytest.approx(0.1) and cos[-1] > 0 and sorted(cos, reverse=True) == cos
    assert round_lr(0.1, 1, 1, "cosine") == pytest.approx(0.1)  # a single round runs at the full rate
    with pytest.raises(ValueError, match="lr-schedule"):
        round_lr(0.1, 1, 3, "step")


@pytest.mark.parametrize("overrides,key", [
    ({"lr_schedule": "linear"}, "lr-schedule"),
    ({"warmup_rounds": 3, "num_server_rounds": 3}, "warmup-rounds"),
    ({"lr_min": 1.0}, "lr-min"),
    ({"aug_crop_min": 0.0}, "aug-crop-min"),
    ({"aug_crop_min": 0.9, "aug_crop_max": 0.5}, "aug-crop-min"),
    ({"aug_rotate": -1.0}, "aug-rotate"),
    ({"aug_contrast": 1.0}, "aug-contrast"),
    ({"aug_gamma": 0.5}, "aug-gamma"),
    ({"aug_blur_p": 1.5}, "aug-blur-p"),
    ({"aug_noise_std": -0.1}, "aug-noise-std"),
])
def test_bad_recipe_values_name_the_key(overrides: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        RunConfig(**overrides)


def test_flower_config_keys_parse_and_are_in_the_app_defaults() -> None:
    import tomllib
    from pathlib import Path

    defaults = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    for key in ("init", "init-pubkey", "lr-schedule", "warmup-rounds", "lr-min", "aug-crop-min", "aug-gamma",
                "aug-noise-std"):
        assert key in defaults["config"], key  # Flower drops overrides of keys the app does not declare
    cfg = RunConfig.from_flower({"lr-schedule": "cosine", "warmup-rounds": "2", "num-server-rounds": 5,
                                 "aug-rotate": 5, "aug-crop-min": 1.0, "aug-gamma": 1.0, "aug-blur-p": 0})
    assert cfg.round_lr(2) == pytest.approx(cfg.lr)
    aug = cfg.augment_config()
    assert aug.rotate_deg == 5.0 and aug.crop_scale == (1.0, 1.0) and aug.crop_ratio == (1.0, 1.0)
    assert aug.gamma == (1.0, 1.0) and aug.blur_p == 0.0 and aug.hflip is False
    assert RunConfig().augment_config() == AugmentConfig()  # the keys' defaults are the module's recipe


def test_switched_off_pieces_leave_the_image_alone() -> None:
    x = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    off = RunConfig(aug_crop_min=1.0, aug_rotate=0.0, aug_brightness=0.0, aug_contrast=0.0, aug_gamma=1.0,
                    aug_blur_p=0.0, aug_noise_p=0.0).augment_config()
    assert torch.allclose(augment(x, off, torch.Generator().manual_seed(1)), x, atol=1e-5)
    rotate_only = RunConfig(aug_crop_min=1.0, aug_rotate=30.0, aug_brightness=0.0, aug_contrast=0.0,
                            aug_gamma=1.0, aug_blur_p=0.0, aug_noise_p=0.0).augment_config()
    assert not torch.allclose(augment(x, rotate_only, torch.Generator().manual_seed(1)), x, atol=1e-3)


@pytest.fixture
def in_a_serverapp(monkeypatch):
    """Flower builds messages with the run and node ids of the process it runs in."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def _train_msg(config: dict) -> Message:
    arrays = ArrayRecord({"w": Array(np.zeros(2, np.float32))})
    return Message(content=RecordDict({"arrays": arrays, CONFIG: ConfigRecord(config)}), dst_node_id=1,
                   message_type="train")


def test_site_uses_the_sent_round_lr_only_when_it_is_the_signed_schedule(in_a_serverapp) -> None:
    from fedrad.client.app.task import round_lr_for, train_config_for

    cfg = RunConfig(lr=0.2, lr_schedule="cosine", warmup_rounds=1, num_server_rounds=4)
    expected = cfg.round_lr(3)
    assert expected < cfg.lr
    assert round_lr_for(_train_msg({SERVER_ROUND: 3, ROUND_LR: expected}), cfg, 3) == expected
    assert round_lr_for(_train_msg({SERVER_ROUND: 3}), cfg, 3) == expected  # SecAgg+: computed at the site
    with pytest.raises(ProtocolError, match=ROUND_LR):
        round_lr_for(_train_msg({SERVER_ROUND: 3, ROUND_LR: 10.0}), cfg, 3)  # a coordinator asking for more
    tcfg = train_config_for(cfg, "cpu", 3, 0, expected)
    assert tcfg.lr == expected and tcfg.augment == cfg.augment_config()
    assert ROUND_LR in MESSAGE_CONFIG


class _Grid:
    """Records what the coordinator pushes; nothing ever answers."""

    def __init__(self) -> None:
        self.pushed: list[Message] = []

    def get_node_ids(self):
        return [11, 12]

    def push_messages(self, messages):
        self.pushed.extend(messages)
        return [f"q{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, message_ids):
        return []


def test_coordinator_sends_the_rounds_lr_and_records_it(tmp_path, in_a_serverapp) -> None:
    from fedrad.server.exchange import RoundTimes
    from fedrad.server.round_modes import PlainRounds, TrainOutcome
    from fedrad.server.rounds import RunState, _round_entry
    from fedrad.server.strategies import build_strategy

    cfg = RunConfig(min_train_nodes=1, min_available_nodes=1, round_timeout=0.3, lr=0.1, lr_schedule="cosine",
                    warmup_rounds=2, num_server_rounds=6, fraction_evaluate=0.0)
    grid = _Grid()
    arrays = ArrayRecord({"w": Array(np.ones(3, np.float32))})
    mode = PlainRounds(grid, cfg, build_strategy(cfg), "k", tmp_path)
    with pytest.raises(RuntimeError, match="none of"):
        mode.train(4, arrays, RoundTimes())
    assert grid.pushed and all(m.content[CONFIG][ROUND_LR] == pytest.approx(cfg.round_lr(4)) for m in grid.pushed)
    state = RunState(grid, cfg, tmp_path, build_strategy(cfg), "k", ["w"])
    entry = _round_entry(state, 4, TrainOutcome(None, {}, 2, 0, 0), {}, arrays, RoundTimes())
    assert entry["lr"] == pytest.approx(lr_table(0.1, 6, "cosine", 2)[3])
