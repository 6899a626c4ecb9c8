"""`fedrad scan`: the first thing hospital IT runs, to see exactly what a site would train on.

It walks the folder, reads every candidate file, optionally decodes the pixels (proof that each image is
usable), and prints an inventory: usable vs skipped (each skipped file with its reason), modalities, body
parts, views, photometric, transfer syntaxes, bit depths and patient counts. Patient IDs are only counted
(through an in-memory random salt that is never stored), so the JSON report holds no identifiers.
Nothing leaves the machine: the scan reads local files and writes one local JSON file. With `--source` (a
PACS on the hospital network) it first pulls the matching instances into the site's store, then inventories
those files exactly as a folder, and reports what it fetched and how long that took.
"""

from __future__ import annotations

import json
import os
import secrets
import statistics
import time
from collections import Counter
from functools import partial
from pathlib import Path

from fedrad.client.site.scan_memo import ScanMemo, stat_key
from fedrad.client.site.site_data import default_cache_dir, is_writable_dir
from fedrad.common.atomic import atomic_write_bytes
from fedrad.common.data_rules import DataRules
from fedrad.common.header_signals import patient_key
from fedrad.common.sources.base import Frames
from fedrad.common.sources.budget import DEFAULT_MAX_PIXELS
from fedrad.common.sources.errors import reraise_fatal, skip_from
from fedrad.common.sources.layout import open_location
from fedrad.common.sources.pacs import PacsOptions, PacsQuery
from fedrad.common.sources.walk import display_name
from fedrad.common.sources.workers import map_isolated

SCAN_SIZE = 32  # decode target: the full-resolution decode is the proof, the small output is thrown away
MAX_FILES_LISTED = 200  # larger folders: per-file lines only in the JSON
NOTHING_SENT = "Nothing was sent anywhere: this scan read local files only and used no network."
PACS_SENT = ("Nothing left this site: the scan queried and fetched from the hospital's PACS only; the PACS "
             "address, query and UIDs stay in this site's store and logs.")


def _scan_one(entry, check, decode: bool, salt: bytes, max_pixels: int, locator: str) -> dict:
    """One item -> a JSON-able record (never raises: a worker must survive any file)."""
    try:
        if decode:
            img, d = entry(locator, SCAN_SIZE, salt, max_pixels)
            d = dict(d)
            key = d.pop("patient_key", None)
            if isinstance(img, Frames):  # a multi-frame object: its frames, each usable or skipped alone
                d["frames_ok"] = len(img.index)
                d["frame_metas"] = img.metas
                d["frames_skipped"] = [list(s) for s in img.skipped]
        else:
            d = dict(check(locator, max_pixels))
            key = None
    except BaseException as exc:  # noqa: BLE001 - SkipImage, or anything a decoder let through: report it
        reraise_fatal(exc)
        skip = skip_from(exc)
        return {"ok": False, "reason": skip.reason, "detail": skip.detail}
    pid, study = d.pop("patient_id", None), d.pop("study_uid", None)
    if key is None and (pid is not None or study is not None):
        key = patient_key(pid, study or d.get("sop_uid") or locator, salt)
    if key is not None:
        d["patient"] = key
    if study:
        d["study_key"] = patient_key(None, study, salt)
    series = d.pop("series_uid", "")  # UIDs are keyed with the in-memory salt like patients: counted, never named
    d["series_key"] = patient_key(None, series, salt) if series else ""
    sop = d.pop("sop_uid", None)
    d["sop_key"] = patient_key(None, sop, salt) if sop else ""  # copies of one instance are one slice
    d.pop("series_description", None)
    d["ok"] = True
    return d


def _scan_item(entry, check, decode: bool, salt: bytes, max_pixels: int, item: tuple[str, dict | None]) -> dict:
    """`_scan_one`, or for a file whose decode outcome a previous scan proved (scan_memo): its header only, or
    nothing at all when it is known to be unusable."""
    locator, known = item
    if known is None:
        return _scan_one(entry, check, decode, salt, max_pixels, locator)
    if not known.get("ok"):
        return dict(known)
    d = _scan_one(entry, check, False, salt, max_pixels, locator)
    if d["ok"]:
        d.update({k: v for k, v in known.items() if k != "ok"})
    return d


def _crashed(_locator: str, detail: str) -> dict:
    return {"ok": False, "reason": "decoder-crashed", "detail": detail}


def _file_row(rel: str, r: dict) -> dict:
    """Per-file line of the inventory (no identifiers: only technical header fields)."""
    row = {"file": rel, "status": "ok" if r["ok"] else r["reason"]}
    for k in ("modality", "photometric", "bits_stored", "rows", "cols", "transfer_syntax_name"):
        if k in r:  # header strings come from the file: escaped like names
            row[k] = display_name(r[k]) if isinstance(r[k], str) else r[k]
    return row


def _per_patient(keys: list[str]) -> dict[str, float]:
    per = list(Counter(keys).values())
    if not per:
        return {"min": 0, "median": 0, "max": 0}
    return {"min": min(per), "median": float(statistics.median(per)), "max": max(per)}


PACS_LIMITS = ("max_instances", "concurrency", "rate", "auth_file", "auth_env", "ca_bundle", "calling_aet",
               "max_listed")


def source_options(query: list[str] | None = None, since: str | None = None, until: str | None = None,
                   **limits) -> PacsOptions:
    """PacsOptions from the `--query/--since/--until/--max-instances/...` options of scan and node (keyword
    names as the options'; a limit that is None or empty takes the PACS default)."""
    unknown = set(limits) - set(PACS_LIMITS)
    if unknown:
        raise TypeError(f"unknown PACS option(s): {', '.join(sorted(unknown))}")
    kw = {k: v for k, v in limits.items() if v not in (None, "")}
    return PacsOptions(query=PacsQuery.parse(query or [], since, until), **kw)


def scan_folder(path: str | os.PathLike[str], decode: bool = True, progress: bool = True,
                max_pixels: int = DEFAULT_MAX_PIXELS, source_options: PacsOptions | None = None,
                cache_dir: str | os.PathLike[str] | None = None, rules: DataRules | None = None) -> dict:
    """Inventory of a DICOM folder (or PNG/JPEG folder with manifest.csv/labels.csv) as a JSON-able dict.

    `path` may be a PACS source URL (see sources.pacs): its instances matching `source_options` are pulled
    into the store under `cache_dir` first (bounded, incremental), then inventoried like a DICOM folder.

    Raises FileNotFoundError if `path` is not a folder. Unusable files never raise; they are listed in
    `skipped` with their reason, folders that could not be walked in `folders_skipped`. File names in the
    report are escaped for display (non-UTF-8 bytes as \\xNN, control characters escaped).
    """
    t0 = time.perf_counter()
    opened = open_location(path, max_pixels, cache_dir, source_options)
    reader, root, pacs = opened.reader, opened.root, opened.is_pacs
    salt = secrets.token_bytes(32)  # in memory only: patients can be counted but not identified
    report: dict = {"folder": display_name(str(path) if pacs else str(root)), "layout": reader.kind,
                    "decoded": bool(decode)}
    listing = reader.list_items()
    if pacs:
        report["source"] = reader.scheme
        report["store"] = display_name(str(root))
        report["pull"] = reader.pull.as_dict()
    items = listing.items
    memo = ScanMemo(Path(cache_dir) if cache_dir else default_cache_dir(root), max_pixels,
                    type(reader).__name__) if decode and not pacs else None
    stats = [stat_key(it.locator) for it in items] if memo else [None] * len(items)
    known = [memo.known(it.locator, st) for it, st in zip(items, stats, strict=True)] if memo else stats
    report["decodes_reused"] = sum(k is not None for k in known)
    work = partial(_scan_item, reader.entry, reader.check, decode, salt, max_pixels)
    results = list(map_isolated(work, [(it.locator, k) for it, k in zip(items, known, strict=True)], _crashed,
                                progress=progress, desc="decoding" if decode else "reading headers"))
    if memo is not None:
        memo.remember([(it.locator, st, r) for it, st, r, k in zip(items, stats, results, known, strict=True)
                       if k is None])
        memo.close()
    rules = rules or DataRules()
    for r in results:  # read fine, but the site policy keeps it out (modality, burned-in annotation)
        refused = rules.refuse(r) if r["ok"] and reader.has_headers else None
        if refused:
            r.update(ok=False, reason=refused[0], detail=refused[1])
    ok = [i for i, r in enumerate(results) if r["ok"]]
    rel = [display_name(it.item_id) for it in items]

    inventory = reader.inventory(listing, results, salt)  # the layout's own keys, in the report's order
    report.update(inventory.report)
    listing.folders.extend(inventory.folders)

    skipped = [{"file": rel[i], "reason": r["reason"], "detail": display_name(r.get("detail", ""))}
               for i, r in enumerate(results) if not r["ok"]]
    skipped += [{"file": display_name(p.path), "reason": p.reason, "detail": p.detail} for p in listing.skipped]
    report["files"] = [_file_row(rel[i], r) for i, r in enumerate(results)]
    report["files"] += [{"file": display_name(p.path), "status": p.reason} for p in listing.skipped]
    report["usable"] = len(ok)
    report["skipped"] = skipped
    report["skipped_by_reason"] = dict(Counter(s["reason"] for s in skipped).most_common())
    report["folders_skipped"] = [{"folder": display_name(p.path), "reason": p.reason, "detail": p.detail}
                                 for p in listing.folders]
    report["patients"] = len(set(inventory.patients))
    report["images_per_patient"] = _per_patient(inventory.patients)
    report["max_pixels"] = max_pixels
    report["seconds"] = round(time.perf_counter() - t0, 3)
    report["network_used"] = pacs
    return report


TITLES = {"dicom": "DICOM folder", "images": "image folder ({manifest})"}  # the heading's words per layout


def _fmt_counts(d: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in d.items()) if d else "-"


def format_report(r: dict) -> str:
    """The human-readable table printed by `fedrad scan`: the sections follow the keys the source's inventory
    gave (header counts and volumes, or a manifest's labels); only the heading names the layout."""
    kind = TITLES.get(r["layout"], f"{r['layout']} folder").format(manifest=r.get("manifest", ""))
    headers = "modality" in r  # a source whose items carry header signals (common/sources/inventory.py)
    if r.get("source"):
        kind = {"dicomweb": "DICOMweb PACS", "dimse": "DIMSE PACS"}.get(r["source"], "PACS")
    lines = [f"fedrad scan: {r['folder']}  [{kind}]", ""]
    row = "  {:<22}{}".format
    if r.get("pull"):
        p = r["pull"]
        lines.append(row("PACS instances", f"{p['listed']} match the query; {p['had']} already in the site store"))
        lines.append(row("fetched now", f"{p['fetched']} ({p['fetched_bytes'] / 1e6:.1f} MB) in "
                         f"{p['fetch_seconds']:.1f} s; query {p['list_seconds']:.1f} s"
                         + (f"; {p['failed']} failed" if p["failed"] else "")))
        if p["pending"]:
            lines.append(row("left for next pull", f"{p['pending']} (max-instances per pull reached; run again "
                             "to continue)"))
        lines.append(row("site store", r["store"]))
    extra = ""
    if r["ignored"]:
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
    if r.get("folders_skipped"):
        lines.append(row("folders not read", str(len(r["folders_skipped"]))))
        for f in r["folders_skipped"]:
            lines.append(f"      - {f['folder']}/: {f['reason']} ({f['detail']})")
    if headers:
        for key, label in (("modality", "modality"), ("body_part", "body part"), ("view", "view"),
                           ("photometric", "photometric"), ("transfer_syntax", "transfer syntax"),
                           ("bits_stored", "bits stored"), ("sex", "sex"), ("age", "age")):
            lines.append(row(label, _fmt_counts(r[key])))
        if r.get("labels_csv"):
            lines.append(row("labels CSV", r["labels_csv"]))
        vol = r.get("volumes") or {}
        for mod, v in vol.get("by_modality", {}).items():
            lines.append(row(f"  {mod}", f"studies {v['studies']}, series {v['series']}, slices {v['slices']}, "
                             f"frames {v['frames']} ({v['files']} files)"))
        if vol.get("plane"):
            lines.append(row("plane / contrast", f"{_fmt_counts(vol['plane'])}; {_fmt_counts(vol['contrast'])}"))
        if vol.get("series_ordered_by"):
            lines.append(row("series ordered by", _fmt_counts(vol["series_ordered_by"])
                             + (f"; slice spacing {', '.join(f'{x:g}' for x in vol['slice_spacing_mm'])} mm"
                                if vol.get("slice_spacing_mm") else "")))
        for s in vol.get("series_independent", []):
            lines.append(f"      - independent slices ({s['images']}, e.g. {s['files'][0]}): {s['reason']}")
        if r.get("frames_skipped"):
            lines.append(row("frames skipped", str(len(r["frames_skipped"]))))
            for f in r["frames_skipped"][:20]:
                lines.append(f"      - {f['file']} frame {f['frame']}: {f['reason']} ({f['detail'][:120]})")
    for col, counts in r.get("labels", {}).items():  # a manifest's label columns
        lines.append(row(f"label {col}", _fmt_counts(counts)))
    if r.get("not_in_manifest"):
        lines.append(row("not in manifest", str(r["not_in_manifest"])))
    if headers and 0 < len(r["files"]) <= MAX_FILES_LISTED:
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


def write_inventory(report: dict, json_out: str | None, data: Path) -> Path:
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


def policy_rules(policy_file: str | None) -> DataRules:
    from fedrad.client.site.policy import default_policy, load_policy

    return (load_policy(policy_file) if policy_file else default_policy()).data_rules
