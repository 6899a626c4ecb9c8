"""Cross-sectional quality (issue 27): label efficiency on header labels, held out by patient.

A synthetic CT archive (deploy/synthetic.py `write_xsec_archive`: each patient's volumes vary in plane, body
part and contrast, written only in ImageOrientationPatient, BodyPartExamined and ContrastBolusAgent) is read by
the site loader (`load_site`: frame by frame, series grouped, labels from the headers). The patients are split
once, 70/30, by patient. Backbones of one architecture are pretrained in process on the training patients'
slices (labels unused) and compared on the held-out patients:

* random init;
* SimCLR (two augmentations of one slice);
* slices (common/losses/slices.py: two nearby slices of one series as the positive pair).

Each backbone is frozen; a linear probe (bench_label_efficiency's: standardised logistic regression, one vs
rest) is fitted per label on a fraction of the training patients (label-subsample seeds averaged) and scored
by macro ROC-AUC on the held-out patients; each cell is the mean ± sd over pretraining seeds. Prints the table
and records it in benchmarks/results/xsec_quality.jsonl.

    python benchmarks/bench_xsec_quality.py --quick   # smoke test, seconds
    python benchmarks/bench_xsec_quality.py           # < 10 min on 2 loaded CPU cores
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_label_efficiency import RECIPE, pretrain_local  # noqa: E402
from common_bench import record_row  # noqa: E402

LABELS = ("plane", "body_part", "contrast")
OBJECTIVES = ("simclr", "slices")


def labelled(sd, field: str):
    """A LabelledSet of every slice for one header label (one-vs-rest targets), grouped by patient."""
    from fedrad.client.evaluation.data import LabelledSet, binarise

    y, targets, _ = binarise({field: sd.labels[field]})
    return LabelledSet(images=sd.images.astype(np.float32) / 65535.0, y=y, targets=targets, groups=sd.group_ids(),
                       source=field)


def pretrain_args(args: argparse.Namespace) -> argparse.Namespace:
    """The namespace `pretrain_local` reads: one round of `steps`, the 28 px recipe of the label benchmark."""
    return argparse.Namespace(model=args.model, image_size=args.image_size, proj_dim=64, rounds=1,
                              batch_size=args.batch_size, lr=1e-3, crop_min=RECIPE["aug-crop-min"],
                              rotate=RECIPE["aug-rotate"], blur_p=RECIPE["aug-blur-p"],
                              noise_p=RECIPE["aug-noise-p"], temperature=RECIPE["temperature"],
                              lr_schedule=RECIPE["lr-schedule"], warmup_rounds=0)


def run(args: argparse.Namespace, work: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Write + load the archive, pretrain every arm per seed, probe every label; (rows, facts)."""
    from fedrad.client.evaluation.splits import patient_split
    from fedrad.client.site.site_data import load_site
    from fedrad.client.tools.finetune import Arm, random_arm
    from fedrad.common.header_signals import SALT_FILE
    from fedrad.deploy.synthetic import write_xsec_archive

    t0 = time.time()
    site = write_xsec_archive(work / "site", n_patients=args.patients, rows=args.rows, slices=args.slices,
                              seed=args.seed)
    state = work / "state"  # a salt fixed by the seed: the same patient keys, hence the same split, every run
    state.mkdir(parents=True, exist_ok=True)
    (state / SALT_FILE).write_bytes(hashlib.sha256(f"bench-xsec-quality-{args.seed}".encode()).digest())
    sd = load_site(site, args.image_size, cache_dir=work / "cache", state_dir=state, progress=False)
    facts: dict[str, Any] = {"images": len(sd), "patients": len(set(sd.patient_keys)),
                             "series": int(len(np.unique(sd.series_ids))) if sd.series_ids is not None else 0,
                             "skipped": dict(sd.skipped), "archive_s": round(time.time() - t0, 1)}
    sets = {f: labelled(sd, f) for f in LABELS}
    train_idx, test_idx = patient_split(sets["contrast"].groups, sets["contrast"].y, seed=args.seed)
    facts["train_patients"] = int(len(np.unique(sd.group_ids()[train_idx])))
    facts["test_patients"] = int(len(np.unique(sd.group_ids()[test_idx])))
    print(f"archive: {facts['images']} slices, {facts['patients']} patients, {facts['series']} series "
          f"({facts['train_patients']} train / {facts['test_patients']} held-out patients) in "
          f"{facts['archive_s']}s", flush=True)
    train_data, pargs, rows, pre_s = sd.subset(train_idx), pretrain_args(args), [], 0.0
    for ps in range(args.pretrain_seeds):
        seed = args.seed + ps
        arms = [random_arm(args.model, args.image_size, seed=seed + 99)]
        for objective in OBJECTIVES:
            print(f"pretraining seed {seed}: {objective}, {args.steps} steps", flush=True)
            t1 = time.time()
            arms.append(Arm(objective, pretrain_local(train_data, pargs, args.steps, seed, objective=objective),
                            args.image_size))
            pre_s += time.time() - t1
        for arm in arms:
            rows += probe(arm, sets, train_idx, test_idx, args.fractions, args.label_seeds, seed)
    facts["pretrain_s"] = round(pre_s)
    return rows, facts


def probe(arm, sets: dict, train_idx: np.ndarray, test_idx: np.ndarray, fractions: tuple[float, ...],
          label_seeds: int, pretrain_seed: int) -> list[dict[str, Any]]:
    """One frozen backbone: per label and fraction, the linear probe's macro AUC on the held-out patients,
    averaged over label-subsample seeds (no bootstrap CI: the spread reported is across pretraining seeds)."""
    from fedrad.client.tools.finetune import embed_images, fit_linear, macro_auc, subsample_patients

    feats = embed_images(arm.backbone, next(iter(sets.values())).images, arm.size)  # same slices for every label
    rows = []
    for field, data in sets.items():
        for frac in fractions:
            aucs = []
            for s in range(label_seeds):
                tr = subsample_patients(train_idx, data.groups, data.y, frac, seed=1000 * s + 7)
                aucs.append(macro_auc(data.y[test_idx], fit_linear(feats[tr], data.y[tr], feats[test_idx], seed=s)))
            rows.append({"label": field, "backbone": arm.name, "fraction": frac, "auc": float(np.mean(aucs)),
                         "pretrain_seed": pretrain_seed})
    return rows


def table(rows: list[dict[str, Any]], fractions: tuple[float, ...]) -> str:
    """Markdown: one row per (label, arm), one column per label fraction, 'mean ± sd' over pretraining seeds."""
    lines = ["| label | backbone | " + " | ".join(f"{f * 100:g} % patients" for f in fractions) + " |",
             "|---|---|" + "---|" * len(fractions)]
    for field in LABELS:
        for name in dict.fromkeys(r["backbone"] for r in rows if r["label"] == field):
            cells = []
            for f in fractions:
                aucs = [r["auc"] for r in rows if r["label"] == field and r["backbone"] == name and r["fraction"] == f]
                cells.append(f"{np.mean(aucs):.3f} ± {np.std(aucs):.3f}" if aucs else "-")
            lines.append(f"| {field} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke test: tiny archive, a few steps, one seed")
    p.add_argument("--patients", type=int, default=None, help="synthetic patients (default 40; quick 10)")
    p.add_argument("--rows", type=int, default=32, help="phantom voxels a side")
    p.add_argument("--slices", type=int, default=None, help="slices per series (default 12; quick 8)")
    p.add_argument("--model", default="test_resnet")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=None, help="pretraining steps per arm (default 150; quick 3)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--fractions", default=None, help="label fractions of the training patients (default "
                   "0.1,0.3,1; quick 0.5,1)")
    p.add_argument("--pretrain-seeds", type=int, default=None, help="default 2; quick 1")
    p.add_argument("--label-seeds", type=int, default=None, help="label-subsample seeds (default 3; quick 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--workdir", default=None, help="archive and cache (default: a temporary folder, removed)")
    p.add_argument("--no-record", action="store_true", help="print only; record no rows")
    args = p.parse_args(raw)
    q = args.quick
    args.patients = args.patients or (10 if q else 40)
    args.slices = args.slices or (8 if q else 12)
    args.steps = args.steps or (3 if q else 150)
    args.pretrain_seeds = args.pretrain_seeds or (1 if q else 2)
    args.label_seeds = args.label_seeds or (1 if q else 3)
    try:
        args.fractions = tuple(float(f) for f in (args.fractions or ("0.5,1" if q else "0.1,0.3,1")).split(","))
    except ValueError:
        print(f"--fractions: comma-separated numbers, not {args.fractions!r}", file=sys.stderr)
        return 2
    if not all(0 < f <= 1 for f in args.fractions) or args.patients < 6 or args.slices < 2:
        print("--fractions in (0, 1], --patients >= 6, --slices >= 2", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(args.threads)
    t_start = time.time()
    load = os.getloadavg()[0]
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="fedrad-xq-"))
    try:
        rows, facts = run(args, work)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    seconds = time.time() - t_start
    text = table(rows, args.fractions)
    print("\n" + text + f"\n\ntotal {seconds / 60:.1f} min")
    if not args.no_record:
        ctx = {"command": "python benchmarks/bench_xsec_quality.py" + ("" if not raw else " " + shlex.join(raw)),
               "load_start": round(load, 2), "wall_min": round(seconds / 60, 1), "pretrain_s": facts["pretrain_s"],
               "torch_threads": args.threads,
               "data": f"synthetic CT, {facts['patients']} patients, {facts['series']} series, {facts['images']} "
                       f"slices of {args.rows} px; held out by patient: {facts['train_patients']} train / "
                       f"{facts['test_patients']} test patients",
               "arms": f"{args.model} {args.image_size} px, {args.steps} steps x batch {args.batch_size} per arm; "
                       f"linear probe, macro one-vs-rest AUC, mean of {args.label_seeds} label-subsample seed(s); "
                       f"mean ± sd over {args.pretrain_seeds} pretraining seed(s)"}
        for field in LABELS:
            for name in dict.fromkeys(r["backbone"] for r in rows if r["label"] == field):
                for f in args.fractions:
                    aucs = [r["auc"] for r in rows if r["label"] == field and r["backbone"] == name
                            and r["fraction"] == f]
                    if aucs:
                        record_row("xsec_quality", f"{field} {name} {f * 100:g} % patients",
                                   round(float(np.mean(aucs)), 3), "AUC",
                                   text=f"{np.mean(aucs):.3f} ± {np.std(aucs):.3f}", sd=round(float(np.std(aucs)), 3),
                                   label=field, backbone=name, **ctx)
        print("rows in benchmarks/results/xsec_quality.jsonl (python benchmarks/make_results.py)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
