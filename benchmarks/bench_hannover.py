"""Label efficiency on real chest X-rays: the shared Hannover set at 128 px, 3 hospitals split by patient.

The 71 patients (243 PNGs, up to 22 images each) are split once: 30 % of patients are the probe's test set and
never seen in pretraining; the rest go to 3 "hospitals", every image of a patient at one site, each written as
a PNG folder with a manifest.csv (image, patient_id only: no label column reaches pretraining), as a site would
hand it to `fedrad node`. Backbones of one architecture, image size and optimizer-step budget:

* random init;
* single site: MICLe on the largest hospital alone (the best a hospital can do without the consortium);
* centralised: MICLe on the three hospitals pooled (`train_local`);
* federated: MICLe through real Flower processes (1 SuperLink + 3 SuperNodes on loopback, FedAvg);
* federated + DP: the same with dp = "sample" (opacus DP-SGD per image at each site). MICLe's loss couples the
  images of a batch, so this arm trains SimSiam (a per_sample objective) with GroupNorm; its noise is calibrated
  so that each site's image-level ε over the run stays within --dp-epsilon, the budget the run config carries.

MICLe's positives are a patient's other images, so no label column is used in pretraining (no leakage into the
probed targets). Compute is matched: every non-federated arm runs rounds x local-steps x 3 steps.
Targets sex, view (pa vs ap) and icu from labels.csv; each backbone is probed on 10/25/100 % of the training
patients (linear probe on frozen features, optionally mlp, and full fine-tuning from random init and federated),
3 label-subsample seeds, test ROC-AUC with a patient-level bootstrap 95 % CI. The issue-17 goals are checked and
printed at the end; a plot goes to benchmarks/plots/label_efficiency_hannover.png.

    python benchmarks/bench_hannover.py --quick     # a few minutes, smoke test
    python benchmarks/bench_hannover.py             # the CPU setting (2 cores)

Hannover COVID-19 chest X-rays: CC BY 3.0, cite DOI 10.6084/m9.figshare.12275009. Data: $FEDRAD_SHARED_DATA or
<repo>/../shared/data (never downloaded).
"""

from __future__ import annotations

import argparse
import csv
import shlex
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_label_efficiency import pool, shared_data  # noqa: E402
from common_bench import federated_run, machine, record_row  # noqa: E402

from fedrad.server.run_log import read_metrics  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PLOT = REPO / "benchmarks" / "plots" / "label_efficiency_hannover.png"
TARGETS = ("sex", "view", "icu")
FRACTIONS = (0.1, 0.25, 1.0)
N_SITES = 3
TEST_FRACTION = 0.3
GOAL_MARGIN = 0.05  # issue 17: pretrained >= random init + 0.05 AUC at 10 % labels
GOAL_TARGETS = 2  # ... on at least two of the three targets


def read_rows(root: Path) -> list[dict[str, str]]:
    with open(root / "labels.csv", newline="") as f:
        return list(csv.DictReader(f))


def split_patients(rows: list[dict[str, str]], seed: int = 0, n_sites: int = N_SITES,
                   test_fraction: float = TEST_FRACTION) -> tuple[set[str], list[set[str]]]:
    """(test patients, one set of patients per hospital): every image of a patient on one side, at one site.

    Patients are stratified by icu (the patient-level target) and dealt round-robin by image count, largest
    first, so the hospitals get similar numbers of images and each has ICU and non-ICU patients.
    """
    rng = np.random.default_rng(seed)
    n_img: dict[str, int] = defaultdict(int)
    icu: dict[str, str] = {}
    for r in rows:
        n_img[r["patient_id"]] += 1
        icu[r["patient_id"]] = r["icu"]
    test: set[str] = set()
    sites: list[set[str]] = [set() for _ in range(n_sites)]
    for stratum in sorted(set(icu.values())):
        pats = sorted(p for p in icu if icu[p] == stratum)
        rng.shuffle(pats)
        k = max(1, round(test_fraction * len(pats)))
        test.update(pats[:k])
        rest = sorted(pats[k:], key=lambda p: -n_img[p])
        load = [sum(n_img[q] for q in s) for s in sites]
        for p in rest:  # greedy: the next-largest patient to the hospital with the fewest images so far
            i = int(np.argmin(load))
            sites[i].add(p)
            load[i] += n_img[p]
    return test, sites


def write_hospitals(src: Path, rows: list[dict[str, str]], sites: list[set[str]], root: Path) -> list[Path]:
    """One PNG folder per hospital with manifest.csv (image, patient_id): copies, no label columns."""
    out = []
    for k, patients in enumerate(sites):
        site = root / f"hospital-{k}"
        (site / "png").mkdir(parents=True, exist_ok=True)
        mine = [r for r in rows if r["patient_id"] in patients]
        for r in mine:
            if not (site / r["image"]).exists():
                shutil.copyfile(src / r["image"], site / r["image"])
        tmp = site / "manifest.csv.tmp"
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["image", "patient_id"])
            w.writerows((r["image"], r["patient_id"]) for r in mine)
        tmp.replace(site / "manifest.csv")
        out.append(site)
    return out


def labelled_set(src: Path, rows: list[dict[str, str]], image_size: int, cache: Path):
    """All 243 images as a LabelledSet with targets sex=m, view=pa, icu and groups = patient."""
    from fedrad.client.site.site_data import load_site
    from fedrad.client.tools.finetune import LabelledSet, binarise

    site = load_site(src, image_size, cache_dir=cache, progress=False)
    by_name = {Path(r["image"]).name: r for r in rows}
    mine = [by_name[Path(p).name] for p in site.paths]
    y, names, mask = binarise({t: [r[t] for r in mine] for t in TARGETS})
    if not mask.all():
        raise ValueError(f"{src / 'labels.csv'}: {int((~mask).sum())} images lack one of {TARGETS}")
    _, groups = np.unique([r["patient_id"] for r in mine], return_inverse=True)
    return LabelledSet(images=site.as_float(np.arange(len(site))).numpy()[:, 0], y=y, targets=names,
                       groups=groups.astype(np.int64), source=str(src),
                       extra={"patients": [r["patient_id"] for r in mine]})


def run_config(args, objective: str, dp: bool = False) -> dict[str, Any]:
    """The run-config overrides of a pretraining arm (kebab-case, as `flwr run` takes them)."""
    cfg: dict[str, Any] = {
        "model": args.model, "image-size": args.image_size, "objective": objective,
        "num-server-rounds": args.rounds, "local-steps": args.local_steps, "batch-size": args.batch_size,
        "lr": args.lr, "proj-dim": args.proj_dim, "seed": args.seed, "aug-crop-min": args.crop_min,
        "temperature": args.temperature, "min-train-nodes": N_SITES, "min-available-nodes": N_SITES,
        "round-timeout": 1800.0, "eval-in-train": True,
    }
    if dp:
        cfg.update({"dp": "sample", "dp-noise": args.dp_noise, "dp-clip": args.dp_clip, "dp-delta": 1e-5,
                    "dp-epsilon-budget": args.dp_epsilon})
    return cfg


def pretrain_local(data, args, objective: str, steps: int):
    """`steps` optimizer steps of `objective` with exactly the config a federated site trains with."""
    import torch

    from fedrad.client.app.task import train_config_for
    from fedrad.client.training.trainer import train_local
    from fedrad.common.models import build_model
    from fedrad.common.run_config import RunConfig

    cfg = RunConfig.from_flower(run_config(args, objective))
    torch.manual_seed(args.seed)
    model = build_model(args.model, objective, args.image_size, proj_dim=args.proj_dim)
    tc = train_config_for(cfg, "cpu", 0, 0)
    tc.steps = steps
    res = train_local(model, data, tc, progress=False)
    k = max(1, min(5, len(res.losses) // 4))
    print(f"    loss {np.mean(res.losses[:k]):.3f} -> {np.mean(res.losses[-k:]):.3f} in {res.seconds:.0f}s",
          flush=True)
    return model.backbone.eval()


def goal_check(rows: list[dict[str, Any]], pretrained: str = "federated", baseline: str = "random-init",
               fraction: float = 0.1) -> dict[str, Any]:
    """Issue 17's Hannover goals from result rows (each with target, backbone, mode, fraction, auc, ci_low).

    labels: linear probe at `fraction`, pretrained >= baseline + 0.05 AUC on >= 2 targets.
    full: full fine-tuning from `pretrained` is never worse than from `baseline` beyond the CI, i.e. at every
    target and fraction the pretrained AUC is at least the lower end of the baseline's 95 % CI.
    """
    def find(target, name, mode, frac):
        return next((r for r in rows if r["target"] == target and r["backbone"] == name and r["mode"] == mode
                     and abs(r["fraction"] - frac) < 1e-9), None)

    gains = {}
    for t in dict.fromkeys(r["target"] for r in rows):
        p, b = find(t, pretrained, "linear", fraction), find(t, baseline, "linear", fraction)
        if p and b:
            gains[t] = p["auc"] - b["auc"]
    wins = [t for t, g in gains.items() if g >= GOAL_MARGIN - 1e-12]
    full_pairs = [(r, find(r["target"], baseline, "full", r["fraction"])) for r in rows
                  if r["backbone"] == pretrained and r["mode"] == "full"]
    worse = [f"{p['target']} {p['fraction']:.0%}" for p, b in full_pairs if b and p["auc"] < b["ci_low"]]
    checked = sum(1 for _, b in full_pairs if b)
    return {"gains": gains, "label_goal": len(wins) >= GOAL_TARGETS, "wins": wins,
            "full_goal": (not worse) if checked else None, "full_worse": worse, "full_checked": checked}


def goal_lines(goals: dict[str, Any], pretrained: str = "federated") -> list[str]:
    gains = ", ".join(f"{t} {g:+.3f}" for t, g in goals["gains"].items())
    lines = [f"goal 10 % labels, {pretrained} >= random-init + {GOAL_MARGIN} AUC on >= {GOAL_TARGETS} of 3 "
             f"targets: {'MET' if goals['label_goal'] else 'MISSED'} (linear-probe gains: {gains})"]
    if goals["full_goal"] is None:
        lines.append("goal full fine-tuning never worse than random init beyond the CI: NOT RUN")
    else:
        lines.append("goal full fine-tuning from pretrained never worse than random init beyond the CI: "
                     + ("MET" if goals["full_goal"] else f"MISSED at {', '.join(goals['full_worse'])}")
                     + f" ({goals['full_checked']} target x fraction cells)")
    return lines


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """One panel per target: AUC vs labelled patients, a line per backbone (and mode), 95 % CI error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fedrad.common.atomic import atomic_write

    targets = list(dict.fromkeys(r["target"] for r in rows))
    fig, axes = plt.subplots(1, len(targets), figsize=(5 * len(targets), 4), squeeze=False)
    for ax, t in zip(axes[0], targets, strict=True):
        keys = list(dict.fromkeys((r["backbone"], r["mode"]) for r in rows if r["target"] == t))
        for name, mode in keys:
            sel = sorted((r for r in rows if (r["target"], r["backbone"], r["mode"]) == (t, name, mode)),
                         key=lambda r: r["fraction"])
            err = [[max(0.0, r["auc"] - r["ci_low"]) for r in sel], [max(0.0, r["ci_high"] - r["auc"]) for r in sel]]
            ax.errorbar([r["fraction"] * 100 for r in sel], [r["auc"] for r in sel], yerr=err, marker="o",
                        capsize=3, linestyle="-" if mode == "linear" else "--", label=f"{name} ({mode})")
        ax.set_xscale("log")
        ax.set_xticks([f * 100 for f in FRACTIONS], [f"{f:.0%}" for f in FRACTIONS])
        ax.set_xlabel("labelled training patients")
        ax.set_ylabel("test ROC-AUC")
        ax.set_title(t)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)


def results_section(rows: list[dict[str, Any]], argv: list[str], seconds: float, info: list[str],
                    goals: list[str]) -> str:
    cmd = "python benchmarks/bench_hannover.py" + ("" if not argv else " " + shlex.join(argv))
    lines = ["", f"### {datetime.now(UTC).strftime('%Y-%m-%d %H:%M')} UTC, `{cmd}`", "",
             f"- machine: {machine()}; wall time {seconds / 60:.1f} min", *[f"- {x}" for x in info],
             *[f"- {g}" for g in goals], "",
             "| target | backbone | mode | " + " | ".join(f"{f:.0%}" for f in FRACTIONS) + " |",
             "|---|---|---|" + "---|" * len(FRACTIONS)]
    for t, name, mode in dict.fromkeys((r["target"], r["backbone"], r["mode"]) for r in rows):
        cells = []
        for f in FRACTIONS:
            r = next((r for r in rows if (r["target"], r["backbone"], r["mode"]) == (t, name, mode)
                      and abs(r["fraction"] - f) < 1e-9), None)
            cells.append("-" if r is None else f"{r['auc']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]")
        lines.append(f"| {t} | {name} | {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def record_results(rows: list[dict[str, Any]], argv: list[str], seconds: float, info: list[str],
                   goals: dict[str, Any]) -> None:
    """One row per probed cell (target, backbone, mode, fraction: test AUC with its CI) and one per goal, in
    benchmarks/results/hannover.jsonl; the run's settings (`info`) ride on every row."""
    cmd = "python benchmarks/bench_hannover.py" + ("" if not argv else " " + shlex.join(argv))
    ctx = {"command": cmd, "wall_min": round(seconds / 60, 1), "info": info}
    for r in rows:
        record_row("hannover", f"{r['target']} {r['backbone']} {r['mode']} {r['fraction']:.0%}", round(r["auc"], 3),
                   "AUC", text=f"{r['auc']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]", target=r["target"],
                   backbone=r["backbone"], mode=r["mode"], **ctx)
    gains = ", ".join(f"{t} {g:+.3f}" for t, g in goals["gains"].items())
    record_row("hannover", "goal: 10 % labels, federated >= random-init + 0.05 AUC on >= 2 of 3 targets",
               len(goals["wins"]), "targets", goal=f">= {GOAL_TARGETS} targets", met=goals["label_goal"],
               note=f"linear-probe gains: {gains}", **ctx)
    record_row("hannover", "goal: full fine-tuning from pretrained never worse than random init beyond the CI",
               goals["full_checked"], "cells checked", goal="no cell worse", met=goals["full_goal"],
               note="worse at " + ", ".join(goals["full_worse"]) if goals.get("full_worse") else "", **ctx)


def main(argv: list[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 2 rounds x 2 steps, 1 seed, no full fine-tune")
    p.add_argument("--model", default="test_resnet", help="timm backbone (default: fits the hour on 2 cores)")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=None, help="federated rounds (default 6; quick 2)")
    p.add_argument("--local-steps", type=int, default=None, help="steps per site per round (default 20; quick 2)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--temperature", type=float, default=0.1)
    p.add_argument("--crop-min", type=float, default=0.4, help="smallest random-resized-crop area")
    p.add_argument("--proj-dim", type=int, default=64)
    p.add_argument("--dp-epsilon", type=float, default=8.0, help="federated+DP arm: each site's image-level epsilon "
                   "over the whole run (the noise is calibrated to it; a site's own floor, 20 by default, stops a "
                   "run that would pass it)")
    p.add_argument("--dp-noise", type=float, default=0.0, help="fixed noise multiplier (default: calibrated to "
                   "--dp-epsilon)")
    p.add_argument("--dp-clip", type=float, default=1.0)
    p.add_argument("--arms", default="single,central,fed,fed-dp",
                   help="pretrained arms to run (random init always): single, central, fed, fed-dp")
    p.add_argument("--modes", default=None, help="probe modes (default linear,full; quick linear)")
    p.add_argument("--epochs", type=int, default=None, help="mlp / full fine-tune epochs (default 5; quick 1)")
    p.add_argument("--seeds", type=int, default=None, help="label-subsample seeds (default 3; quick 1)")
    p.add_argument("--full-seeds", type=int, default=None, help="seeds of the mlp/full fits (default: --seeds)")
    p.add_argument("--full-fractions", default=None, help="label fractions of the mlp/full fits (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads in this process")
    p.add_argument("--workdir", default=None, help="sites, caches, Flower logs (default: a temporary folder)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "hannover"))
    p.add_argument("--no-record", action="store_true", help="no result rows, no committed plot")
    args = p.parse_args(raw)
    q = args.quick
    args.rounds = args.rounds or (2 if q else 6)
    args.local_steps = args.local_steps or (2 if q else 20)
    args.epochs = args.epochs or (1 if q else 5)
    args.seeds = args.seeds or (1 if q else 3)
    args.modes = [m for m in (args.modes or ("linear" if q else "linear,full")).split(",") if m]
    args.arms = [a for a in args.arms.split(",") if a]
    args.full_seeds = args.full_seeds or args.seeds
    args.full_fractions = [float(f) for f in args.full_fractions.split(",")] if args.full_fractions else FRACTIONS
    bad = [a for a in args.arms if a not in ("single", "central", "fed", "fed-dp")]
    if bad or not set(args.modes) <= {"linear", "mlp", "full"}:
        print(f"error: unknown --arms {bad} or --modes {args.modes}", file=sys.stderr)
        return 2

    src = shared_data() / "hannover"
    if not (src / "labels.csv").is_file():
        print(f"skip: {src / 'labels.csv'} not found (set FEDRAD_SHARED_DATA)", file=sys.stderr)
        return 0
    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="fedrad-hannover-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        return _run(args, raw, src, work, time.time())
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


def _run(args: argparse.Namespace, raw: list[str], src: Path, work: Path, t_start: float) -> int:
    from fedrad.client.site.site_data import load_site
    from fedrad.client.tools.finetune import Arm, random_arm, run_experiment
    from fedrad.common.models import load_backbone

    rows_csv = read_rows(src)
    test_pats, site_pats = split_patients(rows_csv, seed=args.seed)
    sites = write_hospitals(src, rows_csv, site_pats, work / "sites")
    site_data = [load_site(s, args.image_size, cache_dir=work / "cache-local" / s.name, progress=False)
                 for s in sites]
    for s, sd, pats in zip(sites, site_data, site_pats, strict=True):
        print(f"  {s.name}: {len(pats)} patients, {len(sd)} images (no labels in its manifest)", flush=True)
    budget = args.rounds * args.local_steps * N_SITES
    print(f"test: {len(test_pats)} patients held out of pretraining; budget {args.rounds} rounds x "
          f"{args.local_steps} steps x {N_SITES} sites = {budget} steps of batch {args.batch_size}, {args.model} "
          f"at {args.image_size}px", flush=True)

    arms = [random_arm(args.model, args.image_size, seed=args.seed + 99)]
    info = [f"{args.model} {args.image_size}px, batch {args.batch_size}, lr {args.lr}, crop area >= "
            f"{args.crop_min}, temperature {args.temperature}, {budget} optimizer steps per arm (federated: "
            f"{args.rounds} rounds x {args.local_steps} local steps x {N_SITES} sites, FedAvg); hospitals "
            f"{', '.join(f'{len(p)} patients/{len(d)} images' for p, d in zip(site_pats, site_data, strict=True))};"
            f" test {len(test_pats)} patients"]
    timings = {}
    if "single" in args.arms:
        big = int(np.argmax([len(d) for d in site_data]))
        print(f"pretraining: single site ({sites[big].name}, MICLe)", flush=True)
        t0 = time.time()
        arms.append(Arm("single-site", pretrain_local(site_data[big], args, "micle", budget), args.image_size))
        timings["single-site"] = time.time() - t0
    if "central" in args.arms:
        print("pretraining: centralised (3 hospitals pooled, MICLe)", flush=True)
        t0 = time.time()
        arms.append(Arm("centralised", pretrain_local(pool(site_data), args, "micle", budget), args.image_size))
        timings["centralised"] = time.time() - t0
    if "fed-dp" in args.arms and args.dp_noise <= 0:
        from bench_label_efficiency import site_dp_noise

        args.dp_noise = site_dp_noise(site_data, args.dp_epsilon, 1e-5, args.batch_size, args.rounds * args.local_steps)
    for arm, objective, dp in (("fed", "micle", False), ("fed-dp", "simsiam", True)):
        if arm not in args.arms:
            continue
        name = "federated+DP" if dp else "federated"
        print(f"pretraining: {name} ({objective}, Flower SuperLink + {N_SITES} SuperNodes)", flush=True)
        t0 = time.time()
        try:
            run_dir = federated_run(sites, run_config(args, objective, dp), work / arm, name="run",
                                    node_threads=1, timeout=5400)
        except RuntimeError as exc:  # recorded, so the other arms' hour is not lost; the section says so
            print(f"    {name} FAILED: {exc}", flush=True)
            info.append(f"{name}: FAILED ({exc})")
            continue
        timings[name] = time.time() - t0
        metrics = read_metrics(run_dir)
        eps = [m["dp_epsilon"] for m in metrics if m.get("dp_epsilon") is not None]
        loss = [m["train_loss"] for m in metrics if m.get("train_loss") is not None]
        print(f"    {len(metrics)} rounds in {timings[name]:.0f}s, train loss {loss[:1]} -> {loss[-1:]}"
              + (f", image-level epsilon {eps[-1]:.2f} (delta 1e-5)" if eps else ""), flush=True)
        if dp:
            info.append(f"federated+DP: SimSiam (MICLe is not per-sample), GroupNorm, dp = \"sample\", noise "
                        f"{args.dp_noise}, clip {args.dp_clip}: image-level epsilon "
                        + (f"{eps[-1]:.2f}" if eps else "not reported") + " at delta 1e-5 per site")
        arms.append(Arm(name, load_backbone(args.model, run_dir / "global.safetensors").eval(), args.image_size))
    info.append("pretraining seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))

    data = labelled_set(src, rows_csv, args.image_size, work / "cache-eval")
    patients = np.array(data.extra["patients"])
    test_mask = np.isin(patients, sorted(test_pats))
    train_idx, test_idx = np.flatnonzero(~test_mask), np.flatnonzero(test_mask)
    rows: list[dict[str, Any]] = []
    ft_names = {"random-init", "federated"}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from fedrad.common.atomic import atomic_write_json

    for mode in args.modes:  # every linear probe first: the cheap, headline numbers are in before full fine-tuning
        for k, target in enumerate(data.targets):
            one = type(data)(images=data.images, y=data.y[:, k:k + 1], targets=[target], groups=data.groups)
            linear = mode == "linear"
            use = arms if linear else [a for a in arms if a.name in ft_names]
            print(f"probing {target}: {mode}", flush=True)
            fracs = list(FRACTIONS if linear else args.full_fractions)
            for r in run_experiment(use, one, train_idx, test_idx, fracs, mode,
                                    args.seeds if linear else args.full_seeds, args.epochs, device="cpu",
                                    log=lambda m: print(m, flush=True)):
                rows.append({**r, "target": target.split("=")[0]})
        atomic_write_json(out / "results.json", {"info": info, "rows": rows, "partial_after": mode})
    seconds = time.time() - t_start
    info.append(f"probe: {', '.join(args.modes)}; linear: every arm, {args.seeds} label-subsample seed(s); "
                f"mlp/full: {' and '.join(sorted(ft_names))} only, {args.epochs} epochs (at least 40 steps), "
                f"{args.full_seeds} seed(s), fractions {', '.join(f'{f:.0%}' for f in args.full_fractions)}; "
                f"targets {', '.join(data.targets)} (positive class after '=')")
    checked = goal_check(rows)
    goals = goal_lines(checked)
    section = results_section(rows, raw, seconds, info, goals)
    atomic_write_json(out / "results.json", {"info": info, "goals": goals, "rows": rows})
    plot(rows, out / "label_efficiency_hannover.png", f"Hannover CXR {args.image_size}px, {args.model}")
    print(section)
    if not args.no_record:
        PLOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "label_efficiency_hannover.png", PLOT)
        record_results(rows, raw, seconds, info, checked)
        print(f"rows in benchmarks/results/hannover.jsonl (python benchmarks/make_results.py); plot {PLOT}")
    print("\n".join(goals))
    print(f"total {seconds / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
