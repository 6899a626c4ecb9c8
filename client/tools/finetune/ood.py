"""`--test-data OTHER`: train the probe on this site's labelled set, test it on another site's (REMEDIS's
out-of-distribution setting), so a site sees how the weights carry to a scanner and population they never saw.

The two sets become one LabelledSet with disjoint patient groups; the training side is the first set's official
train split when it has one (else all of it), the test side the other set's official test split (else all of
it). Both must end up with the same binary targets, or the AUCs would compare different questions.
"""

from __future__ import annotations

import numpy as np

from fedrad.client.evaluation.data import LabelledSet


def _part(data: LabelledSet, name: str) -> tuple[np.ndarray, str]:
    if data.split and name in data.split:
        return np.asarray(data.split[name]), f"official {name} split"
    return np.arange(len(data)), "all labelled images"


def combine_for_ood(train: LabelledSet, test: LabelledSet) -> tuple[LabelledSet, np.ndarray, np.ndarray, str]:
    """(combined set, train indices, test indices, split description); ValueError when the targets differ."""
    if list(train.targets) != list(test.targets):
        raise ValueError(f"--test-data {test.source}: its targets {test.targets} are not --data's {train.targets} "
                         "(pick the same columns with --target)")
    if train.images.shape[1:] != test.images.shape[1:]:
        raise ValueError(f"--test-data {test.source}: images {test.images.shape[1:]} vs {train.images.shape[1:]}")
    tr, tr_what = _part(train, "train")
    te, te_what = _part(test, "test")
    offset = int(train.groups.max()) + 1 if len(train.groups) else 0
    combined = LabelledSet(
        images=np.concatenate([train.images[tr], test.images[te]]),
        y=np.concatenate([train.y[tr], test.y[te]]),
        targets=list(train.targets),
        groups=np.concatenate([train.groups[tr], test.groups[te] + offset]).astype(np.int64),
        source=f"{train.source} -> {test.source}",
    )
    train_idx = np.arange(len(tr))
    test_idx = np.arange(len(tr), len(tr) + len(te))
    what = f"out-of-distribution: train {train.source} ({tr_what}), test {test.source} ({te_what})"
    return combined, train_idx, test_idx, what


__all__ = ["combine_for_ood"]
