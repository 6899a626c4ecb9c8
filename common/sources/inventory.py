"""What `fedrad scan` reports about a source beyond its usable and skipped items: the facts of its layout.

Each reader answers `Reader.inventory(listing, results, salt)` (common/sources/base.py) with an `Inventory`:
the report keys its layout adds, the salted patient key of each usable item and any folders it could not walk.
A source whose items carry header signals (a DICOM folder, a PACS) reports them with `header_inventory`:
counts of modality, body part, view, photometric, transfer syntax, bit depth, sex and age, its labels CSV,
volumes (studies, series, slices, frames per modality) and the frames skipped. A PNG/JPEG folder reports its
manifest instead (image_folder.py). The scan (client/site/scan.py) adds what they return to its report without
asking which layout it read.

`results[i]` is the scan's record of `listing.items[i]`: `ok`, the header signals of a usable item, `patient`
(its salted key) and, for a decoded multi-frame object, `frames_ok`, `frame_metas` and `frames_skipped`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedrad.common.header_signals import UNKNOWN, age_bucket, contrast_label, plane_label
from fedrad.common.series import group_series
from fedrad.common.sources.walk import Problem, display_name

if TYPE_CHECKING:
    from fedrad.common.sources.base import Listing


@dataclass
class Inventory:
    """A layout's part of the scan report: `report` its keys in the report's order, `patients` the salted
    patient key of each usable item (counted, never named), `folders` the folders it could not walk beyond the
    listing's own."""

    report: dict[str, Any]
    patients: list[str]
    folders: list[Problem] = field(default_factory=list)


def counts(values: Iterable[Any]) -> dict[str, int]:
    """How often each value occurs, most common first; empty values count as 'unknown', names are escaped."""
    return dict(Counter(display_name(str(v)) if v not in (None, "") else UNKNOWN for v in values).most_common())


def usable(results: list[dict]) -> list[int]:
    """The indices of the usable items."""
    return [i for i, r in enumerate(results) if r["ok"]]


def header_inventory(listing: Listing, results: list[dict], labels_csv: Path | None = None) -> Inventory:
    """The inventory of a source whose items carry header signals (a DICOM folder, a PACS)."""
    ok = usable(results)
    rel = [display_name(it.item_id) for it in listing.items]
    good = [results[i] for i in ok]
    report: dict[str, Any] = {
        "files_seen": listing.files_seen,
        "candidates": len(listing.items),
        "ignored": [display_name(p) for p in listing.ignored],
        "modality": counts(r.get("modality") for r in good),
        "body_part": counts(r.get("body_part") for r in good),
        "view": counts(r.get("view") for r in good),
        "photometric": counts(r.get("photometric") for r in good),
        "transfer_syntax": counts(r.get("transfer_syntax_name") or r.get("transfer_syntax") for r in good),
        "bits_stored": counts(r.get("bits_stored") for r in good),
        "sex": counts(r.get("sex") for r in good),
        "age": counts(age_bucket(r.get("age_years")) for r in good),
    }
    if labels_csv is not None:
        report["labels_csv"] = display_name(labels_csv.name)
    report["volumes"] = volumes(results, ok, rel)
    report["frames_skipped"] = [{"file": rel[i], "frame": k, "reason": why, "detail": display_name(more)}
                                for i in ok for k, why, more in results[i].get("frames_skipped", [])]
    for r in good:  # per-frame details stay out of the JSON's per-file rows
        r.pop("frame_metas", None)
    return Inventory(report, [results[i].get("patient") or f"item:{i}" for i in ok])


def volumes(results: list[dict], ok: list[int], rel: list[str]) -> dict:
    """Studies, series, slices and frames per modality, and how each series was ordered (series.py)."""
    per: dict[str, dict] = {}
    images: list[dict] = []
    for i in ok:
        r = results[i]
        m = per.setdefault(display_name(r.get("modality") or UNKNOWN), {"studies": set(), "series": set(),
                                                                       "slices": 0, "frames": 0, "files": 0})
        m["files"] += 1
        m["studies"].add(r.get("study_key") or f"file:{i}")
        m["series"].add(r.get("series_key") or f"file:{i}")
        base = {"series_uid": r.get("series_key") or "", "instance_number": r.get("instance_number"), "file": rel[i],
                "sop_key": r.get("sop_key") or ""}
        if "frames_ok" in r:
            m["frames"] += r["frames_ok"]
            images += [{**base, **fm, "instance_number": fm.get("frame")} for fm in r.get("frame_metas", [])]
        elif int(r.get("frames") or 1) > 1:  # --no-decode: the header's frame count, no per-frame geometry
            m["frames"] += int(r["frames"])
        else:
            m["slices"] += 1
            images.append({**base, "position": r.get("position"), "orientation": r.get("orientation")})
    series = [s for s in group_series(images) if len(s.members) > 1]
    order = Counter(s.ordered_by for s in series)
    independent = [{"files": sorted({images[j]["file"] for j in s.members})[:3], "images": len(s.members),
                    "reason": s.reason} for s in series if s.independent]
    spacing = [round(s.spacing, 3) for s in series if s.spacing]
    return {"by_modality": {k: {"studies": len(v["studies"]), "series": len(v["series"]), "slices": v["slices"],
                                "frames": v["frames"], "files": v["files"]} for k, v in sorted(per.items())},
            "plane": counts(plane_label(results[i].get("orientation")) for i in ok),
            "contrast": counts(contrast_label(results[i].get("contrast"), results[i].get("modality")) for i in ok),
            "series_ordered_by": dict(order.most_common()), "series_independent": independent,
            "slice_spacing_mm": sorted(set(spacing))}


__all__ = ["Inventory", "counts", "header_inventory", "usable", "volumes"]
