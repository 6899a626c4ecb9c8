"""Synthetic hospitals for the demo and tests: procedural chest radiographs (and, with `volumes`, a CT
series, an enhanced MR and an ultrasound cine) written as real DICOM files.

Why synthetic: the demo and CI need several sites with many images per patient, real DICOM encodings and
realistic between-site differences, without shipping patient data. The three site profiles differ the way
real hospitals do, so the same ingestion code paths run as on real archives:

* site A: CR, MONOCHROME2, 8-bit, uncompressed explicit VR LE, PACS-style folders, mostly PA, few positives;
* site B: DX, MONOCHROME1, 12-bit stored with RescaleSlope/Intercept and window tags, flat extension-less
  file names, many AP (ICU-like), many positives;
* site C: CR, MONOCHROME2, 12 bits stored in 16, RLE Lossless and JPEG 2000 lossless, nested
  study/series folders, lateral views, fewest positives, different size/aspect.

Each patient has one anatomy (lung shape, heart size, rib spacing, ...); the patient's images vary only
in pose (shift, rotation, scale), exposure and noise, as repeat films of one person do. `finding` = 1 adds
patchy lung opacities ('pneumonia'-like), fixed per patient. Each site gets a `labels.csv`
(file, finding) for the fine-tuning experiments (every image labelled; subsample for label efficiency).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CR_SOP = "1.2.840.10008.5.1.4.1.1.1"
DX_SOP = "1.2.840.10008.5.1.4.1.1.1.1"


@dataclass(frozen=True)
class SiteProfile:
    name: str
    modality: str
    photometric: str
    bits_stored: int
    syntaxes: tuple[str, ...]  # cycled per image
    views: tuple[tuple[str, float], ...]  # (ViewPosition as written, probability)
    prevalence: float
    aspect: float  # cols / rows
    gamma: float
    noise: float
    layout: str  # "patient" | "flat" | "study"
    age_mean: float


PROFILES = (
    SiteProfile("site-a", "CR", "MONOCHROME2", 8, ("1.2.840.10008.1.2.1",),
                (("PA", 0.8), ("AP", 0.1), ("LATERAL", 0.1)), 0.25, 0.9, 1.0, 0.02, "patient", 55),
    SiteProfile("site-b", "DX", "MONOCHROME1", 12, ("1.2.840.10008.1.2.1",),
                (("AP", 0.6), ("PA", 0.3), ("LL", 0.1)), 0.5, 1.0, 0.8, 0.012, "flat", 68),
    SiteProfile("site-c", "CR", "MONOCHROME2", 12, ("1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.90"),
                (("PA", 0.5), ("LATERAL", 0.35), ("AP", 0.15)), 0.15, 1.15, 1.25, 0.03, "study", 45),
)


def _anatomy(rng: np.random.Generator) -> dict[str, float]:
    return {
        "lung_w": rng.uniform(0.28, 0.36), "lung_h": rng.uniform(0.5, 0.62), "lung_gap": rng.uniform(0.1, 0.16),
        "heart_r": rng.uniform(0.17, 0.24), "heart_x": rng.uniform(0.04, 0.1), "rib_step": rng.uniform(0.12, 0.16),
        "rib_curve": rng.uniform(0.5, 0.9), "dia_y": rng.uniform(0.45, 0.55), "body_w": rng.uniform(0.8, 0.95),
        "density": rng.uniform(0.85, 1.15), "spine_w": rng.uniform(0.05, 0.07),
    }


def _opacities(rng: np.random.Generator, positive: bool) -> list[tuple[float, float, float, float]]:
    """The patient's finding: 1-3 patchy opacities in the lung fields, the same on every film of the patient."""
    if not positive:
        return []
    n = int(rng.integers(1, 4))
    side = rng.choice([-1.0, 1.0], size=n)
    return [(float(s * rng.uniform(0.15, 0.4)), float(rng.uniform(-0.2, 0.35)), float(rng.uniform(0.08, 0.16)),
             float(rng.uniform(0.3, 0.5))) for s in side]


def _soft(d: np.ndarray, width: float = 0.04) -> np.ndarray:
    """Smooth inside-mask for signed distance-like `d` (< 0 inside): soft organ edges, no aliasing."""
    return 1.0 / (1.0 + np.exp(np.clip(d / width, -30, 30)))


def _render(rows: int, cols: int, a: dict[str, float], view: str, opac, rng: np.random.Generator,
            gamma: float, noise: float) -> np.ndarray:
    """Attenuation-like image in [0, 1] (bright = dense), rendered analytically on posed coordinates."""
    ys, xs = np.meshgrid(np.linspace(-1, 1, rows, dtype=np.float32),
                         np.linspace(-cols / rows, cols / rows, cols, dtype=np.float32), indexing="ij")
    # pose: how the patient stood this time (rotation ~3.5 degrees, 8 % scale, shifts)
    th, s = rng.normal(0, 0.06), rng.uniform(0.92, 1.08)
    dx, dy = rng.normal(0, 0.04, size=2)
    x = (np.cos(th) * xs - np.sin(th) * ys) * s + dx
    y = (np.sin(th) * xs + np.cos(th) * ys) * s + dy
    lateral = view in ("LATERAL", "LL", "RL")
    body = np.clip(1.0 - (x / a["body_w"]) ** 2, 0, 1) ** 0.5
    img = 0.55 * body
    if lateral:
        lung = _soft(((x / (a["lung_w"] * 2.0)) ** 2 + ((y + 0.05) / a["lung_h"]) ** 2) - 1)
        img = img - 0.35 * lung * _soft(y - (a["dia_y"] - 0.15 * x))
        img = img + 0.35 * _soft(np.abs(x - 0.62) - a["spine_w"] * 1.6)  # spine at the back
        img = img + 0.22 * _soft(((x + 0.25) / (a["heart_r"] * 1.2)) ** 2 + ((y - 0.2) / (a["heart_r"] * 1.1)) ** 2 - 1)
        dia = a["dia_y"] - 0.15 * x
    else:
        dia = a["dia_y"] - 0.2 * np.sin(np.clip((np.abs(x) - a["lung_gap"]) / (2 * a["lung_w"]) * np.pi, 0, np.pi))
        dia = dia + 0.05 * (x < 0)  # the right hemidiaphragm sits higher (image left in PA)
        for side in (-1.0, 1.0):
            cx = side * (a["lung_gap"] + a["lung_w"])
            lung = _soft(((x - cx) / a["lung_w"]) ** 2 + ((y + 0.05) / a["lung_h"]) ** 2 - 1)
            img = img - 0.38 * lung * _soft(y - dia)
        img = img + 0.3 * _soft(np.abs(x) - a["lung_gap"] * 1.1) * (y > -0.7)  # mediastinum
        img = img + 0.25 * _soft(np.abs(x) - a["spine_w"])
        hr = a["heart_r"] * (1.15 if view == "AP" else 1.0)  # AP magnifies the heart
        img = img + 0.28 * _soft(((x - a["heart_x"] - 0.08) / (hr * 1.35)) ** 2 + ((y - 0.22) / hr) ** 2 - 1)
        rib_phase = np.mod((y + a["rib_curve"] * (x**2) * 0.6) / a["rib_step"], 1.0)
        ribs = np.exp(-(((rib_phase - 0.5) / 0.09) ** 2)) * (np.abs(x) > a["lung_gap"]) * (np.abs(x) < 0.85)
        img = img + 0.12 * ribs * _soft(y - dia)
    img = img + 0.45 * _soft(dia - y) * body  # abdomen below the diaphragm
    for ox, oy, r, amp in opac:
        ox = 0.62 * ox if lateral else ox
        img = img + amp * np.exp(-(((x - ox) ** 2 + (y - oy) ** 2) / (2 * r * r)))
    img = np.clip(img * a["density"], 0, None)
    img = img / max(float(img.max()), 1e-6)
    img = img ** (gamma * rng.uniform(0.8, 1.25))  # exposure
    fog = rng.uniform(0.0, 0.15)  # scatter: a flatter, greyer film
    img = img * (1 - fog) + fog * float(img.mean())
    img = img + rng.normal(0, noise * rng.uniform(0.5, 1.5), img.shape).astype(np.float32)
    return np.clip(img, 0, 1).astype(np.float32)


def _dataset(prof: SiteProfile, img: np.ndarray, uids: dict[str, str], pid: str, age: int, sex: str,
             view: str, syntax: str):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    sop_class = DX_SOP if prof.modality == "DX" else CR_SOP
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = uids["sop"]
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, uids["sop"]
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uids["study"], uids["series"]
    ds.Modality, ds.PatientID, ds.PatientName = prof.modality, pid, f"SYNTH^{pid}"
    ds.PatientAge, ds.PatientSex = f"{age:03d}Y", sex
    ds.BodyPartExamined, ds.ViewPosition = "CHEST", view
    ds.StudyDate, ds.SeriesNumber, ds.InstanceNumber = "20240101", 1, 1
    ds.ImageComments = "fedrad synthetic image, not a real patient"
    ds.Rows, ds.Columns = img.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, prof.photometric
    ds.PixelRepresentation = 0
    if prof.bits_stored == 8:
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        arr = np.round(img * 255).astype(np.uint8)
    else:
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, prof.bits_stored, prof.bits_stored - 1
        top = 2**prof.bits_stored - 1
        if prof.photometric == "MONOCHROME1":
            arr = np.round((1.0 - img) * (top - 200) + 100).astype(np.uint16)  # bright stored = dark shown
            ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = "0.5", "-100", "US"
            lo, hi = 100 * 0.5 - 100, (top - 100) * 0.5 - 100
            ds.WindowCenter, ds.WindowWidth = f"{(lo + hi) / 2:.1f}", f"{(hi - lo) * 1.05:.1f}"
        else:
            arr = np.round(img * (top - 300) + 150).astype(np.uint16)  # raw detector range, no window
    ds.PixelData = arr.tobytes()
    if UID(syntax) != ExplicitVRLittleEndian:
        ds.compress(syntax, arr, generate_instance_uid=False)
    return ds


def _relpath(prof: SiteProfile, p: int, k: int, n_written: int) -> str:
    if prof.layout == "patient":
        return f"patient_{p:03d}/img_{k:02d}.dcm"
    if prof.layout == "flat":
        return f"IM{n_written:06d}"  # PACS export style: no extension
    return f"STUDY{p:04d}/SERIES{k % 2 + 1}/{n_written:05d}.dcm"


def write_synthetic_sites(out_dir: str | Path, n_sites: int = 3, patients_per_site: int = 15,
                          images_per_patient: tuple[int, int] = (1, 4), size: int = 128,
                          seed: int = 0, volumes: bool = False) -> list[Path]:
    """Write `n_sites` synthetic hospital folders (site profiles cycle after 3); return their paths.

    Deterministic for a seed. ~3 x 37 images at 128 px take about 1 s. `volumes`: each site also gets a CT
    series, an enhanced MR and an ultrasound cine (write_volumes; 26 images, unlabelled in labels.csv).
    """
    from pydicom.uid import generate_uid

    out = Path(out_dir)
    dirs: list[Path] = []
    for s in range(n_sites):
        prof = PROFILES[s % len(PROFILES)]
        name = prof.name if s < len(PROFILES) else f"{prof.name}{s // len(PROFILES) + 1}"
        site = out / name
        site.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng([seed, s])
        rows = size if prof.aspect <= 1 else max(8, round(size / prof.aspect))
        cols = round(rows * prof.aspect)
        view_names = [v for v, _ in prof.views]
        view_p = np.array([w for _, w in prof.views]) / sum(w for _, w in prof.views)
        labels: list[tuple[str, int]] = []
        n_written = 0
        for p in range(patients_per_site):
            anat = _anatomy(rng)
            positive = bool(rng.random() < prof.prevalence)
            opac = _opacities(rng, positive)
            pid = f"{name.upper()}-{p:04d}"
            age = int(np.clip(rng.normal(prof.age_mean, 15), 1, 99))
            sex = "M" if rng.random() < 0.5 else "F"
            n_img = int(rng.integers(images_per_patient[0], images_per_patient[1] + 1))
            study = generate_uid(entropy_srcs=[str(seed), name, pid, "study"])
            for k in range(n_img):
                view = str(rng.choice(view_names, p=view_p))
                img = _render(rows, cols, anat, view, opac, rng, prof.gamma, prof.noise)
                uids = {"study": study,
                        "series": generate_uid(entropy_srcs=[str(seed), name, pid, "series", str(k % 2)]),
                        "sop": generate_uid(entropy_srcs=[str(seed), name, pid, "sop", str(k)])}
                syntax = prof.syntaxes[n_written % len(prof.syntaxes)]
                ds = _dataset(prof, img, uids, pid, age, sex, view, syntax)
                ds.InstanceNumber = k + 1
                rel = _relpath(prof, p, k, n_written)
                path = site / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                ds.save_as(path, enforce_file_format=True)
                labels.append((rel, int(positive)))
                n_written += 1
        if volumes:
            write_volumes(site, name, seed)
        with open(site / "labels.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["file", "finding"])
            w.writerows(labels)
        dirs.append(site)
    return dirs


# -- cross-sectional volumes (issue 27): a CT series, an enhanced MR and an ultrasound cine per site --------
CT_SOP = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_MR_SOP = "1.2.840.10008.5.1.4.1.1.4.1"
US_MULTIFRAME_SOP = "1.2.840.10008.5.1.4.1.1.3.1"


def _base(sop_class: str, modality: str, pid: str, study: str, series: str, sop: str, body_part: str):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = sop_class, sop
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SOPClassUID, ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = sop_class, sop, study, series
    ds.Modality, ds.PatientID, ds.PatientName, ds.BodyPartExamined = modality, pid, f"SYNTH^{pid}", body_part
    ds.PatientSex, ds.PatientAge, ds.StudyDate, ds.SeriesNumber = "F", "060Y", "20240101", 1
    ds.ImageComments = "fedrad synthetic image, not a real patient"
    return ds


def ct_phantom(rows: int, z: float, rng: np.random.Generator, finding: bool) -> np.ndarray:
    """A chest CT slice in HU: body (soft tissue), two lungs, a spine, ribs and, if `finding`, a lung nodule
    whose size follows z (a sphere through the slices)."""
    yy, xx = (np.mgrid[:rows, :rows] + 0.5) / rows * 2 - 1
    hu = np.full((rows, rows), -1000.0)
    hu[(xx / 0.9) ** 2 + (yy / 0.65) ** 2 < 1] = 40.0
    for side in (-1, 1):
        hu[((xx - side * 0.4) / 0.3) ** 2 + ((yy + 0.05) / (0.45 - 0.004 * abs(z))) ** 2 < 1] = -820.0
    hu[(xx / 0.1) ** 2 + ((yy - 0.45) / 0.1) ** 2 < 1] = 700.0
    ring = np.abs((xx / 0.86) ** 2 + (yy / 0.61) ** 2 - 1) < 0.05
    hu[ring & (np.cos(8 * np.arctan2(yy, xx) + z / 7) > 0.6)] = 500.0
    if finding:
        r2 = 0.12**2 - (z / 100.0) ** 2
        if r2 > 0:
            hu[((xx - 0.4) ** 2 + (yy + 0.1) ** 2) < r2] = 30.0
    return hu + rng.normal(0, 12, hu.shape)


def write_volumes(site: Path, name: str, seed: int, rows: int = 64, ct_slices: int = 12, mr_frames: int = 8,
                  us_frames: int = 6) -> list[str]:
    """Write a CT series (single-frame slices), an enhanced MR and an ultrasound cine under `site/xsec/`;
    return their relative paths. Real DICOM: what `fedrad scan` and the loader read on a real archive."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from pydicom.uid import generate_uid

    rng = np.random.default_rng([seed, len(name), 27])
    pid = f"{name.upper()}-XSEC"
    study = generate_uid(entropy_srcs=[str(seed), name, "xsec-study"])
    out: list[str] = []
    series = generate_uid(entropy_srcs=[str(seed), name, "ct-series"])
    for k in range(ct_slices):  # CT: unsigned stored values with RescaleIntercept -1024, 2.5 mm apart
        z = 2.5 * (k - ct_slices / 2)
        ds = _base(CT_SOP, "CT", pid, study, series, generate_uid(entropy_srcs=[str(seed), name, "ct", str(k)]),
                   "CHEST")
        ds.Rows = ds.Columns = rows
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1, -1024, "HU"
        ds.WindowCenter, ds.WindowWidth = 40, 400
        ds.ImageOrientationPatient, ds.ImagePositionPatient = [1, 0, 0, 0, 1, 0], [-160, -160, z]
        ds.SliceThickness, ds.PixelSpacing, ds.InstanceNumber = 2.5, [5, 5], k + 1
        hu = ct_phantom(rows, z, rng, finding=True)
        ds.PixelData = np.clip(np.round(hu + 1024), 0, 4095).astype(np.uint16).tobytes()
        rel = f"xsec/ct/{ct_slices - k:03d}.dcm"  # names in reverse: order must come from the geometry
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(site / rel, enforce_file_format=True)
        out.append(rel)

    mr = _base(ENHANCED_MR_SOP, "MR", pid, study, generate_uid(entropy_srcs=[str(seed), name, "mr-series"]),
               generate_uid(entropy_srcs=[str(seed), name, "mr"]), "HEAD")
    mr.Rows = mr.Columns = rows
    mr.SamplesPerPixel, mr.PhotometricInterpretation = 1, "MONOCHROME2"
    mr.BitsAllocated, mr.BitsStored, mr.HighBit, mr.PixelRepresentation = 16, 12, 11, 0
    mr.NumberOfFrames = mr_frames
    shared, orient = Dataset(), Dataset()
    orient.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]  # coronal
    shared.PlaneOrientationSequence = Sequence([orient])
    mr.SharedFunctionalGroupsSequence = Sequence([shared])
    per, frames = [], []
    yy, xx = (np.mgrid[:rows, :rows] + 0.5) / rows * 2 - 1
    for k in range(mr_frames):
        g, pos = Dataset(), Dataset()
        pos.ImagePositionPatient = [-100, 4.0 * k, 100]
        g.PlanePositionSequence = Sequence([pos])
        per.append(g)
        r = 0.8 - 0.02 * abs(k - mr_frames / 2)
        head = (xx / r) ** 2 + (yy / (r * 1.2)) ** 2 < 1
        brain = (xx / (r - 0.08)) ** 2 + (yy / (r * 1.2 - 0.08)) ** 2 < 1
        img = np.where(brain, 1400 + 300 * np.cos(6 * xx + k), np.where(head, 2600, 30)) + rng.normal(0, 25, xx.shape)
        frames.append(np.clip(img, 0, 4095).astype(np.uint16))
    mr.PerFrameFunctionalGroupsSequence = Sequence(per)
    mr.PixelData = np.stack(frames).tobytes()
    rel = "xsec/mr_enhanced.dcm"
    mr.save_as(site / rel, enforce_file_format=True)
    out.append(rel)

    us = _base(US_MULTIFRAME_SOP, "US", pid, study, generate_uid(entropy_srcs=[str(seed), name, "us-series"]),
               generate_uid(entropy_srcs=[str(seed), name, "us"]), "ABDOMEN")
    h, w = rows * 3 // 4, rows
    us.Rows, us.Columns, us.NumberOfFrames = h, w, us_frames
    us.SamplesPerPixel, us.PhotometricInterpretation, us.PlanarConfiguration = 3, "RGB", 0
    us.BitsAllocated, us.BitsStored, us.HighBit, us.PixelRepresentation = 8, 8, 7, 0
    us.BurnedInAnnotation = "NO"
    yy, xx = np.mgrid[:h, :w] / np.array([h, w])[:, None, None]
    sector = (np.abs(xx - 0.5) < yy * 0.6) & (yy > 0.05)
    cine = []
    for k in range(us_frames):
        speckle = rng.gamma(2.0, 0.5, (h, w))
        organ = ((xx - 0.5 - 0.02 * k) / 0.2) ** 2 + ((yy - 0.6) / 0.15) ** 2 < 1
        grey = np.clip(sector * (60 + 80 * speckle * (1 + organ)), 0, 255)
        rgb = np.stack([grey, grey, grey], axis=-1)
        rgb[:4, : w // 3] = (255, 200, 0)  # a coloured scale bar, as scanners draw
        cine.append(rgb.astype(np.uint8))
    us.PixelData = np.stack(cine).tobytes()
    rel = "xsec/us_cine.dcm"
    us.save_as(site / rel, enforce_file_format=True)
    out.append(rel)
    return out


# -- a labelled cross-sectional archive (benchmarks/bench_xsec_quality.py): CT volumes whose plane, body part
# and contrast vary, each written in the headers a real scanner fills (ImageOrientationPatient,
# BodyPartExamined, ContrastBolusAgent) so the labels come from the same header reading as on a real archive.
XSEC_PLANES = {"AXIAL": ([1, 0, 0, 0, 1, 0], 0), "CORONAL": ([1, 0, 0, 0, 0, -1], 1),
               "SAGITTAL": ([0, 1, 0, 0, 0, -1], 2)}  # orientation, axis of the [z, y, x] volume cut across
XSEC_PARTS = ("CHEST", "ABDOMEN", "HEAD")


def xsec_volume(part: str, n: int, contrast: bool, rng: np.random.Generator) -> np.ndarray:
    """A [z, y, x] HU volume of `part` (n voxels a side, one patient's size and position); `contrast`
    enhances the vessels and organs as an iodinated bolus does. CHEST is ct_phantom's slices."""
    s, (dy, dx) = rng.uniform(0.85, 1.1), rng.normal(0, 0.04, 2)
    zz, yy, xx = (np.mgrid[:n, :n, :n] + 0.5) / n * 2 - 1
    yy, xx = (yy - dy) / s, (xx - dx) / s
    boost = 1.0 if contrast else 0.0
    if part == "CHEST":
        vol = np.stack([ct_phantom(n, 60.0 * z, rng, finding=False) for z in zz[:, 0, 0]])
        vol[((xx - 0.1) / 0.2) ** 2 + ((yy - 0.05) / 0.18) ** 2 + (zz / 0.7) ** 2 < 1] = 40 + 260 * boost  # heart
        vol[(xx + 0.02) ** 2 + (yy - 0.3) ** 2 < 0.06**2] = 40 + 300 * boost  # descending aorta
        return vol
    vol = np.full((n, n, n), -1000.0)
    if part == "HEAD":
        r = (xx / 0.7) ** 2 + (yy / 0.85) ** 2 + (zz / 0.9) ** 2
        vol[r < 1] = 1000.0  # skull
        vol[r < 0.8] = 35.0  # brain
        vol[((np.abs(xx) - 0.12) / 0.07) ** 2 + (yy / 0.3) ** 2 + (zz / 0.3) ** 2 < 1] = 5.0  # ventricles
        vol[(xx**2 + (yy - 0.65) ** 2 < 0.05**2) & (r < 0.9)] = 40 + 250 * boost  # sagittal sinus
        vol[(np.abs(np.abs(xx) - 0.25) < 0.03) & (np.abs(zz) < 0.6) & (r < 0.8)] = 35 + 200 * boost  # arteries
    else:  # ABDOMEN
        vol[(xx / 0.9) ** 2 + (yy / 0.7) ** 2 < 1] = 40.0  # body, the whole length
        vol[((xx + 0.35) / 0.35) ** 2 + ((yy + 0.1) / 0.3) ** 2 + (zz / 0.6) ** 2 < 1] = 55 + 60 * boost  # liver
        for side in (-1, 1):
            vol[((xx - side * 0.4) / 0.1) ** 2 + ((yy - 0.3) / 0.14) ** 2 + (zz / 0.3) ** 2 < 1] = 30 + 160 * boost
        vol[(xx / 0.1) ** 2 + ((yy - 0.5) / 0.1) ** 2 < 1] = 700.0  # spine
        vol[(xx - 0.05) ** 2 + (yy - 0.32) ** 2 < 0.06**2] = 40 + 300 * boost  # aorta
    return vol + rng.normal(0, 12, vol.shape)


def write_xsec_archive(out_dir: str | Path, n_patients: int = 24, volumes_per_patient: int = 2, rows: int = 32,
                       slices: int = 12, seed: int = 0) -> Path:
    """One site folder of CT series: each patient `volumes_per_patient` volumes, each with a plane, body part
    and contrast, each label drawn balanced and independently of the others (labels only in the headers);
    `slices` slices 2.5 mm apart cut from the middle of a rows^3 phantom. Deterministic for a seed."""
    from pydicom.uid import generate_uid

    site = Path(out_dir)
    rng = np.random.default_rng([seed, 2727])
    n_vol = n_patients * volumes_per_patient
    planes, parts, agents = (rng.permutation(np.resize(np.arange(k), n_vol)) for k in (3, 3, 2))  # balanced
    for p in range(n_patients):
        pid = f"XSEC-{p:04d}"
        study = generate_uid(entropy_srcs=[str(seed), pid, "study"])
        for v in range(volumes_per_patient):
            i = p * volumes_per_patient + v
            plane, part, contrast = list(XSEC_PLANES)[planes[i]], XSEC_PARTS[parts[i]], bool(agents[i])
            vol = xsec_volume(part, rows, contrast, rng)
            orientation, axis = XSEC_PLANES[plane]
            series = generate_uid(entropy_srcs=[str(seed), pid, "series", str(v)])
            first = (rows - slices) // 2
            for k in range(slices):
                cut = np.take(vol, first + k, axis=axis)
                img = cut if axis == 0 else cut[::-1]  # coronal/sagittal rows run head to foot
                pos = [-80.0, -80.0, 80.0]
                pos[2 - axis] = 2.5 * k  # along the normal: x for sagittal, y for coronal, z for axial
                ds = _base(CT_SOP, "CT", pid, study, series,
                           generate_uid(entropy_srcs=[str(seed), pid, str(v), str(k)]), part)
                ds.SeriesNumber = v + 1
                ds.Rows = ds.Columns = rows
                ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
                ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
                ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1, -1024, "HU"
                ds.ImageOrientationPatient, ds.ImagePositionPatient = orientation, pos
                ds.SliceThickness, ds.PixelSpacing, ds.InstanceNumber = 2.5, [5, 5], k + 1
                if contrast:
                    ds.ContrastBolusAgent = "IOHEXOL"
                ds.PixelData = np.clip(np.round(img + 1024), 0, 4095).astype(np.uint16).tobytes()
                path = site / pid / f"s{v}" / f"{k:03d}.dcm"
                path.parent.mkdir(parents=True, exist_ok=True)
                ds.save_as(path, enforce_file_format=True)
    return site
