"""Cost of privacy: SecAgg+ and DP round time vs plain on real Flower processes, and DP-SGD step throughput.

    .venv/bin/python benchmarks/bench_privacy.py [--model resnet18] [--image-size 64] [--steps 4] [--rounds 2]
        [--skip-federation | --skip-dp-sgd] [--dp-steps 6] [--dp-modes hooks,ew,functorch,ghost]

1. One consortium (SuperLink + 3 SuperNodes on loopback, synthetic DICOM sites); the same run three times:
   plain, `secagg=true`, `dp=client`. Round time = the ServerApp's per-round wall time in metrics.jsonl
   (train + evaluate, incl. Flower's process start per message); the last round of each run is compared.
2. Local training throughput of the shipping trainer with sample-level DP-SGD (dp = "sample": opacus,
   per-image clipping + noise, simsiam, the GroupNorm model) vs the same trainer and model without DP, for
   each per-image gradient mode (`--dp-modes`), back to back in one process.
Ratios are recorded as rows in benchmarks/results/privacy.jsonl (`common_bench.record_row`).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common_bench import bench_command, machine, record_row  # noqa: E402

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def round_times(args) -> dict[str, float]:
    from federation_harness import Consortium

    from fedrad.deploy.synthetic import write_synthetic_sites
    from fedrad.server.run_log import read_metrics

    root = Path(tempfile.mkdtemp(prefix="fedrad-bench-privacy-"))
    sites = write_synthetic_sites(root / "sites", n_sites=3, patients_per_site=10, images_per_patient=(1, 3),
                                  size=args.image_size, seed=3)
    c = Consortium(root)
    out: dict[str, float] = {}
    try:
        c.start_link()
        for i, site in enumerate(sites):
            c.start_node(f"s{i}", site)
        base = {"model": args.model, "image-size": args.image_size, "local-steps": args.steps, "batch-size": 16,
                "proj-dim": 128, "objective": "simclr", "num-server-rounds": args.rounds, "min-train-nodes": 3,
                "min-available-nodes": 3, "round-timeout": 600.0}
        modes = {"plain": {}, "secagg": {"secagg": True}, "dp-client": {"dp": "client", "dp-noise": 1.0,
                                                                        "dp-clip": 1.0}}
        for name, extra in modes.items():
            run_dir = root / name
            t0 = time.time()
            code = c.run(dict(base, **extra, **{"run-dir": str(run_dir)}), timeout=1800)
            rows = read_metrics(run_dir)
            if code != 0 or len(rows) != args.rounds:
                raise RuntimeError(f"{name} run failed (code {code}); logs in {root / 'logs'}")
            out[name] = float(rows[-1]["round_seconds"])
            print(f"{name}: round times {[r['round_seconds'] for r in rows]} (run {time.time() - t0:.0f}s)", flush=True)
    finally:
        c.stop()
    return out


def dp_sgd_throughput(args) -> dict[str, tuple[float, float, str]]:
    """Images/s of the shipping trainer (`train_local`, simsiam, the GroupNorm model of dp=sample) without and
    with `dp=SampleDP(...)` (opacus per-image gradients, clipping, noise, Poisson batches, accounting), once per
    per-image gradient mode in `--dp-modes`, back to back in this process: {name: (wall img/s, CPU img/s,
    the 1-minute load average before -> after)}. CPU img/s divides by this process's CPU time, which a machine
    shared with other jobs inflates less."""
    import torch
    from fake_site import make_fake_site

    from fedrad.client.training.sample_dp import SampleDP
    from fedrad.client.training.trainer import TrainConfig, train_local
    from fedrad.common.models import build_model

    data = make_fake_site(n=args.dp_images, size=args.image_size)
    cfg = TrainConfig(objective="simsiam", steps=args.dp_steps, batch_size=32, device=args.device)

    def rate(name: str, dp) -> tuple[float, float, str]:
        torch.manual_seed(0)
        model = build_model(args.model, "simsiam", args.image_size, proj_dim=128, norm="group")
        train_local(model, data, TrainConfig(objective="simsiam", steps=1, batch_size=32, device=args.device),
                    progress=False, dp=dp)  # warm-up (allocator, opacus hooks)
        load0, cpu0 = os.getloadavg()[0], time.process_time()
        res = train_local(model, data, cfg, progress=False, dp=dp)
        cpu = time.process_time() - cpu0
        load = f"load {load0:.1f} -> {os.getloadavg()[0]:.1f}"
        print(f"{name}: {res.examples} images in {res.seconds:.1f}s wall, {cpu:.1f}s CPU, {load}", flush=True)
        return res.examples / res.seconds, res.examples / cpu, load

    out = {"no DP": rate("no DP", None)}
    for mode in args.dp_modes.split(","):
        out[mode] = rate(f"DP-SGD {mode}", SampleDP(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5,
                                                    grad_sample_mode=mode))
    out["no DP, again"] = rate("no DP, again", None)  # the machine's drift over the run
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dp-steps", type=int, default=6)
    ap.add_argument("--dp-images", type=int, default=400, help="images of the in-memory site for DP-SGD")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dp-modes", default="hooks,ew,functorch,ghost",
                    help="per-image gradient modes to measure (client.training.sample_dp.GRAD_SAMPLE_MODES), "
                         "comma-separated")
    ap.add_argument("--skip-federation", action="store_true")
    ap.add_argument("--skip-dp-sgd", action="store_true", help="only the federated round-time ratios")
    args = ap.parse_args()
    import torch

    lines = []
    if not args.skip_federation:
        t = round_times(args)
        lines.append(f"- SecAgg+ / plain round time: **{t['secagg'] / t['plain']:.2f}x** "
                     f"({t['secagg']:.1f}s vs {t['plain']:.1f}s; issue 13 goal <= 1.30x)")
        lines.append(f"- dp=client / plain round time: **{t['dp-client'] / t['plain']:.2f}x** "
                     f"({t['dp-client']:.1f}s vs {t['plain']:.1f}s)")
    if not args.skip_dp_sgd:
        rates = dp_sgd_throughput(args)
        # no DP runs before and after the DP modes: their mean is the reference (a shared machine drifts)
        plain = tuple((a + b) / 2 for a, b in zip(rates["no DP"][:2], rates["no DP, again"][:2], strict=True))
        for mode in args.dp_modes.split(","):
            private = rates[mode]
            lines.append(f"- DP-SGD (`train_local(..., dp=SampleDP(grad_sample_mode='{mode}'))`: opacus, "
                         f"simsiam, GroupNorm {args.model}, {args.image_size} px, expected batch 32, {args.dp_steps} "
                         f"steps) / the same trainer without DP: **{private[0] / plain[0]:.2f}x** wall "
                         f"({private[0]:.1f} vs {plain[0]:.1f} images/s), {private[1] / plain[1]:.2f}x by CPU time; "
                         f"{private[2]}")
        lines.append(f"- no DP before / after the DP runs: {rates['no DP'][0]:.1f} / "
                     f"{rates['no DP, again'][0]:.1f} images/s wall ({rates['no DP'][2]} / {rates['no DP, again'][2]}; "
                     f"the ratios use their mean) on {os.cpu_count()} threads")
    where = ("3 SuperNodes on loopback; round time = last round's train+evaluate wall time, incl. Flower's "
             "process start per message") if not args.skip_federation else "DP-SGD throughput only"
    print(f"Machine: {machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}\n"
          f"Command: {bench_command(__file__)} ({where})\n\n" + "\n".join(lines))
    ctx = {"command": bench_command(__file__), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
           "model": args.model, "image_size": args.image_size, "setting": where}
    if not args.skip_federation:
        record_row("privacy", "SecAgg+ / plain round time", round(t["secagg"] / t["plain"], 2), "x", goal="<= 1.30x",
                   met=t["secagg"] / t["plain"] <= 1.30, note=f"{t['secagg']:.1f}s vs {t['plain']:.1f}s",
                   local_steps=args.steps, rounds=args.rounds, **ctx)
        record_row("privacy", "dp=client / plain round time", round(t["dp-client"] / t["plain"], 2), "x",
                   note=f"{t['dp-client']:.1f}s vs {t['plain']:.1f}s", local_steps=args.steps, rounds=args.rounds,
                   **ctx)
    if not args.skip_dp_sgd:
        for mode in args.dp_modes.split(","):
            private = rates[mode]
            ratio = private[0] / plain[0]
            record_row("privacy", f"DP-SGD / no-DP training throughput ({mode})", round(ratio, 2), "x",
                       goal=">= 0.40x", met=ratio >= 0.40,
                       note=f"{private[0]:.1f} vs {plain[0]:.1f} images/s wall; {private[1] / plain[1]:.2f}x by CPU "
                            f"time; {private[2]}", dp_steps=args.dp_steps, **ctx)
        record_row("privacy", "no-DP throughput (before / after the DP runs)", round(rates["no DP"][0], 1), "images/s",
                   note=f"after: {rates['no DP, again'][0]:.1f} images/s; {rates['no DP'][2]} / "
                        f"{rates['no DP, again'][2]}", dp_steps=args.dp_steps, **ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
