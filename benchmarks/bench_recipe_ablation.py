"""The radiograph recipe, ablated one switch at a time on real chest X-rays (Hannover, 71 patients, 243 PNGs;
or `--data pneumoniamnist`: PneumoniaMNIST's 4708 training films, 28 px, where pretraining clearly beats random
init, split into the three label-skewed hospitals of bench_label_efficiency).

Each line of the table is the baseline run config with ONE switch changed (crop scale, rotation,
brightness/contrast/gamma, blur, noise, hflip, temperature, optimizer, LR schedule, objective). Every line
pretrains the same way: in-process FedAvg (no Flower processes, so a line costs minutes) over 3 sites made
by splitting the probe's TRAINING patients into three (the test patients' images are never seen, not even
unlabelled); each round every site runs `train_local` from the global weights with the run config's
augmentations, temperature, optimizer and the round's LR (`RunConfig.round_lr`), and the sites' weights
(BatchNorm statistics included) are averaged by example count. Then fedrad finetune's own experiment
(`run_experiment`: linear probe on frozen features, patient split, label fractions of training patients,
3 label-subsample seeds, patient-bootstrap CI) per target (sex, view, icu), pretrained vs random init.

The micle+supcon line's header label is `modality` (CR/DX), a column that is NOT probed. PneumoniaMNIST has
one film per patient and no header columns, so its table has no MICLe lines; its target is the pneumonia label
at 1 % and 10 % of the training films.

    python benchmarks/bench_recipe_ablation.py                        # the whole table: ~1 min a line on 2 idle cores
    python benchmarks/bench_recipe_ablation.py --lines baseline blur-off --no-record
    python benchmarks/bench_recipe_ablation.py --data pneumoniamnist  # ~1.5 min a line on 2 idle cores

The default scale (test_resnet, 64 px, 4 rounds x 12 local steps x 3 sites, batch 32, one torch thread) is
what fits "well under an hour on 2 shared cores" for the whole table. Hannover: CC BY 3.0, cite
DOI 10.6084/m9.figshare.12275009.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common_bench import fedavg_in_process, machine, recipe_rounds, record_row, shared_data  # noqa: E402

TARGETS = ["sex", "view", "icu"]
FRACTIONS = [0.1, 1.0]
SUPCON_LABEL = "modality"  # header label of the micle_supcon line: not one of TARGETS
# The baseline recipe (kebab-case run-config keys): RunConfig's radiograph defaults, SimCLR, lr for test_resnet.
BASELINE: dict[str, object] = {"objective": "simclr", "lr": 3e-3, "optimizer": "adamw", "temperature": 0.1}
# One switch per line: (name, run-config overrides, what it tests).
LINES: list[tuple[str, dict[str, object], str]] = [
    ("baseline", {}, "crop 0.4-1, rotate 10, b/c/g 0.1/0.2/1.25, blur 0.5, noise 0.5, no flip, T 0.1, adamw"),
    ("crop-min 0.8", {"aug-crop-min": 0.8}, "milder crops"),
    ("crop-min 0.2", {"aug-crop-min": 0.2}, "harsher crops (SimCLR's ImageNet 0.08-1 direction)"),
    ("rotate off", {"aug-rotate": 0.0}, "no rotation"),
    ("b/c/gamma off", {"aug-brightness": 0.0, "aug-contrast": 0.0, "aug-gamma": 1.0}, "no intensity jitter"),
    ("blur off", {"aug-blur-p": 0.0}, "no Gaussian blur"),
    ("noise off", {"aug-noise-p": 0.0}, "no Gaussian noise"),
    ("hflip on", {"hflip": True}, "horizontal flips (laterality lost)"),
    ("temperature 0.2", {"temperature": 0.2}, ""),
    ("temperature 0.5", {"temperature": 0.5}, ""),
    ("optimizer lars", {"optimizer": "lars", "lr": 0.3}, "timm LARS, lr 0.3 (SimCLR's sqrt rule at batch 32)"),
    ("lr warm-up + cosine", {"lr-schedule": "cosine", "warmup-rounds": 1}, "1 warm-up round, cosine to 0"),
    ("objective micle", {"objective": "micle"}, "a patient's other image as the positive"),
    ("objective micle+supcon", {"objective": "micle+supcon", "label-fields": SUPCON_LABEL},
     f"patient + header label '{SUPCON_LABEL}' positives"),
]
SECTION = ("recipe ablation: Hannover chest X-rays, pretrained - random-init AUC per target (test_resnet 64 px, "
           "FedAvg 4 rounds x 12 steps x 3 sites, batch 32, 1 torch thread; linear probe, 3 label seeds)")
# PneumoniaMNIST: one target, the label fractions where pretraining matters; lines without patients/headers out.
PNEUMONIA_FRACTIONS = [0.01, 0.1]
PNEUMONIA_LINES = [name for name, over, _ in LINES if "objective" not in over]
PNEUMONIA_SECTION = ("recipe ablation: PneumoniaMNIST, 3 label-skewed hospitals, pretrained - random-init AUC "
                     "(test_resnet {size} px, FedAvg {rounds} rounds x {steps} steps x 3 sites, batch {batch}, 1 torch "
                     "thread; linear probe, {probes} label seeds)")



def run_config(overrides: dict[str, object], rounds: int, local_steps: int, batch_size: int, size: int):
    """The RunConfig a federation would run for this line (its checks refuse a bad switch by name)."""
    from fedrad.common.run_config import RunConfig

    base = {"model": "test_resnet", "image-size": size, "proj-dim": 64, "num-server-rounds": rounds,
            "local-steps": local_steps, "batch-size": batch_size, "label-fields": ""}
    return RunConfig.from_flower({**base, **BASELINE, **overrides})


def fedavg_pretrain(sites: list, cfg, seed: int):
    """In-process FedAvg of `train_local` under `cfg`: per round each site trains from the global weights,
    then the example-weighted mean (float tensors, BN running statistics included)."""
    import torch

    from fedrad.common.models import build_model

    torch.manual_seed(seed)
    model = build_model(cfg.model, cfg.objective, cfg.image_size, proj_dim=cfg.proj_dim, norm=cfg.model_norm)
    losses = fedavg_in_process(model, sites, cfg.num_server_rounds, recipe_rounds(cfg), seed)
    return model, losses[0], losses[-1]


def per_target_rows(arms: list, data, train_idx: np.ndarray, test_idx: np.ndarray, seeds: int,
                    fractions: list[float] = FRACTIONS) -> dict:
    """{(arm, target, fraction): row} from run_experiment on each target alone (its CI is that target's)."""
    from fedrad.client.evaluation.data import LabelledSet
    from fedrad.client.tools.finetune import run_experiment

    out = {}
    for k, target in enumerate(data.targets):
        one = LabelledSet(images=data.images, y=data.y[:, [k]], targets=[target], groups=data.groups)
        for row in run_experiment(arms, one, train_idx, test_idx, fractions, "linear", seeds=seeds):
            out[(row["backbone"], target, row["fraction"])] = row
    return out


def gap(pre: dict, rnd: dict) -> tuple[float, float]:
    """(pretrained - random AUC, 95 % half-width): the arms' bootstrap half-widths combined as if independent
    (conservative: both are scored on the same test patients, which correlates them)."""
    half = [(r["ci_high"] - r["ci_low"]) / 2 for r in (pre, rnd)]
    return pre["auc"] - rnd["auc"], math.sqrt(half[0] ** 2 + half[1] ** 2)


def hannover_sites(root: Path, size: int, work: Path):
    """(probe set, train idx, test idx, 3 pretraining sites): the probe's training patients split in three."""
    from fedrad.client.evaluation.data import load_folder
    from fedrad.client.site.site_data import load_site
    from fedrad.client.tools.finetune import patient_split

    hannover = root / "hannover"
    cache = work / f"cache-{size}"
    data = load_folder(hannover, size, hannover / "labels.csv", targets=TARGETS, cache_dir=cache)
    site = load_site(hannover, size, cache_dir=cache, progress=False)
    if list(site.paths) != list(data.extra["paths"]) or SUPCON_LABEL not in site.labels:
        raise RuntimeError(f"{hannover}: every image needs sex/view/icu and '{SUPCON_LABEL}' labels")
    train_idx, test_idx = patient_split(data.groups, data.y, seed=0)
    patients = np.unique(data.groups[train_idx])
    np.random.default_rng(0).shuffle(patients)
    sites = [site.subset(train_idx[np.isin(data.groups[train_idx], part)]) for part in np.array_split(patients, 3)]
    return data, train_idx, test_idx, sites


def pneumonia_sites(root: Path, size: int, work: Path):
    """(probe set, official train idx, official test idx, the 3 label-skewed hospitals of bench_label_efficiency,
    written as PNG folders and loaded as a site loads them)."""
    from bench_label_efficiency import write_hospitals

    from fedrad.client.site.site_data import load_site
    from fedrad.client.tools.finetune import load_npz

    src = root / "pneumoniamnist" / "pneumoniamnist_28.npz"
    d = np.load(src)
    folders = write_hospitals(d["train_images"], d["train_labels"].ravel(), work / "pneumonia-sites", seed=0)
    sites = [load_site(f, size, cache_dir=work / f"pneumonia-cache-{size}" / f.name, progress=False) for f in folders]
    data = load_npz(src, size)
    return data, data.split["train"], data.split["test"], sites


def main() -> int:
    import torch

    from fedrad.client.tools.finetune import Arm, random_arm

    names = [name for name, _, _ in LINES]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--data", default="hannover", choices=["hannover", "pneumoniamnist"])
    ap.add_argument("--lines", nargs="+", default=None, choices=names, metavar="LINE",
                    help="default: every line the data set has")
    ap.add_argument("--seed", type=int, nargs="+", default=[0], help="pretraining seed(s) of every line")
    ap.add_argument("--rounds", type=int, default=None, help="default 4 (hannover), 5 (pneumoniamnist)")
    ap.add_argument("--local-steps", type=int, default=None, help="default 12 (hannover), 40 (pneumoniamnist)")
    ap.add_argument("--batch-size", type=int, default=None, help="default 32 (hannover), 64 (pneumoniamnist)")
    ap.add_argument("--image-size", type=int, default=None, help="default 64 (hannover), 28 (pneumoniamnist)")
    ap.add_argument("--probe-seeds", type=int, default=3, help="label-subsample seeds per fraction")
    ap.add_argument("--work", default="/tmp/fedrad-bench-recipe-ablation", help="decoded-image cache")
    ap.add_argument("--no-record", action="store_true", help="print only; record no rows")
    args = ap.parse_args()
    pneumonia = args.data == "pneumoniamnist"
    defaults = (5, 40, 64, 28) if pneumonia else (4, 12, 32, 64)
    args.rounds, args.local_steps, args.batch_size, args.image_size = (
        given or default for given, default in zip((args.rounds, args.local_steps, args.batch_size, args.image_size),
                                                   defaults, strict=True))
    lines = args.lines or (PNEUMONIA_LINES if pneumonia else names)
    if pneumonia and set(lines) - set(PNEUMONIA_LINES):
        print(f"bench_recipe_ablation: --data pneumoniamnist has no lines {sorted(set(lines) - set(PNEUMONIA_LINES))}"
              " (one film per patient, no header columns)", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    root = shared_data()
    need = root and (root / ("pneumoniamnist/pneumoniamnist_28.npz" if pneumonia else "hannover/labels.csv"))
    if need is None or not need.is_file():
        print(f"bench_recipe_ablation: no shared {args.data} data (set FEDRAD_SHARED_DATA)", file=sys.stderr)
        return 2
    size = args.image_size
    fractions = PNEUMONIA_FRACTIONS if pneumonia else FRACTIONS
    data, train_idx, test_idx, sites = (pneumonia_sites if pneumonia else hannover_sites)(root, size, Path(args.work))
    print(f"{len(data)} images of {len(np.unique(data.groups))} patients; pretraining sites "
          f"{[len(s) for s in sites]} images; probe test {len(test_idx)} images; targets {data.targets}", flush=True)
    baseline_arm = random_arm("test_resnet", size)
    command = "python benchmarks/bench_recipe_ablation.py " + shlex.join(sys.argv[1:])
    switches = {name: (over, why) for name, over, why in LINES}
    random_rows = None
    for name in lines:
        over, why = switches[name]
        cfg = run_config(over, args.rounds, args.local_steps, args.batch_size, size)
        for seed in args.seed:
            t0 = time.perf_counter()
            model, first, last = fedavg_pretrain(sites, cfg, seed)
            seconds = time.perf_counter() - t0
            arms = [Arm("pretrained", model.backbone.eval(), size)] + ([baseline_arm] if random_rows is None else [])
            rows = per_target_rows(arms, data, train_idx, test_idx, args.probe_seeds, fractions)
            if random_rows is None:
                random_rows = {k: v for k, v in rows.items() if k[0] == "random-init"}
            cells, means = [], {f: [] for f in fractions}
            for f in fractions:
                for t in data.targets:
                    g, h = gap(rows[("pretrained", t, f)], random_rows[("random-init", t, f)])
                    cells.append(f"{g:+.3f} ±{h:.2f}")
                    means[f].append(g)
            label = name if seed == 0 else f"{name} (seed {seed})"
            mean_cells = ([f"{np.mean([m for f in fractions for m in means[f]]):+.3f}"] if pneumonia
                          else [f"{np.mean(means[f]):+.3f}" for f in fractions])
            print(f"{label:<28} loss {first:.3f} -> {last:.3f}  " + "  ".join(cells) + "  mean "
                  + " / ".join(mean_cells) + f"  {seconds:.0f}s", flush=True)
            if not args.no_record:
                section = PNEUMONIA_SECTION.format(size=size, rounds=args.rounds, steps=args.local_steps,
                                                   batch=args.batch_size, probes=args.probe_seeds)
                ctx = {"command": command, "line": label, "switch": why or json_like(over),
                       "setting": section if pneumonia else SECTION, "pretrain_s": round(seconds)}
                k = 0
                for f in fractions:
                    for t in data.targets:
                        head = f"{f:.0%}" if pneumonia else f"{t} {f:.0%}"
                        g = means[f][data.targets.index(t)]
                        record_row("recipe_ablation", head, round(g, 3), "AUC gap", text=cells[k], **ctx)
                        k += 1
                mean_heads = ["mean"] if pneumonia else [f"mean {f * 100:.0f} %" for f in fractions]
                for head, cell in zip(mean_heads, mean_cells, strict=True):
                    record_row("recipe_ablation", head, float(cell), "AUC gap", **ctx)
    if random_rows is not None:
        print("random-init AUC: " + ", ".join(f"{t} {f:.0%} {random_rows[('random-init', t, f)]['auc']:.3f}"
                                              for f in fractions for t in data.targets))
    print(f"command: {command}; machine: {machine()}")
    return 0


def json_like(over: dict[str, object]) -> str:
    return ", ".join(f"{k} {v}" for k, v in over.items())


if __name__ == "__main__":
    raise SystemExit(main())
