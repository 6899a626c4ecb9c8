"""`fedrad scan`: the first thing hospital IT runs, to see exactly what a site would train on.

It walks the folder, reads every candidate file, optionally decodes the pixels (proof that each image is
usable), and prints an inventory: usable vs skipped (each skipped file with its reason), modalities, body
parts, views, photometric, transfer syntaxes, bit depths and patient counts. Patient IDs are only counted
(through an in-memory random salt that is never stored), so the JSON report holds no identifiers.
Nothing leaves the machine: the scan reads local files and writes one local JSON file.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import sys
import time
from collections import Counter
from functools import partial
from pathlib import Path

from fedrad.client.site_data import (
    csv_columns,
    detect_layout,
    image_entry,
    is_writable_dir,
    read_csv,
    split_candidates,
    walk_files,
)
from fedrad.common.atomic import atomic_write_bytes
from fedrad.common.cache import map_files
from fedrad.common.dicom_io import SkipImage, check_dicom, decode_with_header
from fedrad.common.header_signals import UNKNOWN, age_bucket, patient_key

SCAN_SIZE = 32  # decode target: the full-resolution decode is the proof, the small output is thrown away
MAX_FILES_LISTED = 200  # larger folders: per-file lines only in the JSON
NOTHING_SENT = "Nothing was sent anywhere: this scan read local files only and used no network."


def _scan_dicom_one(decode: bool, salt: bytes, path: str) -> dict:
    """One file -> a JSON-able record (never raises: a worker must survive any file)."""
    try:
        h = decode_with_header(path, SCAN_SIZE)[1] if decode else check_dicom(path)
    except SkipImage as exc:
        return {"ok": False, "reason": exc.reason, "detail": exc.detail}
    except Exception as exc:  # noqa: BLE001 - report rather than crash the scan
        return {"ok": False, "reason": "decode-failed", "detail": f"{type(exc).__name__}: {exc}"[:240]}
    d = h.as_dict()
    pid, study = d.pop("patient_id"), d.pop("study_uid")
    d["patient"] = patient_key(pid, study or h.sop_uid or path, salt)
    d.pop("sop_uid")
    d["ok"] = True
    return d


def _scan_image_one(decode: bool, path: str) -> dict:
    if not os.path.isfile(path):
        return {"ok": False, "reason": "unreadable", "detail": "listed in the manifest but not found"}
    if not decode:
        return {"ok": True}
    try:
        image_entry(path, SCAN_SIZE, b"")
    except SkipImage as exc:
        return {"ok": False, "reason": exc.reason, "detail": exc.detail}
    except Exception as exc:  # noqa: BLE001
        return {"ok": False, "reason": "decode-failed", "detail": f"{type(exc).__name__}: {exc}"[:240]}
    return {"ok": True}


def _file_row(rel: str, r: dict) -> dict:
    """Per-file line of the inventory (no identifiers: only technical header fields)."""
    row = {"file": rel, "status": "ok" if r["ok"] else r["reason"]}
    for k in ("modality", "photometric", "bits_stored", "rows", "cols", "transfer_syntax_name"):
        if k in r:
            row[k] = r[k]
    return row


def _counts(values) -> dict[str, int]:
    return dict(Counter(str(v) if v not in (None, "") else UNKNOWN for v in values).most_common())


def _per_patient(keys: list[str]) -> dict[str, float]:
    per = list(Counter(keys).values())
    if not per:
        return {"min": 0, "median": 0, "max": 0}
    return {"min": min(per), "median": float(statistics.median(per)), "max": max(per)}


def scan_folder(path: str | os.PathLike[str], decode: bool = True, progress: bool = True) -> dict:
    """Inventory of a DICOM folder (or PNG/JPEG folder with manifest.csv/labels.csv) as a JSON-able dict.

    Raises FileNotFoundError if `path` is not a folder. Unusable files never raise; they are listed in
    `skipped` with their reason.
    """
    t0 = time.perf_counter()
    root = Path(path).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"folder not found: {path}")
    layout, found = detect_layout(root)
    files = walk_files(root)
    salt = secrets.token_bytes(32)  # in memory only: patients can be counted but not identified
    report: dict = {"folder": str(root), "layout": layout, "decoded": bool(decode), "files_seen": len(files)}

    if layout == "images":
        rows = read_csv(found)
        paths = [str((root / r.get("image", "")).resolve()) for r in rows]
        results = list(map_files(partial(_scan_image_one, decode), paths, paths, progress=progress,
                                 desc="checking images"))
        listed = set(paths)
        report["manifest"] = found.name
        report["not_in_manifest"] = sum(1 for p in files if str(p) not in listed and p != found
                                        and p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        ok = [i for i, r in enumerate(results) if r["ok"]]
        keys = [patient_key(rows[i].get("patient_id", ""), f"image:{rows[i].get('image', '')}", salt) for i in ok]
        label_cols = [c for c in csv_columns(found) if c not in ("image", "patient_id")]
        report["labels"] = {c: _counts(rows[i].get(c, "") for i in ok) for c in label_cols
                            if len({rows[i].get(c, "") for i in ok}) <= 20}
        rel = [rows[i].get("image", "") for i in range(len(rows))]
        report["candidates"] = len(rows)
        report["ignored"] = []
    else:
        cands, ignored = split_candidates(files)
        paths = [str(p) for p in cands]
        results = list(map_files(partial(_scan_dicom_one, decode, salt), paths, paths, progress=progress,
                                 desc="decoding" if decode else "reading headers"))
        ok = [i for i, r in enumerate(results) if r["ok"]]
        keys = [results[i]["patient"] for i in ok]
        rel = [os.path.relpath(p, root) for p in paths]
        report["candidates"] = len(cands)
        report["ignored"] = [os.path.relpath(p, root) for p in ignored]
        good = [results[i] for i in ok]
        report["modality"] = _counts(r["modality"] for r in good)
        report["body_part"] = _counts(r["body_part"] for r in good)
        report["view"] = _counts(r["view"] for r in good)
        report["photometric"] = _counts(r["photometric"] for r in good)
        report["transfer_syntax"] = _counts(r["transfer_syntax_name"] or r["transfer_syntax"] for r in good)
        report["bits_stored"] = _counts(r["bits_stored"] for r in good)
        report["sex"] = _counts(r["sex"] for r in good)
        report["age"] = _counts(age_bucket(r["age_years"]) for r in good)
        if found is not None:
            report["labels_csv"] = found.name

    skipped = [{"file": rel[i], "reason": r["reason"], "detail": r.get("detail", "")}
               for i, r in enumerate(results) if not r["ok"]]
    report["files"] = [_file_row(rel[i], r) for i, r in enumerate(results)]
    report["usable"] = len(ok)
    report["skipped"] = skipped
    report["skipped_by_reason"] = dict(Counter(s["reason"] for s in skipped).most_common())
    report["patients"] = len(set(keys))
    report["images_per_patient"] = _per_patient(keys)
    report["seconds"] = round(time.perf_counter() - t0, 3)
    report["network_used"] = False
    return report


def _fmt_counts(d: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in d.items()) if d else "-"


def format_report(r: dict) -> str:
    """The human-readable table printed by `fedrad scan`."""
    kind = "DICOM folder" if r["layout"] == "dicom" else f"image folder ({r.get('manifest', '')})"
    lines = [f"fedrad scan: {r['folder']}  [{kind}]", ""]
    row = "  {:<22}{}".format
    extra = ""
    if r["layout"] == "dicom" and r["ignored"]:
        by_ext = Counter(Path(p).suffix.lower() or Path(p).name for p in r["ignored"])
        extra = f"  ({r['candidates']} read as DICOM; ignored as non-DICOM: {_fmt_counts(dict(by_ext))})"
    lines.append(row("files seen", f"{r['files_seen']}{extra}"))
    lines.append(row("images usable", f"{r['usable']} of {r['candidates']}"
                     + ("" if r["decoded"] else "  (headers checked, pixels not decoded: --no-decode)")))
    lines.append(row("images skipped", str(len(r["skipped"]))))
    for reason, n in r["skipped_by_reason"].items():
        lines.append(row(f"  {reason}", str(n)))
    for s in r["skipped"]:
        detail = s["detail"] if len(s["detail"]) <= 150 else s["detail"][:147] + "..."
        lines.append(f"      - {s['file']}: {s['reason']}" + (f" ({detail})" if detail else ""))
    if r["layout"] == "dicom":
        for key, label in (("modality", "modality"), ("body_part", "body part"), ("view", "view"),
                           ("photometric", "photometric"), ("transfer_syntax", "transfer syntax"),
                           ("bits_stored", "bits stored"), ("sex", "sex"), ("age", "age")):
            lines.append(row(label, _fmt_counts(r[key])))
        if r.get("labels_csv"):
            lines.append(row("labels CSV", r["labels_csv"]))
    else:
        for col, counts in r.get("labels", {}).items():
            lines.append(row(f"label {col}", _fmt_counts(counts)))
        if r.get("not_in_manifest"):
            lines.append(row("not in manifest", str(r["not_in_manifest"])))
    if r["layout"] == "dicom" and 0 < len(r["files"]) <= MAX_FILES_LISTED:
        lines += ["", "  files:"]
        width = max(len(f["file"]) for f in r["files"])
        for f in r["files"]:
            tech = (f"{f.get('modality') or '?':<3} {f.get('photometric', ''):<11} {f.get('bits_stored', '')!s:>2} bit "
                    f"{f.get('rows', '')}x{f.get('cols', '')} {f.get('transfer_syntax_name', '')}"
                    if f["status"] == "ok" else "")
            lines.append(f"    {f['file']:<{width}}  {f['status']:<14} {tech}".rstrip())
        lines.append("")
    ipp = r["images_per_patient"]
    lines.append(row("patients", f"{r['patients']}  (counted only; no ID is printed or saved)"))
    lines.append(row("images per patient", f"min {ipp['min']} / median {ipp['median']:g} / max {ipp['max']}"))
    lines.append(row("time", f"{r['seconds']:.1f} s"))
    return "\n".join(lines)


def _write_json(report: dict, json_out: str | None, data: Path) -> Path:
    payload = json.dumps(report, indent=2, ensure_ascii=False).encode("utf-8")
    if json_out:
        out = Path(json_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out, payload)
        return out
    try:
        if not is_writable_dir(data):
            raise PermissionError(str(data))
        out = data / ".fedrad-scan.json"
        atomic_write_bytes(out, payload)
    except OSError:  # read-only data folder (e.g. a mounted archive): write here instead
        out = Path.cwd() / "fedrad-scan.json"
        atomic_write_bytes(out, payload)
    return out


def cmd_scan(args: argparse.Namespace) -> int:
    """CLI handler: print the inventory, write the JSON atomically, exit 0 (2 if the folder is missing)."""
    data = Path(args.data)
    if not data.is_dir():
        print(f"fedrad scan: error: folder not found: {args.data}", file=sys.stderr)
        return 2
    report = scan_folder(data, decode=getattr(args, "decode", True), progress=not getattr(args, "quiet", False))
    print(format_report(report))
    out = _write_json(report, getattr(args, "json_out", None), data.resolve())
    print(f"\ninventory written to {out}")
    print(NOTHING_SENT)
    return 0
