"""Weak labels and pseudonyms from DICOM headers: age buckets, salted patient keys, the site salt.

Patient keys let a site group images of one patient (positives for MICLe, patient-level splits) without
ever keeping the raw PatientID in training data or metrics. The salt never leaves the site, so keys from
two sites cannot be linked, and a key cannot be reversed by hashing a list of known IDs.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import tempfile
from datetime import date
from pathlib import Path

AGE_BUCKETS = ("0-17", "18-39", "40-59", "60-79", "80+")
UNKNOWN = "unknown"
SALT_BYTES = 32

_AGE_RE = re.compile(r"^\s*(\d{1,3})\s*([DWMY]?)\s*$", re.IGNORECASE)
_AGE_UNIT_YEARS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0, "": 1.0}


def parse_age(value: object) -> float | None:
    """DICOM Age String ('045Y', '006M', '010W', '003D'; lenient: '45') -> years, None if absent/invalid."""
    if value is None:
        return None
    m = _AGE_RE.match(str(value))
    if not m:
        return None
    years = int(m.group(1)) * _AGE_UNIT_YEARS[m.group(2).upper()]
    return years if 0 <= years < 130 else None


def age_from_dates(birth: object, when: object) -> float | None:
    """Age in years from DICOM dates (YYYYMMDD) when PatientAge is missing; None if either is unusable."""
    try:
        b, w = str(birth).strip(), str(when).strip()
        db = date(int(b[:4]), int(b[4:6]), int(b[6:8]))
        dw = date(int(w[:4]), int(w[4:6]), int(w[6:8]))
    except (ValueError, TypeError, IndexError):
        return None
    years = (dw - db).days / 365.25
    return years if 0 <= years < 130 else None


def age_bucket(age_years: float | None) -> str:
    """Coarse age band: fine enough as a SupCon weak label, too coarse to help re-identify anyone."""
    if age_years is None or age_years != age_years or age_years < 0:  # None or NaN
        return UNKNOWN
    if age_years < 18:
        return "0-17"
    if age_years < 40:
        return "18-39"
    if age_years < 60:
        return "40-59"
    if age_years < 80:
        return "60-79"
    return "80+"


def patient_key(patient_id: str | None, study_uid: str | None, salt: bytes) -> str:
    """HMAC-SHA256(salt, PatientID) hex[:16]; falls back to the StudyInstanceUID when PatientID is empty.

    The fallback keeps images of one study together (better than one group per image); an image with
    neither gets a key of its own only if the caller passes something unique, else the shared 'unknown'.
    """
    pid = (patient_id or "").strip()
    src = f"pid:{pid}" if pid else f"study:{(study_uid or '').strip()}"
    if src == "study:":
        return UNKNOWN
    return hmac.new(salt, src.encode("utf-8"), hashlib.sha256).hexdigest()[:16]


def load_or_create_salt(path: str | os.PathLike[str]) -> bytes:
    """Read the site salt, or create 32 random bytes (mode 0600, written to a temp file, then hard-linked).

    Atomic creation matters: two processes starting at once (scan and node) must not end up with different
    salts, so the loser of the race re-reads the winner's file instead of overwriting it.
    """
    p = Path(path)
    if p.exists():
        data = p.read_bytes()
        if len(data) >= 16:
            return data
        p.unlink(missing_ok=True)  # a truncated salt protects nothing: replaced, as before
    _create_exclusive(p, secrets.token_bytes(SALT_BYTES))  # a concurrent creator's salt wins: keep theirs
    return p.read_bytes()


SALT_FILE = "salt.bin"  # in the site state directory (client/site/site_state.py names the same file)
LEGACY_SALT_FILE = "salt.bin"  # in the cache directory (before the state directory existed)


def load_site_salt(cache_dir: str | os.PathLike[str], state_dir: str | os.PathLike[str] | None = None) -> bytes:
    """The site salt: `state_dir/salt` when a state directory is given, else `cache_dir/salt.bin`.

    A state directory without a salt adopts the cache's existing one (copied, same bytes), so patient keys
    stay the same when a site moves to a state directory; from then on clearing the cache keeps the salt.
    """
    if state_dir is None:
        return load_or_create_salt(Path(cache_dir) / LEGACY_SALT_FILE)
    target = Path(state_dir) / SALT_FILE
    legacy = Path(cache_dir) / LEGACY_SALT_FILE
    if not target.exists() and legacy.is_file():
        old = legacy.read_bytes()
        if len(old) >= 16:
            _create_exclusive(target, old)
    return load_or_create_salt(target)


def _create_exclusive(path: Path, data: bytes) -> None:
    """Write `data` to `path` (0600) unless it exists; a concurrent creator's file wins."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".salt-", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        except OSError:  # filesystems without hard links
            if not path.exists():
                os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def plane_label(orientation: object) -> str:
    """AXIAL / CORONAL / SAGITTAL from ImageOrientationPatient (the axis the slice normal follows), OBLIQUE when
    the normal is more than ~35 degrees off every axis; UNKNOWN without a usable orientation."""
    try:
        o = [float(v) for v in orientation]  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return UNKNOWN
    if len(o) != 6:
        return UNKNOWN
    n = (o[1] * o[5] - o[2] * o[4], o[2] * o[3] - o[0] * o[5], o[0] * o[4] - o[1] * o[3])
    norm = sum(v * v for v in n) ** 0.5
    if not norm > 0:
        return UNKNOWN
    axis = max(range(3), key=lambda i: abs(n[i]))
    if abs(n[axis]) / norm < 0.82:
        return "OBLIQUE"
    return ("SAGITTAL", "CORONAL", "AXIAL")[axis]


def contrast_label(agent: object, modality: object = "") -> str:
    """CONTRAST when ContrastBolusAgent names an agent; NONE for a CT/MR without one; else UNKNOWN."""
    text = str(agent or "").strip().upper()
    if text and text not in ("NONE", "NO", "N/A", "-"):
        return "CONTRAST"
    return "NONE" if str(modality or "").upper() in ("CT", "MR") or text else UNKNOWN
