"""`fedrad demo`: a real local consortium on this machine, with no data of the user's.

Three synthetic hospitals are written as real DICOM files, scanned, and joined to one real Flower
SuperLink as three real SuperNodes on loopback; a few rounds of contrastive pretraining run; the
foundation weights are released, signed, published to the sites over Flower (each verifies and stores its
copy), and fine-tuned from the copy a site received on the sites' small labelled sets.
Every process started here is stopped at the end, on Ctrl-C and on failure.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from fedrad.client.runtime.site_runtime import SiteTrust
from fedrad.deploy.processes import ProcessGroup, free_port, superlink_command, supernode_command, wait_for_port
from fedrad.deploy.run_command import parse_overrides, report_run, submit_run

# Sized to finish inside 6 minutes on 2 CPU cores (a round's fixed cost is Flower starting each site's
# ClientApp process). timm's tiny ResNet (0.37M parameters) so that enough optimizer steps fit: 4 rounds x 100
# local steps lower the held-out loss by about half; `-c model=resnet18` for a real backbone (about 10x slower).
# SimCLR at temperature 0.2: learns fastest here; the features it learns ignore what the augmentations vary
# (pose, exposure, noise), which is what the random-init baseline is distracted by. Crops keep >= 80 % of the
# film: the finding is a few local opacities, and with the default 40 % crops one view often loses them, so
# SimCLR learns to ignore them and the probe falls below random init (benchmarks/RESULTS.md, "demo_recipe").
# 100 patients per site and 10 label subsamples: with 60 patients, 50 steps and 5 subsamples the 25 % row (31
# training patients, 54 test patients) swung by +-0.08 AUC between runs and once put random init ahead.
DEMO_CONFIG: dict[str, object] = {
    "model": "test_resnet",
    "image-size": 64,
    "proj-dim": 64,
    "local-steps": 100,
    "batch-size": 32,
    "lr": 0.003,
    "temperature": 0.2,
    "aug-crop-min": 0.8,
    "min-train-nodes": 3,
    "min-available-nodes": 3,
    "round-timeout": 300.0,
}
DEMO_PATIENTS_PER_SITE = 100
DEMO_IMAGES_PER_PATIENT = (2, 4)
DEMO_FRACTIONS = [0.25, 0.5, 1.0]
DEMO_SEEDS = 10  # label subsamples per fraction (cheap: linear probes on features embedded once)


def _step(msg: str) -> None:
    print(f"\n== fedrad demo: {msg}", flush=True)


def _raise_keyboard_interrupt(signum, _frame):
    raise KeyboardInterrupt


def demo_main(*, workdir: str | os.PathLike[str] = "fedrad-demo", rounds: int = 4, objective: str = "simclr",
              secure: bool = False, config: list[str] | None = None) -> int:
    """`fedrad demo`: the local consortium under `workdir` (sites, keys, logs, run, release); `config` holds
    `-c KEY=VALUE` overrides of DEMO_CONFIG. Returns the exit status (0: every step finished)."""
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    t_start = time.time()
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)

    _step("writing 3 synthetic hospital sites as DICOM files")
    from fedrad.deploy.synthetic import write_synthetic_sites

    sites = write_synthetic_sites(workdir / "sites", n_sites=3, patients_per_site=DEMO_PATIENTS_PER_SITE,
                                  images_per_patient=DEMO_IMAGES_PER_PATIENT, seed=0,
                                  volumes=True)  # + a CT series, an enhanced MR and a US cine per site
    _step("scanning each site (what its IT would check first; nothing is sent)")
    from fedrad.client.site.scan import scan_folder

    for site in sites:
        rep = scan_folder(site, decode=True, progress=False)
        print(f"  {site.name}: {rep['usable']} usable images, {rep['patients']} patients, "
              f"{len(rep['skipped'])} skipped", flush=True)

    run_dir = workdir / "run"
    overrides = dict(DEMO_CONFIG)
    overrides.update({"num-server-rounds": rounds, "objective": objective, "run-dir": str(run_dir)})
    overrides.update(parse_overrides(list(config or [])))

    _step("making the consortium signing key (the sites run only what it signed)")
    from fedrad.server.release import generate_keys

    consortium_key, consortium_pub = generate_keys(workdir / "keys" / "consortium")
    trust = SiteTrust(consortium_key=consortium_pub)

    tls = None
    if secure:
        _step("making a consortium CA, coordinator certificate and site keys (TLS + node authentication)")
        from fedrad.deploy.certs import init_certs, tls_files

        certs_dir = workdir / "certs"
        if not (certs_dir / "ca.pem").exists():  # a second demo in this folder keeps its consortium
            init_certs(certs_dir, [s.name for s in sites], ["localhost", "127.0.0.1", "::1"])
        tls = tls_files(certs_dir, None)

    with ProcessGroup() as group:
        port = free_port()
        address = f"127.0.0.1:{port}"
        _step(f"starting the coordinator (Flower SuperLink) on {address}")
        link = group.start("superlink", superlink_command(workdir / "coordinator", "127.0.0.1", port, tls,
                                                          node_auth=tls is not None),
                           workdir / "logs" / "superlink.log")
        (workdir / "coordinator").mkdir(exist_ok=True)
        wait_for_port("127.0.0.1", port, 60, link)
        if tls is not None:
            from fedrad.deploy.certs import register_node, tls_files

            for site in sites:
                register_node(tls_files(workdir / "certs", site.name).node_public_key, address,
                              workdir / "certs")
        _step("starting 3 site nodes (Flower SuperNodes), one per hospital")
        threads = max(1, (os.cpu_count() or 1) // len(sites))  # the sites share this machine's cores
        for site in sites:
            node_tls = None
            if tls is not None:
                from fedrad.deploy.certs import tls_files

                node_tls = tls_files(workdir / "certs", site.name)
            cfg = {"data-dir": str(site), "cache-dir": str(workdir / "cache" / site.name), "device": "cpu",
                   "threads": threads,
                   "audit-dir": str(workdir / "audit" / site.name), "state-dir": str(workdir / "state" / site.name)}
            group.start(f"node-{site.name}", supernode_command(address, free_port(), cfg, node_tls, trust),
                        workdir / "logs" / f"node-{site.name}.log")
        _step(f"running {rounds} rounds of {objective} pretraining, signed (progress below)")
        code = submit_run(address, overrides, log_path=workdir / "logs" / "flwr-run.log",
                          ca_cert=tls.ca_cert if tls else None, sign_key=consortium_key)
        status = report_run(run_dir, code)
        if status != 0:
            print(f"fedrad demo: failed; logs in {workdir / 'logs'}")
            return status
        _print_summary(run_dir)
        status = _release_and_publish(workdir, run_dir, address, consortium_key, tls.ca_cert if tls else None)
    if status == 0:
        status = _finetune_received(workdir, sites, consortium_pub)
    print(f"\nfedrad demo: done in {time.time() - t_start:.0f}s. Everything is under {workdir}.")
    return status


def _print_summary(run_dir: Path) -> None:
    from fedrad.server.run_log import read_metrics

    rows = read_metrics(run_dir)
    _step("federated pretraining summary")
    print(f"  {'round':>5} {'sites':>5} {'train loss':>10} {'held-out':>9}  per-site train loss")
    for r in rows:
        per_site = ", ".join(f"{v.get('train_loss', float('nan')):.3f}" for _, v in sorted(r["sites"].items()))
        print(f"  {r['round']:>5} {r['sites_aggregated']:>5} {r.get('train_loss', float('nan')):>10.4f} "
              f"{r.get('eval_loss', float('nan')):>9.4f}  {per_site}")
    held = [r["eval_loss"] for r in rows if r.get("eval_loss") is not None]
    if len(held) >= 2:
        print(f"  held-out contrastive loss (patients no round trained on): {held[0]:.4f} after round 1 -> "
              f"{held[-1]:.4f} after round {len(held)} ({(held[-1] - held[0]) / held[0]:+.0%})")
    print(f"  checkpoints: {run_dir / 'checkpoints'}\n  metrics:     {run_dir / 'metrics.jsonl'}\n"
          f"  plot:        {run_dir / 'plots' / 'loss.png'}\n  weights:     {run_dir / 'global.safetensors'}")


def _release_and_publish(workdir: Path, run_dir: Path, address: str, key: Path, ca_cert: Path | None) -> int:
    """Release a signed bundle and publish it to the running sites over Flower (each verifies and stores it)."""
    from fedrad.deploy.publish_command import publish_bundle
    from fedrad.server.release import release_bundle

    _step("releasing the foundation weights as a signed bundle and publishing it to the sites")
    bundle = release_bundle(run_dir, key, workdir / "release")
    code, answers = publish_bundle(bundle, workdir / "coordinator" / "releases", address, key, ca_cert,
                                   timeout=600)
    print(f"  bundle {bundle}: " + ", ".join(f"{n} site(s) {name}" for name, n in sorted(answers.items())))
    if code != 0 or answers.get("STORED", 0) != 3:
        print(f"fedrad demo: publishing failed; logs in {workdir / 'logs'}")
        return 1
    return 0


def _finetune_received(workdir: Path, sites: list[Path], pub: Path) -> int:
    """Fine-tune from the copies the sites received (each verified again with the site's consortium.pub)."""
    from fedrad.client.site.release_store import resolve_release
    from fedrad.common.bundle import verify_bundle

    _step("each site verifies the copy it received (fedrad releases; --release latest)")
    copies = [resolve_release(workdir / "state" / site.name, "latest") for site in sites]
    hashes = {verify_bundle(copy, pub)["weights"]["sha256"] for copy in copies}
    for copy in copies:
        print(f"  {copy} verified with {pub}")
    if len(hashes) != 1:
        print("fedrad demo: the sites hold different weights")
        return 1
    _step("fine-tuning on the sites' small labelled sets, from the received release: pretrained vs random init")
    print(demo_finetune(copies[0], pub, sites, workdir / "finetune"))
    return 0


def demo_finetune(bundle: str | Path, pubkey: str | Path, sites: list[Path], out_dir: str | Path) -> str:
    """End of `fedrad demo`: pooled sites' `finding` labels, patient split, linear probe at DEMO_FRACTIONS.

    Patients are namespaced by site (keys are salted per site). Returns the printed table, followed by one
    line for each label fraction where pretrained did not beat random init, saying why.
    """
    import numpy as np
    import torch

    from fedrad.client.tools.finetune import Arm, patient_split, random_arm, run_experiment, write_outputs
    from fedrad.common.bundle import load_verified_backbone

    torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))
    backbone, manifest = load_verified_backbone(bundle, pubkey)
    size = int(manifest.get("input_size") or 64)
    out = Path(out_dir)
    data = pooled_sites(sites, size, out / ".cache")
    train_idx, test_idx = patient_split(data.groups, data.y, seed=0)
    arms = [Arm("pretrained", backbone, size), random_arm(manifest["model"], size, norm=manifest.get("norm", "batch"))]
    rows = run_experiment(arms, data, train_idx, test_idx, DEMO_FRACTIONS, "linear", seeds=DEMO_SEEDS)
    meta = {"bundle": str(bundle), "sites": len(sites), "images": len(data), "test_images": len(test_idx),
            "split": "patient-level, pooled sites", "mode": "linear", "seeds": DEMO_SEEDS}
    table = write_outputs(out, rows, meta, "demo fine-tuning (synthetic 'finding')")
    notes = "".join(f"  {line}\n" for line in verdicts(rows))
    return (f"{len(data)} labelled images from {len(sites)} sites; {len(test_idx)} test images "
            f"({len(np.unique(data.groups[test_idx]))} held-out patients)\n" + table + notes)


def pooled_sites(sites: list[Path], size: int, cache_dir: str | Path):
    """The sites' labelled images (`finding`) as one LabelledSet; patient ids namespaced by site (each site's
    keys are salted on their own, so two sites' ids could collide)."""
    import numpy as np

    from fedrad.client.tools.finetune import LabelledSet, load_folder

    parts = []
    for i, site in enumerate(sites):
        part = load_folder(site, size, targets=["finding"], cache_dir=Path(cache_dir) / Path(site).name)
        part.groups = part.groups + i * 1_000_000
        parts.append(part)
    return LabelledSet(images=np.concatenate([p.images for p in parts]), y=np.concatenate([p.y for p in parts]),
                       targets=parts[0].targets, groups=np.concatenate([p.groups for p in parts]),
                       source=", ".join(str(s) for s in sites))


def verdicts(rows: list[dict]) -> list[str]:
    """One line per label fraction where pretrained is not ahead of random init, saying why (none: all ahead)."""
    by = {(r["backbone"], r["fraction"]): r for r in rows}
    lines = []
    for frac in sorted({r["fraction"] for r in rows}):
        pre, rnd = by.get(("pretrained", frac)), by.get(("random-init", frac))
        if pre is None or rnd is None or pre["auc"] >= rnd["auc"]:
            continue
        overlap = pre["ci_high"] >= rnd["ci_low"] and rnd["ci_high"] >= pre["ci_low"]
        why = ("the 95 % CIs overlap, so the test patients cannot tell the two apart" if overlap else
               "the CIs do not overlap: this short pretraining did not learn what the label needs")
        more = "; with this many labels a probe on random features catches up" if frac >= 0.5 else ""
        lines.append(f"at {frac:.0%} labels ({pre['train_patients']} patients) random-init is ahead "
                     f"({rnd['auc']:.3f} vs {pre['auc']:.3f}): {why}{more}.")
    return lines
