"""Cost of privacy: SecAgg+ and DP round time vs plain on real Flower processes, and DP-SGD step throughput.

    .venv/bin/python benchmarks/bench_privacy.py [--model resnet18] [--image-size 64] [--steps 4] [--rounds 2]

1. One consortium (SuperLink + 3 SuperNodes on loopback, synthetic DICOM sites); the same run three times:
   plain, `secagg=true`, `dp=client`. Round time = the ServerApp's per-round wall time in metrics.jsonl
   (train + evaluate, incl. Flower's process start per message); the last round of each run is compared.
2. Local training throughput with sample-level DP-SGD (opacus, per-sample clipping + noise, simsiam, the
   model with BatchNorm replaced by GroupNorm as opacus requires) vs the same model without DP.
Ratios are appended to benchmarks/RESULTS.md with the machine and the command.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

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


def dp_sgd_throughput(args) -> tuple[float, float]:
    """Images/s of simsiam steps without and with opacus DP-SGD on the same GroupNorm model."""
    import torch
    from fedrad.common.losses.simsiam import simsiam_loss
    from fedrad.common.models import build_model
    from opacus import PrivacyEngine
    from opacus.validators import ModuleValidator

    torch.manual_seed(0)
    batch, steps = 32, args.dp_steps
    x1 = torch.rand(batch * steps, 1, args.image_size, args.image_size)
    x2 = torch.rand_like(x1)

    class CloneOut(torch.nn.Module):
        """timm's ResNet adds the shortcut in place onto the norm output, which opacus's hooks forbid."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x).clone()

    def fresh():
        model = ModuleValidator.fix(build_model(args.model, "simsiam", args.image_size, proj_dim=128))
        for m in list(model.modules()):
            if isinstance(m, torch.nn.ReLU):
                m.inplace = False
            for name, child in list(m.named_children()):
                if isinstance(child, torch.nn.GroupNorm):
                    setattr(m, name, CloneOut(child))
        return model

    def step_loss(model, a, b):
        z1, z2 = model(a), model(b)
        p1, p2 = model.predictor(z1), model.predictor(z2)
        return simsiam_loss(p1, p2, z1, z2)

    def run(model, opt, loader_batches) -> float:
        model.train()
        for i, (a, b) in enumerate(loader_batches):
            if i == 1:
                t0 = time.perf_counter()  # first step is warm-up
            opt.zero_grad()
            step_loss(model, a, b).backward()
            opt.step()
        return batch * (len(loader_batches) - 1) / (time.perf_counter() - t0)

    batches = [(x1[i * batch:(i + 1) * batch], x2[i * batch:(i + 1) * batch]) for i in range(steps)]
    model = fresh()
    plain = run(model, torch.optim.SGD(model.parameters(), lr=0.01), batches)
    model = fresh()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    data = torch.utils.data.TensorDataset(x1, x2)
    loader = torch.utils.data.DataLoader(data, batch_size=batch)
    model, opt, loader = PrivacyEngine().make_private(module=model, optimizer=opt, data_loader=loader,
                                                      noise_multiplier=1.0, max_grad_norm=1.0,
                                                      poisson_sampling=False, grad_sample_mode=args.grad_sample_mode)
    private = run(model, opt, batches)
    return plain, private


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dp-steps", type=int, default=6)
    ap.add_argument("--skip-federation", action="store_true")
    ap.add_argument("--grad-sample-mode", default="hooks",
                    help="opacus per-sample gradient mode")
    args = ap.parse_args()
    import torch

    lines = []
    if not args.skip_federation:
        t = round_times(args)
        lines.append(f"- SecAgg+ / plain round time: **{t['secagg'] / t['plain']:.2f}x** "
                     f"({t['secagg']:.1f}s vs {t['plain']:.1f}s; goal <= 1.5x)")
        lines.append(f"- dp=client / plain round time: **{t['dp-client'] / t['plain']:.2f}x** "
                     f"({t['dp-client']:.1f}s vs {t['plain']:.1f}s)")
    plain, private = dp_sgd_throughput(args)
    lines.append(f"- DP-SGD (opacus, simsiam, GroupNorm {args.model}, batch 32) / no-DP training throughput: "
                 f"**{private / plain:.2f}x** ({private:.1f} vs {plain:.1f} images/s)")
    cpu = os.cpu_count()
    header = (f"\n## Privacy cost ({time.strftime('%Y-%m-%d')})\n\n"
              f"Machine: {platform.machine()}, {cpu} CPU threads visible, torch {torch.__version__} "
              f"({'CUDA' if torch.cuda.is_available() else 'CPU only'}); the CPU was shared with other jobs, so "
              f"treat absolute times as rough.\n"
              f"Command: `.venv/bin/python benchmarks/bench_privacy.py --model {args.model} --image-size "
              f"{args.image_size} --steps {args.steps} --rounds {args.rounds}` (3 SuperNodes on loopback; round time "
              f"= last round's train+evaluate wall time, incl. Flower's process start per message)\n\n")
    text = header + "\n".join(lines) + "\n"
    print(text)
    results = Path(__file__).resolve().parent / "RESULTS.md"
    with open(results, "a", encoding="utf-8") as fh:
        fh.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
