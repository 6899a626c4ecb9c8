"""`fedrad finetune`: verify the bundle, load the labelled set, split by patient, fit, write the results."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedrad.client.evaluation.data import load_data
from fedrad.client.evaluation.metrics import N_BOOTSTRAP
from fedrad.client.evaluation.splits import holdout_split
from fedrad.client.tools.finetune.experiment import Arm, random_arm, run_experiment
from fedrad.client.tools.finetune.report import write_outputs


def _parse_fractions(text: str) -> list[float]:
    fr = sorted({float(x) for x in text.split(",") if x.strip()})
    if not fr or any(not 0 < f <= 1 for f in fr):
        raise ValueError(f"--fractions must be numbers in (0, 1], got {text!r}")
    return fr


def cmd_finetune(args: argparse.Namespace) -> int:
    """Verify, load data, split by patient, fit per fraction and seed, write the tables and the plot."""
    from fedrad.client.site.release_store import bundle_from_args
    from fedrad.client.tools.model_source import load_model_source
    from fedrad.client.training.trainer import resolve_device
    from fedrad.common.bundle import BundleVerificationError, policy_from_args

    fractions = _parse_fractions(args.fractions)
    if args.seeds < 1 or args.epochs < 1:
        raise ValueError("--seeds and --epochs must be >= 1")
    dp = (float(args.dp_epsilon), float(args.dp_delta)) if args.dp_epsilon is not None else None
    if dp is not None and (dp[0] <= 0 or not 0 < dp[1] < 1):
        raise ValueError("--dp-epsilon must be > 0 and --dp-delta in (0, 1)")
    args.bundle = bundle_from_args(args)  # BUNDLE, or --release latest|ID from the site's store
    if not args.insecure and not args.pubkey:
        print("fedrad finetune: error: pass --pubkey to verify the bundle (or --insecure to skip)", file=sys.stderr)
        return 2
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out {args.out}: exists and is not a folder")
    policy = policy_from_args(args)  # applies to BUNDLE; --compare is a reference arm, often an older release
    try:
        backbone, manifest = load_model_source(args.bundle, args.pubkey, args.insecure, policy)
        arms = [Arm("pretrained", backbone, manifest.get("input_size"))]
        if args.compare:
            other, m2 = load_model_source(args.compare, args.pubkey, args.insecure)
            arms.append(Arm(f"compare:{Path(args.compare).name}", other, m2.get("input_size")))
    except BundleVerificationError as exc:
        print(f"fedrad finetune: bundle verification FAILED: {exc}", file=sys.stderr)
        return 1
    if not args.insecure:
        print(f"fedrad finetune: bundle {args.bundle} verified", file=sys.stderr)
    size = int(manifest.get("input_size") or 64)
    arms.insert(1, random_arm(manifest["model"], manifest.get("input_size"),
                                norm=manifest.get("norm", "batch")))
    targets = [t.strip() for t in args.target.split(",")] if args.target else None
    data = load_data(args.data, size, args.labels, targets)
    if getattr(args, "test_data", None):  # REMEDIS's out-of-distribution setting: train here, test there
        from fedrad.client.tools.finetune.ood import combine_for_ood

        other = load_data(args.test_data, size, args.test_labels, targets)
        data, train_idx, test_idx, split_kind = combine_for_ood(data, other)
    else:
        train_idx, test_idx, split_kind = holdout_split(data)
    device = str(resolve_device(args.device))
    print(f"fedrad finetune: {len(data)} images, targets {data.targets}, split {split_kind} "
          f"({len(train_idx)} train / {len(test_idx)} test), mode {args.mode} on {device}", file=sys.stderr)
    rows = run_experiment(arms, data, train_idx, test_idx, fractions, args.mode, args.seeds, args.epochs, dp,
                          device, log=lambda m: print(m, file=sys.stderr))
    meta = {"bundle": str(args.bundle), "verified": not args.insecure, "model": manifest.get("model"),
            "input_size": size, "data": str(args.data), "test_data": getattr(args, "test_data", None),
            "targets": data.targets, "split": split_kind,
            "mode": args.mode, "seeds": args.seeds, "epochs": args.epochs,
            "dp": f"epsilon={dp[0]}, delta={dp[1]}" if dp else "none",
            "ci": f"95% percentile bootstrap over test patients ({N_BOOTSTRAP} resamples)"}
    table = write_outputs(Path(args.out), rows, meta, f"fine-tuning {manifest.get('model')} ({args.mode})")
    print(table)
    print(f"fedrad finetune: results in {Path(args.out) / 'results.md'}, plot {Path(args.out) / 'auc_vs_fraction.png'}")
    return 0


__all__ = ["cmd_finetune"]
