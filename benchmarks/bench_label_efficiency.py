"""Label efficiency on PneumoniaMNIST: does federated pretraining across 3 hospitals beat training alone?

The official train images (labels withheld) are split into 3 non-IID "hospitals" by label skew and written
as PNG folders with a manifest.csv, exactly as a site would hand them to `fedrad node`. Four backbones of
the same architecture, image size and optimizer-step budget are compared:

* random init;
* single-site SimCLR pretraining on hospital 0 only;
* centralised SimCLR pretraining on all three hospitals' images pooled (`train_local` directly);
* federated SimCLR pretraining through real Flower processes (1 SuperLink + 3 SuperNodes on loopback).

Compute is matched: each non-federated arm gets rounds x local-steps x 3 optimizer steps, the total the
three sites run together. Each backbone is then fine-tuned on 1 %, 10 %, 100 % of the official train labels
(linear probe and full fine-tune) and scored on the official test split: ROC-AUC with a bootstrap 95 % CI.
Prints the table, saves a plot and appends to benchmarks/RESULTS.md (machine + command).

    python benchmarks/bench_label_efficiency.py --quick     # a few minutes, smoke test
    python benchmarks/bench_label_efficiency.py             # < 1 h on 2 CPU cores at 28 px

PneumoniaMNIST: CC BY 4.0, MedMNIST (Yang et al., Scientific Data 2023). Data: $FEDRAD_SHARED_DATA or
<repo>/../shared/data (never downloaded).
"""

from __future__ import annotations

import argparse
import csv
import os
import shlex
import shutil
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common_bench import machine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).with_name("RESULTS.md")
# Share of each class's images that goes to hospitals 0, 1, 2: hospital 0 is mostly normal films (an
# outpatient clinic), hospital 2 mostly pneumonia (an ICU-heavy hospital).
LABEL_SKEW = {0: (0.6, 0.3, 0.1), 1: (0.15, 0.35, 0.5)}


def shared_data() -> Path:
    env = os.environ.get("FEDRAD_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


def write_hospitals(images: np.ndarray, labels: np.ndarray, root: Path, seed: int = 0) -> list[Path]:
    """3 PNG folders + manifest.csv (image, patient_id, label); each image is its own patient."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    assign = np.empty(len(labels), dtype=np.int64)
    for c, shares in LABEL_SKEW.items():
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        cuts = np.cumsum(np.round(np.array(shares) * len(idx)).astype(int))[:-1]
        for k, part in enumerate(np.split(idx, cuts)):
            assign[part] = k
    sites = []
    for k in range(3):
        site = root / f"hospital-{k}"
        site.mkdir(parents=True, exist_ok=True)
        rows = []
        for i in np.flatnonzero(assign == k):
            name = f"img_{i:05d}.png"
            if not (site / name).exists():
                Image.fromarray(images[i]).save(site / name)
            rows.append((name, f"pm-{i:05d}", int(labels[i])))
        with open(site / "manifest.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["image", "patient_id", "label"])
            w.writerows(rows)
        sites.append(site)
    return sites


def pool(sites: list):
    """One SiteData of several sites' images (the centralised arm: all data in one place)."""
    from fedrad.client.site_data import SiteData

    keys = set().union(*(s.labels for s in sites))
    return SiteData(images=np.concatenate([s.images for s in sites]),
                    paths=[p for s in sites for p in s.paths],
                    patient_keys=[f"{i}:{k}" for i, s in enumerate(sites) for k in s.patient_keys],
                    labels={k: [v for s in sites for v in s.labels.get(k, [""] * len(s))] for k in keys},
                    image_size=sites[0].image_size)


def pretrain_local(data, args, steps: int, seed: int):
    """SimCLR with the same config a federated site uses, for `steps` optimizer steps; the backbone."""
    import torch

    from fedrad.client.trainer import TrainConfig, train_local
    from fedrad.common.models import build_model

    torch.manual_seed(args.seed)  # same init as the federated run's global model
    model = build_model(args.model, "simclr", args.image_size, proj_dim=args.proj_dim)
    cfg = TrainConfig(objective="simclr", steps=steps, batch_size=args.batch_size, lr=args.lr, device="cpu",
                      seed=seed, image_size=args.image_size)
    res = train_local(model, data, cfg, progress=False)
    k = max(1, min(5, len(res.losses) // 4))
    print(f"    loss {np.mean(res.losses[:k]):.3f} -> {np.mean(res.losses[-k:]):.3f} in {res.seconds:.0f}s",
          flush=True)
    return model.backbone.eval()


def pretrain_federated(sites: list[Path], args, work: Path) -> Path:
    """Real fedrad rounds: SuperLink + one SuperNode per hospital + `flwr run`; the run directory."""
    from fedrad.deploy.processes import ProcessGroup, free_port, superlink_command, supernode_command, wait_for_port
    from fedrad.deploy.run_command import submit_run

    run_dir = work / "fed-run"
    overrides: dict[str, object] = {
        "model": args.model, "image-size": args.image_size, "objective": "simclr",
        "num-server-rounds": args.rounds, "local-steps": args.local_steps, "batch-size": args.batch_size,
        "lr": args.lr, "proj-dim": args.proj_dim, "seed": args.seed, "min-train-nodes": 3,
        "min-available-nodes": 3, "round-timeout": 900.0, "run-dir": str(run_dir),
    }
    from fedrad.client.runtime import SiteTrust
    from fedrad.server.release import generate_keys

    sign_key, consortium_pub = generate_keys(work / "keys" / "consortium")  # sites run only signed runs
    with ProcessGroup() as group:
        port = free_port()
        state = work / "coordinator"
        state.mkdir(parents=True, exist_ok=True)
        link = group.start("superlink", superlink_command(state, "127.0.0.1", port), work / "logs" / "superlink.log")
        wait_for_port("127.0.0.1", port, 60, link)
        for site in sites:
            cfg = {"data-dir": str(site), "cache-dir": str(work / "cache" / site.name), "device": "cpu",
                   "state-dir": str(work / "state" / site.name)}
            group.start(f"node-{site.name}", supernode_command(f"127.0.0.1:{port}", free_port(), cfg,
                                                                 trust=SiteTrust(consortium_pub)),
                        work / "logs" / f"node-{site.name}.log")
        code = submit_run(f"127.0.0.1:{port}", overrides, log_path=work / "logs" / "flwr-run.log",
                          timeout=3000, echo=False, sign_key=sign_key)
    if code != 0 or not (run_dir / "global.safetensors").exists():
        raise RuntimeError(f"federated run failed (flwr exit {code}); see {work / 'logs'}")
    return run_dir


def append_results(rows: list[dict], args, argv: list[str], seconds: float, arms_info: str) -> None:
    header = "## label efficiency (PneumoniaMNIST, 3 label-skewed hospitals)"
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    lines = []
    if header not in text:
        lines += ["", header, "",
                  "Official split; pretraining on the train images without labels; fine-tuning on 1/10/100 % of "
                  "the train labels; test ROC-AUC with a 95 % bootstrap CI over test images. "
                  "PneumoniaMNIST: CC BY 4.0 (MedMNIST, Yang et al. 2023).", ""]
    cmd = "python benchmarks/bench_label_efficiency.py" + ("" if not argv else " " + shlex.join(argv))
    lines += ["", f"### {datetime.now(UTC).strftime('%Y-%m-%d %H:%M')} UTC, `{cmd}`", "",
              f"- machine: {machine()}; wall time {seconds / 60:.1f} min",
              f"- {arms_info}", "",
              "| backbone | mode | 1 % | 10 % | 100 % |", "|---|---|---|---|---|"]
    keys = list(dict.fromkeys((r["backbone"], r["mode"]) for r in rows))
    for name, mode in keys:
        cells = []
        for frac in (0.01, 0.1, 1.0):
            r = next((r for r in rows if r["backbone"] == name and r["mode"] == mode and r["fraction"] == frac), None)
            cells.append("-" if r is None else f"{r['auc']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]")
        lines.append(f"| {name} | {mode} | " + " | ".join(cells) + " |")
    with RESULTS.open("a") as f:
        f.write("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="few-minute smoke run (2 rounds, short training)")
    p.add_argument("--model", default="test_resnet")
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--rounds", type=int, default=None, help="federated rounds (default 10; quick 2)")
    p.add_argument("--local-steps", type=int, default=None, help="steps per site per round (default 60; quick 10)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--proj-dim", type=int, default=64)
    p.add_argument("--epochs", type=int, default=None, help="full fine-tune epochs (default 8; quick 2)")
    p.add_argument("--seeds", type=int, default=None, help="label-subsample seeds (default 3; quick 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads in this process")
    p.add_argument("--workdir", default=None, help="sites, caches, Flower logs (default: a temporary folder, "
                   "removed at the end)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "label_efficiency"))
    p.add_argument("--no-record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = p.parse_args(raw)
    q = args.quick
    args.rounds = args.rounds or (2 if q else 10)
    args.local_steps = args.local_steps or (10 if q else 60)
    args.epochs = args.epochs or (2 if q else 8)
    args.seeds = args.seeds or (1 if q else 3)

    src = shared_data() / "pneumoniamnist" / "pneumoniamnist_28.npz"
    if not src.is_file():
        print(f"skip: {src} not found (set FEDRAD_SHARED_DATA)", file=sys.stderr)
        return 0
    import torch

    torch.set_num_threads(args.threads)
    t_start = time.time()
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="fedrad-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        return _run(args, raw, src, work, t_start)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


def _run(args: argparse.Namespace, raw: list[str], src: Path, work: Path, t_start: float) -> int:
    from fedrad.client.finetune import Arm, load_npz, random_arm, run_experiment, write_outputs
    from fedrad.client.site_data import load_site
    from fedrad.common.models import load_backbone

    d = np.load(src)
    sites = write_hospitals(d["train_images"], d["train_labels"].ravel(), work / "sites", seed=args.seed)
    site_data = [load_site(s, args.image_size, cache_dir=work / "cache-local" / s.name, progress=False)
                 for s in sites]
    for s, sd in zip(sites, site_data, strict=True):
        mix = Counter(sd.labels["label"])
        print(f"  {s.name}: {len(sd)} images, label mix {dict(sorted(mix.items()))} (labels unused in pretraining)")
    budget = args.rounds * args.local_steps * len(sites)
    print(f"budget: {args.rounds} rounds x {args.local_steps} steps x 3 sites = {budget} steps of batch "
          f"{args.batch_size}, {args.model} at {args.image_size}px", flush=True)

    arms = [random_arm(args.model, args.image_size, seed=args.seed + 99)]
    print("pretraining: single site (hospital-0)", flush=True)
    arms.append(Arm("single-site", pretrain_local(site_data[0], args, budget, args.seed), args.image_size))
    print("pretraining: centralised (all 3 hospitals pooled)", flush=True)
    arms.append(Arm("centralised", pretrain_local(pool(site_data), args, budget, args.seed), args.image_size))
    print("pretraining: federated (Flower SuperLink + 3 SuperNodes)", flush=True)
    t0 = time.time()
    run_dir = pretrain_federated(sites, args, work)
    print(f"    {args.rounds} rounds in {time.time() - t0:.0f}s -> {run_dir / 'global.safetensors'}", flush=True)
    arms.append(Arm("federated", load_backbone(args.model, run_dir / "global.safetensors").eval(), args.image_size))

    data = load_npz(src, args.image_size)
    train_idx, test_idx = data.split["train"], data.split["test"]
    fractions = [0.01, 0.1, 1.0]
    rows = []
    for mode in ("linear", "full"):
        print(f"fine-tuning: {mode}", flush=True)
        rows += run_experiment(arms, data, train_idx, test_idx, fractions, mode, args.seeds, args.epochs,
                               device="cpu", log=lambda m: print(m, flush=True))
    seconds = time.time() - t_start
    arms_info = (f"{args.model} {args.image_size}px, SimCLR, {budget} steps x batch {args.batch_size} per arm "
                 f"(federated: {args.rounds} rounds x {args.local_steps} local steps x 3 sites, FedAvg); "
                 f"full fine-tune {args.epochs} epochs; {args.seeds} label-subsample seed(s)")
    meta = {"data": str(src), "split": "official train/test", "arms": arms_info, "machine": machine(),
            "minutes": round(seconds / 60, 1)}
    table = write_outputs(Path(args.out), rows, meta, "PneumoniaMNIST label efficiency")
    print("\n" + table)
    print(f"plot {Path(args.out) / 'auc_vs_fraction.png'}; total {seconds / 60:.1f} min")
    if not args.no_record:
        append_results(rows, args, raw, seconds, arms_info)
        print(f"appended to {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
