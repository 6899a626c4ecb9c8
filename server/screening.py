"""Screen client updates before aggregation: a single broken or poisoned site must not wreck the model."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, Message


@dataclass
class ScreeningReport:
    accepted: list[int] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)
    update_norms: dict[int, float] = field(default_factory=dict)


def _check_arrays(arrays: ArrayRecord, reference: dict[str, np.ndarray]) -> tuple[str | None, float]:
    """Return (reason to reject or None, L2 distance of the update from the global model)."""
    if set(arrays.keys()) != set(reference.keys()):
        missing = set(reference) - set(arrays.keys())
        extra = set(arrays.keys()) - set(reference)
        return f"array names differ (missing {sorted(missing)[:3]}, extra {sorted(extra)[:3]})", 0.0
    sq = 0.0
    for key, ref in reference.items():
        arr = arrays[key].numpy()
        if arr.shape != ref.shape:
            return f"'{key}' has shape {arr.shape}, expected {ref.shape}", 0.0
        if arr.dtype != ref.dtype:
            return f"'{key}' has dtype {arr.dtype}, expected {ref.dtype}", 0.0
        if arr.dtype.kind == "f":
            if not np.isfinite(arr).all():
                return f"'{key}' holds NaN or Inf", 0.0
            sq += float(np.sum((arr.astype(np.float64) - ref.astype(np.float64)) ** 2))
    return None, float(np.sqrt(sq))


def screen_replies(
    replies: list[Message], global_arrays: ArrayRecord, outlier_factor: float
) -> tuple[list[Message], ScreeningReport]:
    """Keep replies whose arrays match the global model and whose update norm is not an outlier."""
    reference = {k: v.numpy() for k, v in global_arrays.items()}
    report = ScreeningReport()
    candidates: list[tuple[Message, float]] = []
    for msg in replies:
        node = int(msg.metadata.src_node_id)
        if msg.has_error():
            report.rejected[node] = f"error reply: {msg.error.reason}"
            continue
        if "arrays" not in msg.content:
            report.rejected[node] = "reply has no 'arrays' record"
            continue
        reason, norm = _check_arrays(msg.content["arrays"], reference)
        if reason:
            report.rejected[node] = reason
            continue
        report.update_norms[node] = norm
        candidates.append((msg, norm))
    kept: list[Message] = []
    if candidates and outlier_factor > 0:
        norms = sorted(n for _, n in candidates)
        # Lower median: with two sites, the smaller norm is the reference, so one wild update is caught.
        reference_norm = norms[(len(norms) - 1) // 2]
        for msg, norm in candidates:
            node = int(msg.metadata.src_node_id)
            if reference_norm > 0 and norm > outlier_factor * reference_norm:
                report.rejected[node] = (
                    f"update norm {norm:.3g} is over {outlier_factor:g}x the round's median {reference_norm:.3g}"
                )
            else:
                kept.append(msg)
    else:
        kept = [m for m, _ in candidates]
    report.accepted = [int(m.metadata.src_node_id) for m in kept]
    return kept, report
