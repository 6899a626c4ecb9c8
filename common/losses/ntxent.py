"""The shared contrastive code path: multi-positive NT-Xent (SupCon "L_out", Khosla et al. 2020).

With one label per pair (all distinct) it is exactly SimCLR's NT-Xent; with weak header labels it is
SupCon; with patient ids it is MICLe with all same-patient images as positives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def supcon_loss(z1: Tensor, z2: Tensor, labels: Tensor | None = None, temperature: float = 0.1,
                groups: Tensor | None = None) -> Tensor:
    """Mean over the 2N anchors of -1/|P(i)| sum_{p in P(i)} log softmax_{a != i}(z_i . z_a / t)[p].

    z1, z2: [N, D] projections of the two views of sample k (row k); labels: [N] ints (None: all distinct,
    i.e. NT-Xent); groups: [N] ints whose equal entries are positives too (the union with the labels' positives:
    MICLe + SupCon). Computed in float32 so bf16 autocast does not degrade the log-sum-exp.
    """
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2], dim=0).float(), dim=1)
    if labels is None:
        labels = torch.arange(n, device=z.device)
    labels = labels.to(z.device).reshape(-1)
    if labels.shape[0] != n:
        raise ValueError(f"labels has {labels.shape[0]} entries for {n} pairs")
    labels = torch.cat([labels, labels])
    logits = (z @ z.T) / temperature
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    pos = labels[:, None] == labels[None, :]
    if groups is not None:
        groups = groups.to(z.device).reshape(-1)
        if groups.shape[0] != n:
            raise ValueError(f"groups has {groups.shape[0]} entries for {n} pairs")
        groups = torch.cat([groups, groups])
        pos = pos | (groups[:, None] == groups[None, :])
    pos = pos & ~self_mask  # never empty: the other view shares the label
    pos_f = pos.float()
    mean_log_prob_pos = (log_prob.masked_fill(~pos, 0.0) * pos_f).sum(1) / pos_f.sum(1)
    return -mean_log_prob_pos.mean()
