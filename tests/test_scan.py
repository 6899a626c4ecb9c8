"""`fedrad scan`: exit codes, inventory JSON with every skip and its reason, no identifiers."""

from __future__ import annotations

import json
from pathlib import Path

from dicom_fixtures import make_corrupt_files, shared_data, small_dicom

from fedrad.client.site.scan import NOTHING_SENT, scan_folder
from fedrad.deploy.cli import main


def cmd_scan(argv: list[str]) -> int:
    return main(["scan", *argv])


def _args(data, json_out=None, decode=True):
    return [str(data), "--quiet", *(["--json", json_out] if json_out else []), *([] if decode else ["--no-decode"])]


def test_scan_folder_with_corrupt_files(tmp_path, capsys):
    root = tmp_path / "site"
    for i in range(4):
        small_dicom(root / "ok" / f"im{i}.dcm", patient_id=f"SECRET-{i % 2}")
    expected = make_corrupt_files(root / "bad")
    (root / "notes.csv").write_text("a,b\n")
    out = tmp_path / "inv.json"
    assert cmd_scan(_args(root, str(out))) == 0
    text = capsys.readouterr().out
    assert NOTHING_SENT in text and "images usable         4 of 9" in text
    report = json.loads(out.read_text())
    assert {s["file"].split("/")[-1]: s["reason"] for s in report["skipped"]} == expected
    assert all(s["detail"] for s in report["skipped"])
    assert report["usable"] == 4 and report["patients"] == 2 and report["ignored"] == ["notes.csv"]
    assert report["images_per_patient"] == {"min": 2, "median": 2.0, "max": 2}
    assert report["network_used"] is False and len(report["files"]) == 9
    assert "SECRET" not in out.read_text() and "SECRET" not in text  # IDs counted, never written


def test_scan_default_json_location_and_no_decode(tmp_path, capsys):
    root = tmp_path / "site"
    small_dicom(root / "a.dcm")
    make_corrupt_files(root / "bad")
    assert cmd_scan(_args(root, decode=False)) == 0
    report = json.loads((root / ".fedrad-scan.json").read_text())
    assert report["decoded"] is False and report["usable"] == 1 and len(report["skipped"]) == 5


def test_scan_missing_folder_exits_2(tmp_path, capsys):
    assert cmd_scan(_args(tmp_path / "nope")) == 2
    assert "not found" in capsys.readouterr().err


def test_scan_shared_dicom_lists_all_files(tmp_path):
    root = shared_data() / "dicom"
    report = scan_folder(root, decode=True, progress=False)
    assert report["candidates"] == 14 and len(report["files"]) == 14
    assert report["usable"] == 12
    assert report["skipped_by_reason"] == {"no-pixel-data": 1, "decode-failed": 1}
    assert sum(report["transfer_syntax"].values()) == 12 and len(report["transfer_syntax"]) == 10
    assert report["photometric"] == {"MONOCHROME2": 6, "MONOCHROME1": 6}


def test_scan_odd_file_names_are_escaped_never_fatal(tmp_path, capsys):
    import os

    root = tmp_path / "site"
    small_dicom(root / "plain.dcm")
    small_dicom(Path(os.fsdecode(os.fsencode(str(root)) + b"/M\xfcller.dcm")))  # Latin-1 name
    small_dicom(root / "evil\x1b]0;title\x07\nname.dcm")
    out = tmp_path / "inv.json"
    assert cmd_scan(_args(root, str(out))) == 0
    text = capsys.readouterr().out
    assert "\x1b" not in text and "\x07" not in text and "M\\xfcller.dcm" in text
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["usable"] == 3
    assert sorted(f["file"] for f in report["files"]) == ["M\\xfcller.dcm", "evil\\x1b]0;title\\x07\\x0aname.dcm",
                                                         "plain.dcm"]


def test_scan_image_folder_reports_its_manifest(tmp_path, capsys):
    """A PNG/JPEG folder's part of the report comes from its reader (ImageFolderReader.inventory): the manifest,
    the images it does not list, its label columns, patients from `patient_id`; the keys stay in this order."""
    import numpy as np
    from PIL import Image

    root = tmp_path / "png"
    root.mkdir()
    rng = np.random.default_rng(0)
    rows = ["image,patient_id,finding"]
    for i in range(4):
        Image.fromarray((rng.random((40, 30)) * 255).astype(np.uint8)).save(root / f"a{i}.png")
        rows.append(f"a{i}.png,SECRET-{i % 2},{'yes' if i % 2 else 'no'}")
    rows.append("missing.png,SECRET-9,no")
    Image.fromarray((rng.random((40, 30)) * 255).astype(np.uint8)).save(root / "extra.png")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "inv.json"
    assert cmd_scan(_args(root, str(out))) == 0
    text = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert list(report)[:11] == ["folder", "layout", "decoded", "decodes_reused", "files_seen", "manifest",
                                 "not_in_manifest", "labels", "candidates", "ignored", "files"]
    assert (report["layout"], report["files_seen"], report["manifest"], report["not_in_manifest"]) == \
        ("images", 6, "manifest.csv", 1)
    assert report["labels"] == {"finding": {"no": 2, "yes": 2}} and "modality" not in report
    assert (report["candidates"], report["usable"], report["patients"], report["ignored"]) == (5, 4, 2, [])
    assert report["skipped_by_reason"] == {"unreadable": 1}
    assert "[image folder (manifest.csv)]" in text and "label finding         no 2, yes 2" in text
    assert "not in manifest       1" in text and "  files:" not in text and "SECRET" not in out.read_text()
