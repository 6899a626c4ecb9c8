"""Slices as series: grouped by SeriesInstanceUID, ordered along the slice normal, thinned and capped.

A CT or MR series is hundreds of near-duplicate images; treated as unrelated images it dominates a site and
its neighbours leak across any split. Grouping follows the DICOM geometry: a slice's place in its series is
ImagePositionPatient projected on the normal of ImageOrientationPatient (row x column direction cosines),
InstanceNumber when positions are missing. A series whose slices disagree (orientations differ, two slices at
one position, positions missing on some) is kept as independent slices with the reason recorded, never
silently reordered. Sampling then keeps slices at least `min_spacing` mm apart and caps each series' share
of the images a local round draws from (`round_pool`), so one 2,000-slice CT cannot dominate a site.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

ORIENTATION_TOL = 1e-3  # direction cosines of slices of one stack agree to this
POSITION_TOL = 1e-3  # mm: two slices closer than this along the normal are at the same place


@dataclass
class Series:
    """One series: its members (indices into the input) in slice order, and how that order was found."""

    uid: str
    members: list[int]
    positions: list[float] = field(default_factory=list)  # along the normal (mm), aligned with members
    spacing: float | None = None  # median distance between neighbouring slices (mm)
    ordered_by: str = "position"  # position | instance-number | none (independent slices)
    reason: str = ""  # why the series is independent slices ('' when ordered)

    @property
    def independent(self) -> bool:
        return self.ordered_by == "none"


def slice_normal(orientation: Sequence[float]) -> np.ndarray:
    """Unit normal of the plane spanned by the row and column direction cosines."""
    o = np.asarray(orientation, dtype=np.float64)
    n = np.cross(o[:3], o[3:6])
    norm = np.linalg.norm(n)
    return n / norm if norm > 0 else n


def _instance(m: dict) -> tuple | None:
    """Which stored instance (and frame) an image is: copies of one instance (the same SOP Instance UID, e.g.
    one image exported in several transfer syntaxes) are one slice, not two slices at one position."""
    sop = m.get("sop_uid") or m.get("sop_key")
    return (sop, m.get("frame")) if sop else None


def order_series(uid: str, members: list[int], metas: Sequence[dict]) -> Series:
    """Order the `members` of one series (metas with position / orientation / instance_number); copies of
    one instance are ordered once and follow it."""
    first: dict[tuple, int] = {}
    copies: dict[int, list[int]] = defaultdict(list)
    unique: list[int] = []
    for i in members:
        key = _instance(metas[i])
        if key is not None and key in first:
            copies[first[key]].append(i)
        else:
            if key is not None:
                first[key] = i
            unique.append(i)
    s = _order_unique(uid, unique, metas)
    if not copies:
        return s
    out_m, out_p = [], []
    for j, i in enumerate(s.members):
        for c in [i, *copies.get(i, [])]:
            out_m.append(c)
            if s.positions:
                out_p.append(s.positions[j])
    s.members, s.positions = out_m, out_p
    return s


def _order_unique(uid: str, members: list[int], metas: Sequence[dict]) -> Series:
    ms = [metas[i] for i in members]
    if len(members) == 1:
        return Series(uid, members, [0.0], None, "position", "")
    orients = [m.get("orientation") for m in ms]
    positions = [m.get("position") for m in ms]
    if all(o is not None and len(o) == 6 for o in orients) and all(p is not None and len(p) == 3 for p in positions):
        o0 = np.asarray(orients[0], dtype=np.float64)
        if any(np.abs(np.asarray(o) - o0).max() > ORIENTATION_TOL for o in orients):
            return _independent(uid, members, "slice orientations differ within the series")
        normal = slice_normal(o0)
        if not normal.any():
            return _independent(uid, members, "ImageOrientationPatient has parallel row and column directions")
        d = np.asarray(positions, dtype=np.float64) @ normal
        order = np.argsort(d, kind="stable")
        ds = d[order]
        gaps = np.diff(ds)
        if (gaps < POSITION_TOL).any():
            return _independent(uid, members, "two or more slices at one position (several phases or echoes)")
        return Series(uid, [members[j] for j in order], [float(x) for x in ds], float(np.median(gaps)), "position")
    # InstanceNumber, then the frame within a multi-frame object (frames of one object share its number)
    numbers = [(m.get("instance_number"), m.get("frame") or 0) for m in ms]
    if all(isinstance(n, int) for n, _f in numbers) and len(set(numbers)) == len(numbers):
        order = sorted(range(len(numbers)), key=numbers.__getitem__)
        return Series(uid, [members[j] for j in order], [float(j) for j in range(len(order))], None,
                      "instance-number")
    return _independent(uid, members, "no usable ImagePositionPatient/ImageOrientationPatient or InstanceNumber")


def _independent(uid: str, members: list[int], reason: str) -> Series:
    return Series(uid, list(members), [], None, "none", reason)


def group_series(metas: Sequence[dict]) -> list[Series]:
    """Every image in exactly one Series: same `series_uid` together ('' = each image its own series)."""
    by_uid: dict[str, list[int]] = defaultdict(list)
    alone: list[int] = []
    for i, m in enumerate(metas):
        uid = m.get("series_uid") or ""
        (by_uid[uid] if uid else alone).append(i)
    out = [order_series(uid, members, metas) if len(members) > 1 else Series(uid, members, [0.0], None, "position")
           for uid, members in by_uid.items()]  # one image: nothing to order (10^5 radiographs, node start)
    out += [Series("", [i], [0.0], None, "position") for i in alone]
    return out


def series_arrays(metas: Sequence[dict]) -> tuple[np.ndarray, np.ndarray, list[Series]]:
    """(series id per image (int64), position along its series' normal per image (NaN if unordered), series)."""
    series = group_series(metas)
    sid = np.zeros(len(metas), dtype=np.int64)
    pos = np.full(len(metas), np.nan)
    for s_i, s in enumerate(series):
        sid[s.members] = s_i
        if len(s.members) > 1 and s.ordered_by == "position":
            pos[s.members] = s.positions
    return sid, pos, series


def thin_by_spacing(indices: np.ndarray, series_id: np.ndarray, position: np.ndarray,
                    min_spacing: float) -> np.ndarray:
    """Keep, per ordered series, slices at least `min_spacing` mm after the last one kept (first kept)."""
    indices = np.asarray(indices)
    if min_spacing <= 0 or not len(indices):
        return indices
    keep = np.ones(len(indices), dtype=bool)
    sids, pos = series_id[indices], position[indices]
    for s in np.unique(sids):
        at = np.flatnonzero((sids == s) & np.isfinite(pos))
        if len(at) < 2:
            continue
        at = at[np.argsort(pos[at], kind="stable")]
        last = -np.inf
        for j in at:
            if pos[j] - last >= min_spacing - 1e-6:
                last = pos[j]
            else:
                keep[j] = False
    return indices[keep]


def series_quota(sizes: np.ndarray, max_share: float) -> int:
    """Largest number of images any one group may put in a round's pool so that no group is more than
    `max_share` of the pool (never below an equal share when there are fewer than 1/max_share groups)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    if not len(sizes) or max_share <= 0 or max_share >= 1:
        return int(sizes.max()) if len(sizes) else 0
    share = max(max_share, 1.0 / len(sizes))
    k = int(sizes.max())
    for _ in range(64):  # fixed point of k = share * pool(k); pool shrinks as k does
        pool = int(np.minimum(sizes, k).sum())
        nk = max(1, int(share * pool))
        if nk >= k:
            break
        k = nk
    return k


def round_pool(indices: np.ndarray, series_id: np.ndarray, max_share: float, rng: np.random.Generator,
               ) -> np.ndarray:
    """The images one round draws from: every series over its quota contributes a fresh random subset of
    quota size (so successive rounds see different slices), the others all their images; sorted."""
    indices = np.asarray(indices)
    if max_share <= 0 or max_share >= 1 or not len(indices):
        return indices
    sids = series_id[indices]
    uniq, inv, sizes = np.unique(sids, return_inverse=True, return_counts=True)
    k = series_quota(sizes, max_share)
    if k >= sizes.max():
        return indices
    keep = np.ones(len(indices), dtype=bool)
    for g in np.flatnonzero(sizes > k):
        at = np.flatnonzero(inv == g)
        drop = rng.choice(at, size=len(at) - k, replace=False)
        keep[drop] = False
    return indices[keep]


SLICE_BLOCK_MM = 10.0  # nearby-slice positives: slices of one series within a block this thick


def neighbour_groups(series_id: np.ndarray, position: np.ndarray, block_mm: float = SLICE_BLOCK_MM) -> np.ndarray:
    """int64 group per image: (series, block of `block_mm` along its normal) for ordered slices, else a group
    of its own (the objective "slices" then pairs it with a second augmentation of itself)."""
    n = len(series_id)
    out = np.arange(n, dtype=np.int64) + 1  # own groups: 1..n
    ok = np.isfinite(position)
    if ok.any():
        start = {s: np.nanmin(position[ok & (series_id == s)]) for s in np.unique(series_id[ok])}
        block = np.array([np.floor((p - start[s]) / block_mm) if f else 0 for s, p, f in
                          zip(series_id, position, ok, strict=True)], dtype=np.int64)
        keys = series_id.astype(np.int64) * (1 << 20) + block
        _, inv = np.unique(keys[ok], return_inverse=True)
        out[ok] = -(inv.astype(np.int64) + 1)  # shared groups: negative ids, never equal to an own group
    return out
