"""The learning rate of each federated round: linear warm-up, then constant or cosine decay (timm's schedulers).

Contrastive pretraining is unstable at full learning rate from the first step and gains from annealing at the
end (SimCLR, REMEDIS: warm-up + cosine). In a federation the step counter that matters is the round, so the
coordinator computes each round's rate with timm's scheduler stepped per round and sends it with the train
message (`round-lr`); each local step of that round uses it. A site can compute the same value from the signed
run config (the SecAgg+ path, whose legacy messages carry no extra config).

Rounds are 1-based. With W warm-up rounds the rate rises linearly from `lr_min` and reaches `lr` at round W
(round 1 without warm-up), then the cosine runs from there to just above `lr_min` at the last round, so no
round is spent at the floor.
"""

from __future__ import annotations

LR_SCHEDULES = ("constant", "cosine")


def round_lr(lr: float, server_round: int, total_rounds: int, schedule: str = "constant", warmup_rounds: int = 0,
             lr_min: float = 0.0) -> float:
    """The learning rate of round `server_round` of `total_rounds` (timm's CosineLRScheduler / StepLRScheduler)."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr-schedule '{schedule}' (choose from {', '.join(LR_SCHEDULES)})")
    if schedule == "constant" and warmup_rounds <= 0:
        return float(lr)
    import torch
    from timm.scheduler import CosineLRScheduler, StepLRScheduler

    warmup = max(int(warmup_rounds), 0)
    peak = max(warmup, 1)  # the round that runs at the full `lr`
    holder = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=float(lr))
    if schedule == "cosine" and total_rounds > peak:
        sched = CosineLRScheduler(holder, t_initial=max(total_rounds - peak + 1, 1), lr_min=lr_min, warmup_t=warmup,
                                  warmup_lr_init=lr_min, warmup_prefix=True, t_in_epochs=True)
    else:  # constant after warm-up (also a cosine of a single round)
        sched = StepLRScheduler(holder, decay_t=1 << 30, decay_rate=1.0, warmup_t=warmup, warmup_lr_init=lr_min,
                                t_in_epochs=True)
    # timm's warm-up is lr_min + t * (lr - lr_min) / W at t < W, so round r warms up at t = r (full at r = W);
    # without warm-up the cosine starts at t = 0 on round 1.
    sched.step(epoch=max(int(server_round) - peak + warmup, 0))
    return float(holder.param_groups[0]["lr"])


def lr_table(lr: float, total_rounds: int, schedule: str = "constant", warmup_rounds: int = 0,
             lr_min: float = 0.0) -> list[float]:
    """Every round's learning rate, round 1 first (for docs and tests)."""
    return [round_lr(lr, r, total_rounds, schedule, warmup_rounds, lr_min) for r in range(1, total_rounds + 1)]


__all__ = ["LR_SCHEDULES", "lr_table", "round_lr"]
