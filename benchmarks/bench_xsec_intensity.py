"""Which intensity mapping for CT and MR (issue 27): measured on the real shared CT/MR files.

CT: where water (0 HU), fat (-100 HU) and cortical bone (+1000 HU) land on [0, 1] under (a) each file's own
header window (what a viewer shows, what fedrad did for radiographs), (b) a per-image robust min-max, and
(c) HU stored linearly with a fixed preset (common/intensity.py). The spread across files of a tissue's grey
level is the inconsistency a model has to learn away: with (a) and (b) it depends on the scanner and the field
of view, with (c) it is zero by construction, so the cost of (c) is what it clips: the share of each file's
body pixels (> -900 HU) each preset saturates is reported too.
MR: the 10-frame enhanced MR: frame mean brightness after per-frame percentile scaling vs the per-series
affine, against the frames' true (stored-value) mean; per-frame scaling flattens real differences.

Run: python benchmarks/bench_xsec_intensity.py [SHARED_DATA] [--no-record]  (prints a markdown table and records
its numbers in benchmarks/results/xsec_intensity.jsonl; ~5 s on 2 cores)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common_bench import bench_command, record_row  # noqa: E402

# (metric, value, unit, extra) of the tables, for record_row
FOUND: list[tuple[str, float, str, dict]] = []


def _ct_files(root: Path) -> list[Path]:
    import csv

    with open(root / "INDEX.csv", newline="") as f:
        return [root / r["file"] for r in csv.DictReader(f) if r["modality"] == "CT"]


def ct_table(root: Path) -> list[str]:
    import pydicom
    from pydicom.pixels import apply_modality_lut

    from fedrad.common.intensity import PRESETS, hu_to_unit

    tissues = {"water 0": 0.0, "fat -100": -100.0, "bone +1000": 1000.0}
    levels: dict[str, dict[str, list[float]]] = {m: {t: [] for t in tissues} for m in ("header window", "min-max")}
    sat: dict[str, list[float]] = {p: [] for p in PRESETS}
    n = 0
    for path in _ct_files(root):
        ds = pydicom.dcmread(path, force=True)
        if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
            ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
        try:
            arr = ds.pixel_array
        except Exception:  # noqa: BLE001 - a decoder missing here: that file is left out of the table
            continue
        frames = arr if arr.ndim == 3 else arr[None]
        shared = ds.get("SharedFunctionalGroupsSequence")
        view = ds
        if shared and shared[0].get("PixelValueTransformationSequence"):
            view = shared[0].PixelValueTransformationSequence[0]
            view.PixelRepresentation = ds.PixelRepresentation
        for fr in frames:
            hu = np.asarray(apply_modality_lut(fr, view), dtype=np.float64)
            n += 1
            wc, ww = ds.get("WindowCenter"), ds.get("WindowWidth")
            lo, hi = np.percentile(hu, [0.5, 99.5])
            for t, v in tissues.items():
                if wc is not None and ww is not None:
                    c = float(wc[0] if isinstance(wc, pydicom.multival.MultiValue) else wc)
                    w = float(ww[0] if isinstance(ww, pydicom.multival.MultiValue) else ww)
                    levels["header window"][t].append(float(np.clip((v - (c - w / 2)) / w, 0, 1)))
                levels["min-max"][t].append(float(np.clip((v - lo) / (hi - lo), 0, 1)) if hi > lo else 0.0)
            body = hu[hu > -900]
            for p, (c, w) in PRESETS.items():
                sat[p].append(float(((body < c - w / 2) | (body > c + w / 2)).mean()) if body.size else 0.0)
    _ = hu_to_unit  # the stored scale (c) maps each tissue to one fixed value in every file
    out = [f"CT: {n} real CT images (18 files); grey level of a tissue across images: mean +- std (min..max)", "",
           "| mapping | " + " | ".join(tissues) + " |", "|---|" + "---|" * len(tissues)]
    for m, per in levels.items():
        cells = [f"{np.mean(v):.2f} +- {np.std(v):.2f} ({min(v):.2f}..{max(v):.2f}), n={len(v)}" if v else "-"
                 for v in per.values()]
        out.append(f"| {m} | " + " | ".join(cells) + " |")
        FOUND.extend((f"{m} {t} HU", round(float(np.mean(v)), 2), "grey level (0..1)",
                      {"text": f"{np.mean(v):.2f} +- {np.std(v):.2f} ({min(v):.2f}..{max(v):.2f})", "n": len(v)})
                     for t, v in per.items() if v)
    c, w = PRESETS["soft_tissue"]
    fixed = [f"{float(np.clip((v - c + w / 2) / w, 0, 1)):.2f} +- 0.00" for v in tissues.values()]
    out.append("| HU + soft-tissue preset | " + " | ".join(fixed) + " |")
    FOUND.extend((f"HU + soft-tissue preset {t} HU", float(x.split()[0]), "grey level (0..1)", {"text": x})
                 for t, x in zip(tissues, fixed, strict=True))
    FOUND.extend((f"{p} preset: share of body pixels saturated", round(float(np.mean(v)), 2), "fraction", {})
                 for p, v in sat.items())
    out += ["", "share of body pixels (> -900 HU) each preset saturates, mean over the images:", "",
            "| preset | " + " | ".join(PRESETS) + " |", "|---|" + "---|" * len(PRESETS),
            "| saturated | " + " | ".join(f"{np.mean(v):.2f}" for v in sat.values()) + " |"]
    return out


def mr_table(root: Path) -> list[str]:
    import pydicom
    from pydicom.pixels import apply_modality_lut

    from fedrad.common.dicom_io import decode_item
    from fedrad.common.intensity import series_affines

    path = root / "pydicom_emri_small_enhanced_mr_10frames_explicitLE.dcm"
    frames, _h = decode_item(path, 64)
    ds = pydicom.dcmread(path)
    raw = np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float64)
    true_mean = raw.reshape(len(raw), -1).mean(axis=1)
    per_frame = frames.images.astype(np.float64).reshape(len(raw), -1).mean(axis=1) / 65535
    vr = np.array([m["value_range"] for m in frames.metas])
    aff = series_affines(vr[:, 0], vr[:, 1], np.zeros(len(vr), dtype=np.int64))
    x = frames.images.astype(np.float64) / 65535
    per_series = np.clip(x * aff[:, 0, None, None] + aff[:, 1, None, None], 0, 1).reshape(len(raw), -1).mean(axis=1)
    r1 = np.corrcoef(true_mean, per_frame)[0, 1]
    r2 = np.corrcoef(true_mean, per_series)[0, 1]
    spread = true_mean.std() / true_mean.mean()
    for name, r, m in (("per frame (0.5/99.5 percentiles)", r1, per_frame), ("per series (median percentile range)", r2,
                                                                            per_series)):
        FOUND.append((f"MR {name}: Pearson r with true frame mean", round(float(r), 3), "r", {}))
        FOUND.append((f"MR {name}: relative spread of frame means", round(float(m.std() / m.mean()), 3), "",
                      {"true_spread": round(float(spread), 3)}))
    return ["", "MR: enhanced MR, 10 frames; frame mean brightness vs the frames' stored-value mean", "",
            "| normalisation | Pearson r with true frame mean | relative spread of frame means (true: "
            f"{spread:.3f}) |", "|---|---|---|",
            f"| per frame (0.5/99.5 percentiles) | {r1:.3f} | {per_frame.std() / per_frame.mean():.3f} |",
            f"| per series (median percentile range) | {r2:.3f} | {per_series.std() / per_series.mean():.3f} |"]


def main() -> int:
    args = [a for a in sys.argv[1:] if a != "--no-record"]
    base = Path(args[0] if args else os.environ.get("FEDRAD_SHARED_DATA", "../shared/data"))
    root = base / "dicom_xsec"
    if not (root / "INDEX.csv").is_file():
        print(f"no shared dicom_xsec under {base}", file=sys.stderr)
        return 2
    print("\n".join(ct_table(root) + mr_table(root)))
    if "--no-record" not in sys.argv[1:]:
        for metric, value, unit, extra in FOUND:
            record_row("xsec_intensity", metric, value, unit, command=bench_command(__file__), **extra)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
