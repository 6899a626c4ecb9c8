"""The demo's recipe, ablated: which augmentation settings make the demo's pretraining beat random init.

Runs the demo's federated recipe without Flower processes, so many settings fit in one sitting: the demo's
three synthetic hospitals (`fedrad.deploy.synthetic`, the demo's patient counts), the demo's model and
run config (`fedrad.deploy.demo.DEMO_CONFIG`), each round every site runs `train_local` from the global
weights (the seeds the sites use) and the weights are averaged by example count (FedAvg). Then the demo's
own fine-tuning step: a linear probe on frozen features at several label fractions, pooled sites, patient
split, 5 label-subsample seeds, pretrained vs random init.

    python benchmarks/bench_demo_recipe.py                          # the demo's recipe, 3 seeds
    python benchmarks/bench_demo_recipe.py --crop-min 0.4 0.8 --seeds 0 1 2
    python benchmarks/bench_demo_recipe.py --patients 60 --local-steps 50 --crop-min 0.4 0.8 --data-seed 1
        # the recipe of the first demo_recipe rows (the demo's before it grew)

Rows per (setting, seed) go to benchmarks/results/demo_recipe.jsonl. Training took 173-203 s per
row at 60 patients and 50 local steps on 2 cores at load 3-9 (one thread, as each demo site); the probe adds
about a minute.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common_bench import fedavg_in_process, record_row  # noqa: E402

FRACTIONS = [0.1, 0.25, 0.5, 1.0]


def fedavg_pretrain(sites: list, run: dict, rounds: int, seed: int):
    """The demo's run in one process: per round, each site trains from the global weights; example-weighted mean."""
    import torch

    from fedrad.client.training.trainer import TrainConfig, evaluate_local
    from fedrad.common.models import build_model
    from fedrad.common.run_config import RunConfig

    recipe = RunConfig.from_flower({**run, "objective": "simclr", "label-fields": ""})  # the demo's recipe, SimCLR
    torch.manual_seed(seed)
    model = build_model(recipe.model, recipe.objective, recipe.image_size, proj_dim=recipe.proj_dim)

    def config(**kw) -> TrainConfig:
        return TrainConfig.from_recipe(recipe, device="cpu", **kw)

    held: list[float] = []

    def held_out(rnd: int) -> None:
        held.append(float(np.mean([evaluate_local(model, d, config(steps=1))["eval_loss"] for d in sites])))

    fedavg_in_process(model, sites, rounds, lambda rnd: config(steps=recipe.local_steps), seed, held_out)
    return model, held


def main() -> int:
    import torch

    from fedrad.client.site.site_data import load_site
    from fedrad.client.tools.finetune import Arm, patient_split, random_arm, run_experiment
    from fedrad.deploy.demo import DEMO_CONFIG, DEMO_IMAGES_PER_PATIENT, DEMO_PATIENTS_PER_SITE, pooled_sites
    from fedrad.deploy.synthetic import write_synthetic_sites

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--crop-min", type=float, nargs="+", default=[float(DEMO_CONFIG.get("aug-crop-min", 0.4))])
    ap.add_argument("--blur-p", type=float, nargs="+", default=[0.5])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="pretraining seeds")
    ap.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic sites")
    ap.add_argument("--patients", type=int, default=DEMO_PATIENTS_PER_SITE, help="patients per synthetic site")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--local-steps", type=int, default=int(DEMO_CONFIG["local-steps"]))
    ap.add_argument("--work", default="/tmp/fedrad-bench-demo-recipe", help="synthetic sites and caches")
    ap.add_argument("--no-record", action="store_true", help="print only; record no rows")
    args = ap.parse_args()
    torch.set_num_threads(1)  # as each of the demo's sites runs on 2 cores

    root = Path(args.work) / f"data-{args.data_seed}-p{args.patients}"
    if not (root / "done").exists():
        write_synthetic_sites(root, n_sites=3, patients_per_site=args.patients,
                              images_per_patient=DEMO_IMAGES_PER_PATIENT, seed=args.data_seed)
        (root / "done").touch()
    names = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("site-"))
    size = int(DEMO_CONFIG["image-size"])
    sites = [load_site(p, size, cache_dir=Path(args.work) / "cache" / root.name / p.name, progress=False)
             for p in names]
    data = pooled_sites(names, size, Path(args.work) / "ft" / root.name)
    train_idx, test_idx = patient_split(data.groups, data.y, seed=0)
    baseline = random_arm(str(DEMO_CONFIG["model"]), size)
    command = "python benchmarks/bench_demo_recipe.py " + shlex.join(sys.argv[1:])
    print(f"{len(data)} labelled images, {len(test_idx)} test images; gaps are pretrained - random-init AUC")
    for crop in args.crop_min:
        for blur in args.blur_p:
            for seed in args.seeds:
                run = dict(DEMO_CONFIG, **{"aug-crop-min": crop, "aug-blur-p": blur, "local-steps": args.local_steps})
                t0 = time.perf_counter()
                model, held = fedavg_pretrain(sites, run, args.rounds, seed)
                seconds = time.perf_counter() - t0
                rows = run_experiment([Arm("pretrained", model.backbone.eval(), size), baseline], data, train_idx,
                                      test_idx, FRACTIONS, "linear", seeds=5)
                auc = {(r["backbone"], r["fraction"]): r["auc"] for r in rows}
                gaps = [auc[("pretrained", f)] - auc[("random-init", f)] for f in FRACTIONS]
                line = (f"crop-min {crop:.2f} blur-p {blur:.2f} seed {seed}: "
                        f"held-out {held[0]:.3f} -> {held[-1]:.3f}; "
                        + ", ".join(f"{f:.0%} {auc[('pretrained', f)]:.3f} vs {auc[('random-init', f)]:.3f} "
                                    f"({g:+.3f})" for f, g in zip(FRACTIONS, gaps, strict=True)) + f"; {seconds:.0f}s")
                print(line, flush=True)
                if not args.no_record:
                    ctx = {"command": command, "aug-crop-min": crop, "aug-blur-p": blur, "pretraining seed": seed,
                           "data seed": args.data_seed, "patients_per_site": args.patients,
                           "schedule": f"{args.rounds} x {args.local_steps} steps", "pretrain_s": round(seconds)}
                    record_row("demo_recipe", "held-out loss r1 -> r4", round(held[0], 3), "loss",
                               text=f"{held[0]:.3f} -> {held[-1]:.3f}", **ctx)
                    for f, g in zip(FRACTIONS, gaps, strict=True):
                        record_row("demo_recipe", f"gap {f * 100:.0f} %", round(g, 3), "AUC gap",
                                   goal=">= 0 (pretrained >= random init)", met=g >= 0, **ctx)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
