"""The local training loop every site runs, for every objective, in a Flower round or `fedrad pretrain`.

One loop: the objective (common/losses registry) decides how many views are built, whether the second is
another image of the same patient, which labels are passed, and what happens after each optimizer step.
torch is imported lazily: a Flower ClientApp process imports this module for every message, and the
dataclasses must be usable without paying for torch/timm.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

    from fedrad.client.site.site_data import SiteData
    from fedrad.client.training.ddp import RankContext
    from fedrad.client.training.sample_dp import SampleDP
    from fedrad.common.losses import Batch
    from fedrad.common.recipe import Recipe

EVAL_SEED = 1234  # fixed: held-out views are the same in every round and at every site
HOLDOUT_FRACTION = 0.1
MAX_EVAL_IMAGES = 512
MIN_HOLDOUT_SITE = 20


@dataclass
class TrainConfig:
    objective: str = "simclr"
    steps: int = 100
    batch_size: int = 32
    lr: float = 3e-4
    optimizer: str = "adamw"  # adamw | sgd | lars (timm.optim)
    weight_decay: float = 1e-4
    temperature: float = 0.1
    label_fields: list[str] | str = field(default_factory=lambda: ["view", "body_part", "sex", "age"])
    device: str = "auto"
    seed: int = 0
    grad_clip: float | None = 1.0  # max global grad norm; None/0 disables
    amp: str | bool = "auto"  # auto: bf16 autocast on CUDA, off on CPU; "bf16" / True forces; "off" / False
    hflip: bool = False
    image_size: int | None = None  # None: the data's size; else views are resized on the device
    channels_last: bool | None = None  # None: on for CUDA only (slower for small convs on CPU)
    holdout: bool = True  # keep ~10% of patients out of training for evaluate_local
    augment: Any = None  # a fedrad.common.augment.AugmentConfig; None: its defaults with `hflip`

    def fields_list(self) -> list[str]:
        if isinstance(self.label_fields, str):
            return [f.strip() for f in self.label_fields.split(",") if f.strip()]
        return list(self.label_fields)

    @classmethod
    def from_recipe(cls, recipe: Recipe, steps: int, device: str = "auto", lr: float | None = None,
                    seed: int | None = None, **extra: Any) -> TrainConfig:
        """The trainer settings of a fedrad.common.recipe.Recipe (a RunConfig is one): how `fedrad pretrain`, a
        site's round and the benchmarks build theirs, so they train the same recipe. `lr`: this round's rate."""
        return cls(objective=recipe.objective, steps=steps, batch_size=recipe.batch_size,
                   lr=recipe.lr if lr is None else lr, optimizer=recipe.optimizer, weight_decay=recipe.weight_decay,
                   temperature=recipe.temperature, label_fields=recipe.label_field_list, device=device,
                   seed=recipe.seed if seed is None else seed, hflip=recipe.hflip, image_size=recipe.image_size,
                   augment=recipe.augment_config(), **extra)


@dataclass
class TrainResult:
    losses: list[float]
    steps: int
    examples: int
    seconds: float
    metrics: list[dict[str, float]] = field(default_factory=list)  # per step: loss, grad_norm, lr, time
    dp_history: list[tuple[float, float, int]] | None = None  # sample-level DP: accounting after this call
    dp_epsilon: float | None = None


def resolve_device(name: str = "auto") -> torch.device:
    """auto -> cuda if available, then mps, else cpu."""
    import torch

    if name and name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _amp_dtype(cfg: TrainConfig, device: torch.device):
    import torch

    amp = cfg.amp
    if amp in (False, "off", "none", "fp32", None):
        return None
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if amp in (True, "bf16", "bfloat16"):
        return torch.bfloat16
    raise ValueError(f"amp must be auto, bf16 or off, not {amp!r}")


def split_indices(data: SiteData, holdout: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(train, eval) image indices; the split is by patient so one patient's images never straddle it.

    Deterministic (fixed seed) so every round trains and evaluates on the same images. With fewer than
    MIN_HOLDOUT_SITE images everything is used for both (a tiny site cannot spare any for evaluation).
    """
    import numpy as np

    n = len(data)
    all_idx = np.arange(n)
    if not holdout or n < MIN_HOLDOUT_SITE:
        return all_idx, all_idx
    groups = np.asarray(data.group_ids())
    uniq = np.unique(groups)
    rng = np.random.default_rng(EVAL_SEED)
    rng.shuffle(uniq)
    target = max(2, int(round(HOLDOUT_FRACTION * n)))
    counts = {g: c for g, c in zip(*np.unique(groups, return_counts=True), strict=True)}
    held, total = [], 0
    for g in uniq:
        if total >= target:
            break
        held.append(g)
        total += counts[g]
    is_eval = np.isin(groups, held)
    train, ev = all_idx[~is_eval], all_idx[is_eval]
    if len(train) < 2 or len(ev) < 2:
        return all_idx, all_idx
    return train, ev


class _PairSampler:
    """Draws batches without repeats (a fresh permutation per epoch) and, for MICLe, each anchor's partner."""

    def __init__(self, data: SiteData, indices: np.ndarray, batch_size: int, generator: torch.Generator,
                 patient_pairs: bool | np.ndarray) -> None:
        import numpy as np

        from fedrad.common.series import thin_by_spacing

        rules = getattr(data, "rules", None)
        self.series_ids = getattr(data, "series_ids", None)
        self.max_share = rules.max_series_share if rules is not None and self.series_ids is not None else 0.0
        indices = np.asarray(indices)
        if rules is not None and rules.min_slice_spacing > 0 and self.series_ids is not None:
            thinned = thin_by_spacing(indices, self.series_ids, data.slice_pos, rules.min_slice_spacing)
            indices = thinned if len(thinned) >= 2 else indices
        self.indices = indices
        self.batch_size = min(batch_size, len(self.indices))
        self.g = generator
        self.perm = np.empty(0, dtype=np.int64)
        self.pos = 0
        self.patient_pairs = patient_pairs is not None and patient_pairs is not False
        if self.patient_pairs:  # True: pairs within a patient; an array: pairs within those groups
            all_groups = data.group_ids() if patient_pairs is True else patient_pairs
            groups = np.asarray(all_groups)[self.indices]
            order = np.argsort(groups, kind="stable")
            sorted_groups = groups[order]
            starts = np.searchsorted(sorted_groups, sorted_groups, side="left")
            sizes = np.searchsorted(sorted_groups, sorted_groups, side="right") - starts
            pos_in_group = np.arange(len(order)) - starts
            # per position in self.indices: where its group starts in `order`, its size, its rank
            self.order = order
            self.start = np.empty_like(starts)
            self.size = np.empty_like(sizes)
            self.rank = np.empty_like(pos_in_group)
            self.start[order], self.size[order], self.rank[order] = starts, sizes, pos_in_group
            self.groups = groups

    def next(self) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """(anchor indices, partner indices or None, positions of anchors in self.indices)."""
        import numpy as np
        import torch

        if self.pos + self.batch_size > len(self.perm):
            self.perm = torch.randperm(len(self.indices), generator=self.g).numpy()
            if self.max_share > 0:  # this epoch's pool: no series over its share (series.round_pool)
                from fedrad.common.series import round_pool

                rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,), generator=self.g)))
                pool = round_pool(np.arange(len(self.indices)), self.series_ids[self.indices], self.max_share, rng)
                if len(pool) >= self.batch_size:
                    self.perm = self.perm[np.isin(self.perm, pool)]
            self.pos = 0
        p = self.perm[self.pos: self.pos + self.batch_size]
        self.pos += self.batch_size
        if not self.patient_pairs:
            return self.indices[p], None, p
        u = torch.rand(len(p), generator=self.g).numpy()
        size = self.size[p]
        off = 1 + np.floor(u * np.maximum(size - 1, 1)).astype(np.int64)
        partner_pos = np.where(size > 1, self.order[self.start[p] + (self.rank[p] + off) % size], p)
        return self.indices[p], self.indices[partner_pos], p


def _fetch(data: SiteData, idx: np.ndarray, device: torch.device, size: int | None) -> torch.Tensor:
    import torch.nn.functional as F

    x = data.as_float(idx)
    x = x.to(device, non_blocking=True)
    if size is not None and x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x


OPTIMIZERS = ("adamw", "sgd", "lars")


def make_optimizer(model: nn.Module, cfg: TrainConfig):
    """timm's AdamW / SGD (Nesterov momentum 0.9) / LARS (momentum 0.9, trust ratio on the decayed tensors),
    with timm's grouping: no weight decay on biases and norm parameters (standard SSL practice)."""
    from timm.optim import create_optimizer_v2

    name = cfg.optimizer.lower()
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer '{cfg.optimizer}' ({', '.join(OPTIMIZERS)})")
    return create_optimizer_v2(model, opt=name, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=0.9,
                               foreach=True, filter_bias_and_bn=True)


@dataclass
class _Setup:
    device: Any
    objective: Any
    aug: Any
    amp_dtype: Any
    channels_last: bool
    size: int | None
    labels: Any  # np.ndarray of label ids / group ids, or None
    groups: Any = None  # np.ndarray of patient group ids beside the label ids (positives "patient+labels")


def _setup(model: nn.Module, data: SiteData, cfg: TrainConfig) -> _Setup:
    import numpy as np
    import torch

    from fedrad.common.augment import AugmentConfig
    from fedrad.common.losses import get_objective

    device = resolve_device(cfg.device)
    objective = get_objective(cfg.objective, temperature=cfg.temperature)
    labels = groups = None
    if objective.needs_labels:
        labels = np.asarray(data.label_ids(cfg.fields_list()), dtype=np.int64)
    if objective.positives == "patient":
        labels = np.asarray(data.group_ids(), dtype=np.int64)
    elif objective.positives == "slices":  # nearby slices of one series (common/series.py)
        from fedrad.common.series import neighbour_groups

        sid, pos = getattr(data, "series_ids", None), getattr(data, "slice_pos", None)
        labels = (np.arange(len(data), dtype=np.int64) if sid is None or pos is None
                  else neighbour_groups(np.asarray(sid), np.asarray(pos)))
    elif objective.positives == "patient+labels":
        groups = np.asarray(data.group_ids(), dtype=np.int64)
    cl = cfg.channels_last if cfg.channels_last is not None else device.type == "cuda"
    model.to(device)
    if cl:
        model.to(memory_format=torch.channels_last)
    size = cfg.image_size if cfg.image_size and cfg.image_size != data.image_size else None
    aug = cfg.augment if cfg.augment is not None else AugmentConfig(hflip=cfg.hflip)
    return _Setup(device, objective, aug, _amp_dtype(cfg, device), cl, size, labels, groups)


def _pairs(st: _Setup):
    """What the sampler pairs within: the slice blocks (objective "slices"), patients, or nothing."""
    if st.objective.positives == "slices":
        return st.labels
    return st.objective.pairing == "patient"


def _views(st: _Setup, data: SiteData, sampler: _PairSampler, gen_aug, n_views: int) -> tuple[Batch, int]:
    anchors, partners, _ = sampler.next()
    return _views_of(st, data, anchors, partners, gen_aug, n_views)


def _views_of(st: _Setup, data: SiteData, anchors: np.ndarray, partners: np.ndarray | None, gen_aug,
              n_views: int) -> tuple[Batch, int]:
    """`n_views` augmented views of the anchors (the second of a patient's partner image when given), their
    labels as the objective's positives need them, and the batch size."""
    import torch

    from fedrad.common.augment import augment
    from fedrad.common.intensity import apply_intensity
    from fedrad.common.losses import Batch

    def fetch(idx: np.ndarray) -> torch.Tensor:  # MR on its series' scale, CT through a sampled window preset
        affine, ct = getattr(data, "affine", None), getattr(data, "ct_mask", None)
        return apply_intensity(_fetch(data, idx, st.device, st.size), None if affine is None else affine[idx],
                               None if ct is None else ct[idx], gen_aug)

    x = fetch(anchors)
    sources = [x] * n_views
    if partners is not None and n_views > 1:
        sources[1] = fetch(partners)
    views = tuple(augment(src, st.aug, gen_aug) for src in sources)
    if st.channels_last:
        views = tuple(v.contiguous(memory_format=torch.channels_last) for v in views)
    labels = groups = None
    if st.labels is not None:
        labels = torch.from_numpy(st.labels[anchors]).to(st.device, non_blocking=True)
    if st.groups is not None:
        groups = torch.from_numpy(st.groups[anchors]).to(st.device, non_blocking=True)
    return Batch(views, labels, groups), len(anchors)


def _generators(seed: int, device: torch.device):
    """CPU generator for batch sampling, one on the training device for the augmentations (no host sync)."""
    import torch

    g_idx = torch.Generator().manual_seed(seed)
    try:
        g_aug = torch.Generator(device=device).manual_seed(seed + 1)
    except RuntimeError:  # devices without generator support (e.g. some mps builds)
        g_aug = torch.Generator().manual_seed(seed + 1)
    return g_idx, g_aug


def train_local(model: nn.Module, data: SiteData, cfg: TrainConfig, progress: bool = True,
                proximal: tuple[float, dict[str, torch.Tensor]] | None = None,
                dp: SampleDP | None = None, dist_ctx: RankContext | None = None) -> TrainResult:
    """Run `cfg.steps` optimizer steps of `cfg.objective` on the site's training split; per-step losses.

    A fresh optimizer every call (each federated round starts from the aggregated weights). Seeded: the same
    model init, data and cfg give the same losses on CPU. `proximal=(mu, start_state)` adds FedProx's
    mu/2 ||w - w_start||^2 on the parameters (as a gradient term; the reported loss is the objective's).
    `dp` trains with opacus DP-SGD instead (per-image clipping and noise, Poisson-sampled batches, secret
    randomness, so not seeded); the result carries the accounting history and ε.
    `dist_ctx`: this call is one rank of fedrad.client.training.ddp.train_distributed (the global batch's forward is
    split over the ranks and the gradients averaged; with `dp` one Poisson draw per step for the site, each
    rank clips its slice's images, the noise is added once).
    """
    import contextlib
    import dataclasses

    import torch
    from tqdm.auto import tqdm

    if len(data) < 2:
        raise ValueError(f"need at least 2 images to train contrastively, the site has {len(data)}")
    if dp is not None:
        if proximal is not None:
            raise ValueError("sample-level DP does not combine with FedProx's proximal term")
        # bf16 per-sample gradients and channels_last buy little here and complicate opacus's hooks.
        cfg = dataclasses.replace(cfg, amp="off", channels_last=False)
    st = _setup(model, data, cfg)
    train_idx, _ = split_indices(data, cfg.holdout)
    g_idx, g_aug = _generators(cfg.seed, st.device)
    sampler = _PairSampler(data, train_idx, cfg.batch_size, g_idx, _pairs(st))
    opt = make_optimizer(model, cfg)
    n_views = st.objective.n_views
    dp_run = None
    stack = contextlib.ExitStack()
    if dp is not None:  # over ranks: one Poisson draw, clipping per slice, noise once (sample_dp.py)
        from fedrad.client.training.sample_dp import DPTraining

        dp_run = DPTraining.open(model, opt, dp, st.objective, len(train_idx), cfg.batch_size, st.device, dist_ctx)
        stack.callback(dp_run.close)
        st.objective, opt = dp_run.objective, dp_run.optimizer
    else:
        st.objective.start(model)
    loss_model = dist_ctx.wrap(model) if dist_ctx is not None else model
    named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    prox = None
    if proximal is not None and proximal[0] > 0:
        mu, start = proximal
        prox = (float(mu), [start[k].to(p.device, p.dtype) for k, p in named])
    model.train()
    autocast = (torch.autocast(st.device.type, dtype=st.amp_dtype) if st.amp_dtype is not None
                else contextlib.nullcontext())
    loss_hist: list[torch.Tensor] = []
    norm_hist: list[torch.Tensor] = []
    times: list[float] = []
    examples = 0
    t0 = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc=f"{cfg.objective} train", unit="step", leave=False,
               disable=None if progress else True)  # None: a bar only on a terminal, never in a log file
    every = max(1, cfg.steps // 50)
    with stack:
        for step in bar:
            if dp_run is None:
                batch, b = _views(st, data, sampler, g_aug, n_views)
                with autocast:
                    loss = shown = st.objective.batch_loss(loss_model, batch)
            else:
                loss, shown, b = dp_run.batch_loss(dp_run.draw(train_idx), _dp_views(st, data, g_aug))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if dist_ctx is not None and dp_run is None:  # under DP the optimizer sums the clipped gradients
                dist_ctx.sync_grads(params)
            if prox is not None:
                with torch.no_grad():
                    for p, p0 in zip(params, prox[1], strict=True):
                        if p.grad is not None:
                            p.grad.add_(p - p0, alpha=prox[0])
            if dp_run is not None:
                dp_run.step()  # per-image clipping to dp-clip, Gaussian noise, one accountant step
            else:
                if cfg.grad_clip:
                    norm_hist.append(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip, foreach=True).detach())
                opt.step()
            st.objective.after_step(model)
            loss_hist.append(shown.detach())
            examples += b
            times.append(time.perf_counter() - t0)
            if not bar.disable and (step % every == 0 or step == cfg.steps - 1):
                bar.set_postfix(loss=f"{loss_hist[-1].item():.4f}")
    bar.close()
    losses = torch.stack(loss_hist).float().cpu().tolist() if loss_hist else []
    seconds = time.perf_counter() - t0
    norms = torch.stack(norm_hist).float().cpu().tolist() if norm_hist else [float("nan")] * len(losses)
    metrics = [{"step": i, "loss": loss_v, "grad_norm": n, "lr": cfg.lr, "seconds": t}
               for i, (loss_v, n, t) in enumerate(zip(losses, norms, times, strict=True))]
    result = TrainResult(losses=losses, steps=len(losses), examples=examples, seconds=seconds, metrics=metrics)
    if dp_run is not None:
        result.dp_history, result.dp_epsilon = dp_run.history, dp_run.epsilon
    return result


def _dp_views(st: _Setup, data: SiteData, gen_aug):
    """anchors -> the views a DP step trains on (DPTraining.batch_loss); one blank image for an empty draw."""
    import torch

    def views(anchors: np.ndarray) -> tuple:
        if len(anchors) == 0:
            size = st.size or data.image_size
            return (torch.zeros(1, 1, size, size, device=st.device),) * 2
        return _views_of(st, data, anchors, None, gen_aug, st.objective.n_views)[0].views

    return views


def evaluate_local(model: nn.Module, data: SiteData, cfg: TrainConfig) -> dict[str, float]:
    """Held-out contrastive loss, alignment and uniformity (Wang & Isola 2020) on deterministic views.

    alignment = E ||z1 - z2||^2 over positive pairs (lower: views agree);
    uniformity = log E exp(-2 ||zi - zj||^2) over distinct held-out images (lower: embeddings spread on the
    sphere; ~0 means collapse). Both on L2-normalised projections, in eval mode (BN running statistics).
    """
    import dataclasses

    import torch
    import torch.nn.functional as F

    if len(data) < 2:
        raise ValueError(f"need at least 2 images to evaluate, the site has {len(data)}")
    st = _setup(model, data, cfg)
    _, eval_idx = split_indices(data, cfg.holdout)
    eval_idx = eval_idx[:MAX_EVAL_IMAGES]
    g_idx, g_aug = _generators(EVAL_SEED, st.device)
    sampler = _PairSampler(data, eval_idx, cfg.batch_size, g_idx, _pairs(st))
    sampler.perm = torch.arange(len(eval_idx)).numpy()  # in order, one pass
    n_batches = max(1, len(eval_idx) // sampler.batch_size)
    n_views = st.objective.n_views
    st.objective.start(model)  # BYOL: the target is the model being evaluated
    was_training = model.training
    model.eval()
    losses, z1s, z2s = [], [], []
    try:
        with torch.no_grad():
            for _ in range(n_batches):
                batch, _b = _views(st, data, sampler, g_aug, max(2, n_views))  # two for alignment
                v1, v2 = batch.views[:2]
                with (torch.autocast(st.device.type, dtype=st.amp_dtype) if st.amp_dtype is not None
                      else torch.autocast(st.device.type, enabled=False)):
                    own = dataclasses.replace(batch, views=batch.views[:n_views])
                    losses.append(float(st.objective.batch_loss(model, own)))
                    z1s.append(F.normalize(model(v1).float(), dim=1))
                    z2s.append(F.normalize(model(v2).float(), dim=1))
    finally:
        model.train(was_training)
    z1, z2 = torch.cat(z1s), torch.cat(z2s)
    alignment = float((z1 - z2).pow(2).sum(1).mean())
    sq = torch.pdist(z1, p=2).pow(2)
    uniformity = float(sq.mul(-2).exp().mean().log()) if sq.numel() else 0.0
    return {"eval_loss": sum(losses) / len(losses), "alignment": alignment, "uniformity": uniformity,
            "eval_examples": float(z1.shape[0])}


__all__ = ["OPTIMIZERS", "TrainConfig", "TrainResult", "evaluate_local", "make_optimizer", "resolve_device",
           "split_indices", "train_local"]
