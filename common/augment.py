"""Radiograph augmentations for contrastive views, batched with per-sample randomness.

torchvision.transforms.v2 draws one set of parameters per call, so applying it to a batch would give every
image the same crop; looping per image is slow on CPU. Here each piece draws per-sample parameters from the
caller's `torch.Generator` and runs as one batched tensor op on the batch's device (crop + rotation + flip
are fused into a single `grid_sample`). No colour jitter (grayscale), no horizontal flip by default (it moves
the heart to the wrong side). `v2_transform` gives the equivalent per-image v2 pipeline for DataLoaders.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class AugmentConfig:
    crop_scale: tuple[float, float] = (0.4, 1.0)  # area fraction kept by the random resized crop
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    rotate_deg: float = 10.0  # uniform in [-r, r]
    hflip: bool = False
    brightness: float = 0.1  # additive shift in [-b, b] (intensities are in [0, 1])
    contrast: float = 0.2  # factor in [1-c, 1+c] around each image's mean
    gamma: tuple[float, float] = (0.8, 1.25)  # log-uniform
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # pixels at 224 px, scaled with the image size
    noise_p: float = 0.5
    noise_std: tuple[float, float] = (0.0, 0.03)


def _uniform(n: int, lo: float, hi: float, g: torch.Generator | None, device) -> Tensor:
    dev = g.device if g is not None else torch.device("cpu")
    return (torch.rand(n, generator=g, device=dev) * (hi - lo) + lo).to(device)


def random_resized_crop_rotate(x: Tensor, cfg: AugmentConfig, g: torch.Generator | None) -> Tensor:
    """Random resized crop + small rotation (+ optional flip) as one affine warp; zero (black) padding."""
    b, dev = x.shape[0], x.device
    area = _uniform(b, *cfg.crop_scale, g, dev)
    log_r = _uniform(b, math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1]), g, dev)
    ratio = torch.exp(log_r)
    w = torch.sqrt(area * ratio).clamp(max=1.0)  # crop width / height as fractions of the side
    h = torch.sqrt(area / ratio).clamp(max=1.0)
    cx = _uniform(b, -1.0, 1.0, g, dev) * (1 - w)  # crop centre in [-1, 1] coordinates, crop inside image
    cy = _uniform(b, -1.0, 1.0, g, dev) * (1 - h)
    ang = _uniform(b, -cfg.rotate_deg, cfg.rotate_deg, g, dev) * (math.pi / 180)
    sx = w
    if cfg.hflip:
        flip = _uniform(b, 0.0, 1.0, g, dev) < 0.5
        sx = torch.where(flip, -w, w)
    cos, sin = torch.cos(ang), torch.sin(ang)
    theta = torch.stack([
        torch.stack([cos * sx, -sin * h, cx], dim=1),
        torch.stack([sin * sx, cos * h, cy], dim=1),
    ], dim=1).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def intensity(x: Tensor, cfg: AugmentConfig, g: torch.Generator | None) -> Tensor:
    """Per-image gamma, contrast around the mean, brightness shift (what differs between scanners)."""
    b, dev = x.shape[0], x.device
    gamma = torch.exp(_uniform(b, math.log(cfg.gamma[0]), math.log(cfg.gamma[1]), g, dev)).view(b, 1, 1, 1)
    x = x.clamp(0.0, 1.0).pow(gamma.to(x.dtype))
    c = _uniform(b, 1 - cfg.contrast, 1 + cfg.contrast, g, dev).view(b, 1, 1, 1).to(x.dtype)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    shift = _uniform(b, -cfg.brightness, cfg.brightness, g, dev).view(b, 1, 1, 1).to(x.dtype)
    return (x - mean) * c + mean + shift


def gaussian_blur(x: Tensor, cfg: AugmentConfig, g: torch.Generator | None) -> Tensor:
    """Per-image sigma, applied with probability blur_p; separable grouped convolution (one call per axis)."""
    b, _, s, _ = x.shape
    dev = x.device
    scale = s / 224
    sig_hi = max(cfg.blur_sigma[1] * scale, 1e-3)
    sigma = _uniform(b, cfg.blur_sigma[0] * scale, sig_hi, g, dev).clamp(min=1e-3)
    apply = _uniform(b, 0.0, 1.0, g, dev) < cfg.blur_p
    radius = max(1, min(int(math.ceil(3 * sig_hi)), (s - 1) // 2))
    t = torch.arange(-radius, radius + 1, device=dev, dtype=x.dtype)
    k = torch.exp(-0.5 * (t[None, :] / sigma[:, None].to(x.dtype)) ** 2)
    k = k / k.sum(dim=1, keepdim=True)
    delta = (t == 0).to(x.dtype)[None, :].expand_as(k)
    k = torch.where(apply[:, None], k, delta)  # unblurred images get an identity kernel
    y = F.pad(x.reshape(1, b, s, s), (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, k.view(b, 1, 1, -1), groups=b)
    y = F.conv2d(y, k.view(b, 1, -1, 1), groups=b)
    return y.reshape(b, 1, s, s)


def gaussian_noise(x: Tensor, cfg: AugmentConfig, g: torch.Generator | None) -> Tensor:
    """Additive noise with a per-image std, applied with probability noise_p (detector noise)."""
    b, dev = x.shape[0], x.device
    std = _uniform(b, *cfg.noise_std, g, dev) * (_uniform(b, 0.0, 1.0, g, dev) < cfg.noise_p)
    gdev = g.device if g is not None else torch.device("cpu")
    noise = torch.randn(x.shape, generator=g, device=gdev, dtype=torch.float32).to(dev, x.dtype)
    return x + noise * std.view(b, 1, 1, 1).to(x.dtype)


def augment(x: Tensor, cfg: AugmentConfig, g: torch.Generator | None = None) -> Tensor:
    """One random view of each image in `x` [B,1,S,S] float in [0,1]; output in [0,1]."""
    x = random_resized_crop_rotate(x, cfg, g)
    x = intensity(x, cfg, g)
    x = gaussian_blur(x, cfg, g)
    x = gaussian_noise(x, cfg, g)
    return x.clamp_(0.0, 1.0)


def make_views(batch: Tensor, cfg: AugmentConfig | None = None,
               generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Two independent random views of each image; `generator` (CPU or the batch's device) seeds both."""
    cfg = cfg or AugmentConfig()
    return augment(batch, cfg, generator), augment(batch, cfg, generator)


def v2_transform(cfg: AugmentConfig | None = None, size: int = 224):
    """The same recipe as a per-image torchvision.transforms.v2 pipeline (for DataLoader workers)."""
    from torchvision.transforms import v2

    cfg = cfg or AugmentConfig()
    steps = [v2.RandomResizedCrop(size, scale=cfg.crop_scale, ratio=cfg.crop_ratio, antialias=True),
             v2.RandomAffine(degrees=cfg.rotate_deg)]
    if cfg.hflip:
        steps.append(v2.RandomHorizontalFlip())
    sigma = tuple(s * size / 224 for s in cfg.blur_sigma)
    kernel = 2 * max(1, round(3 * sigma[1])) + 1
    steps += [v2.ColorJitter(brightness=cfg.brightness, contrast=cfg.contrast),
              v2.RandomApply([v2.GaussianBlur(kernel_size=kernel, sigma=sigma)], p=cfg.blur_p),
              v2.RandomApply([v2.GaussianNoise(sigma=cfg.noise_std[1], clip=True)], p=cfg.noise_p)]
    return v2.Compose(steps)
