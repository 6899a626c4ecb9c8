"""Batched radiograph augmentations: per-sample randomness, determinism, range, speed."""

from __future__ import annotations

import torch

from fedrad.common.augment import AugmentConfig, augment, make_views, v2_transform

IDENTITY = AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), rotate_deg=0.0, brightness=0.0,
                         contrast=0.0, gamma=(1.0, 1.0), blur_p=0.0, noise_p=0.0)


def _batch(b: int = 8, s: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(b, 1, s, s, generator=g)


def test_shapes_range_and_dtype() -> None:
    x = _batch()
    v1, v2 = make_views(x, AugmentConfig(), torch.Generator().manual_seed(1))
    assert v1.shape == v2.shape == x.shape and v1.dtype == torch.float32
    assert float(v1.min()) >= 0.0 and float(v1.max()) <= 1.0
    assert not torch.equal(v1, v2)


def test_seeded_views_reproduce() -> None:
    x = _batch()
    a = make_views(x, AugmentConfig(), torch.Generator().manual_seed(5))
    b = make_views(x, AugmentConfig(), torch.Generator().manual_seed(5))
    c = make_views(x, AugmentConfig(), torch.Generator().manual_seed(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_per_sample_randomness() -> None:
    x = _batch(1).expand(6, 1, 32, 32).contiguous()  # six copies of one image
    v = augment(x, AugmentConfig(), torch.Generator().manual_seed(0))
    diffs = [float((v[0] - v[i]).abs().mean()) for i in range(1, 6)]
    assert min(diffs) > 1e-3


def test_identity_config_is_identity() -> None:
    x = _batch()
    y = augment(x, IDENTITY, torch.Generator().manual_seed(0))
    assert torch.allclose(x, y, atol=1e-5)


def test_no_flip_by_default_keeps_sides() -> None:
    x = torch.zeros(16, 1, 32, 32)
    x[..., :12] = 1.0  # bright left side ("heart")
    cfg = AugmentConfig(brightness=0.0, contrast=0.0, noise_p=0.0)
    v = augment(x, cfg, torch.Generator().manual_seed(0))
    assert bool((v[..., :16].mean(dim=(1, 2, 3)) > v[..., 16:].mean(dim=(1, 2, 3))).all())
    flipped = augment(x, AugmentConfig(hflip=True, noise_p=0.0), torch.Generator().manual_seed(0))
    assert bool((flipped[..., :16].mean(dim=(1, 2, 3)) < flipped[..., 16:].mean(dim=(1, 2, 3))).any())


def test_blur_and_noise_pieces_change_images() -> None:
    x = _batch()
    blur_only = AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), rotate_deg=0.0, brightness=0.0,
                              contrast=0.0, gamma=(1.0, 1.0), blur_p=1.0, blur_sigma=(2.0, 4.0), noise_p=0.0)
    y = augment(x, blur_only, torch.Generator().manual_seed(0))
    assert float(y.std()) < float(x.std())  # blurring white noise lowers its variance
    noise_only = AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), rotate_deg=0.0,
                               brightness=0.0, contrast=0.0, gamma=(1.0, 1.0), blur_p=0.0, noise_p=1.0,
                               noise_std=(0.05, 0.05))
    flat = torch.full((4, 1, 32, 32), 0.5)
    n = augment(flat, noise_only, torch.Generator().manual_seed(0))
    assert 0.03 < float(n.std()) < 0.07


def test_v2_per_image_pipeline_runs() -> None:
    t = v2_transform(AugmentConfig(), size=32)
    out = t(torch.rand(1, 48, 48))
    assert out.shape == (1, 32, 32)
