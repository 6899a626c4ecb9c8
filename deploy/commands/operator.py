"""The consortium operator's commands: coordinator, run, runs, log, sites, stop, keys generate, release (and
publish), certs, dashboard, tensorboard, demo.

Typed functions with the command's options as keywords; `fedrad.deploy.cli` only parses arguments into them.
The process-driving ones (coordinator, run, runs, log, sites, stop, certs, dashboard, tensorboard, demo) call
their implementation in fedrad.deploy.* with the same keywords and turn its exit status into errors.Refused
(errors.check_exit: the code kept), so a script sees an exception and the shell the same exit code as before.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from fedrad.deploy.commands.errors import BadInput, Refused, check_exit

PathLike = str | os.PathLike[str]
Format = Literal["table", "json"]
SUPERLINK = "127.0.0.1:8000"


def coordinator(*, host: str = "127.0.0.1", port: int = 8000, state: PathLike = "fedrad-coordinator",
                certs: PathLike | None = None) -> None:
    """`fedrad coordinator`: run the consortium's SuperLink in the foreground until Ctrl-C."""
    from fedrad.deploy import processes
    from fedrad.deploy.certs import tls_from

    folder = Path(state).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    tls = tls_from(certs)
    cmd = processes.superlink_command(folder, host, port, tls, node_auth=tls is not None)
    print(f"fedrad coordinator: SuperLink on {host}:{port} "
          f"({'TLS + node authentication' if tls else 'insecure, loopback/trusted network only'}); "
          f"state in {folder}. Ctrl-C stops it.", flush=True)
    check_exit(processes._run_foreground(cmd, processes.flower_env()))


def run(*, superlink: str = SUPERLINK, run_dir: PathLike | None = None, resume: PathLike | None = None,
        config: list[str] | None = None, certs: PathLike | None = None, sign_key: PathLike | None = None,
        valid_days: float = 7.0, detach: bool = False) -> None:
    """`fedrad run`: submit a pretraining run (signed with sign_key) and follow it to its end (or return once
    accepted with detach=True). Refused with Flower's code when the run did not finish."""
    from fedrad.deploy.run_command import run_main

    check_exit(run_main(superlink=superlink, run_dir=run_dir, resume=resume, config=config, certs=certs,
                        sign_key=sign_key, valid_days=valid_days, detach=detach))


def runs(*, superlink: str = SUPERLINK, certs: PathLike | None = None, runs_dir: PathLike = "runs",
         format: Format = "table") -> None:
    """`fedrad runs`: the coordinator's runs with status, round and last loss (format="json": ISO 8601 times)."""
    from fedrad.deploy.runs_command import runs_main

    check_exit(runs_main(superlink=superlink, certs=certs, runs_dir=runs_dir, format=format))


def log(run: str, *, follow: bool = False, superlink: str = SUPERLINK, certs: PathLike | None = None) -> None:
    """`fedrad log RUN`: a run's log; with follow, stream until it ends (Refused, exit 1, if it did not complete)."""
    from fedrad.deploy.runs_command import log_main

    check_exit(log_main(run, follow=follow, superlink=superlink, certs=certs))


def sites(*, superlink: str = SUPERLINK, certs: PathLike | None = None, runs_dir: PathLike = "runs",
          format: Format = "table") -> None:
    """`fedrad sites`: the sites enrolled at the coordinator, connected or not."""
    from fedrad.deploy.runs_command import sites_main

    check_exit(sites_main(superlink=superlink, certs=certs, runs_dir=runs_dir, format=format))


def stop(run: str, *, superlink: str = SUPERLINK, certs: PathLike | None = None) -> None:
    """`fedrad stop RUN`: stop a run on the coordinator."""
    from fedrad.deploy.runs_command import stop_main

    check_exit(stop_main(run, superlink=superlink, certs=certs))


def keys_generate(*, out: PathLike = "fedrad-signing") -> tuple[Path, Path]:
    """`fedrad keys generate`: an Ed25519 pair PREFIX.key (0600) and PREFIX.pub; Refused if it exists (losing a
    signing key orphans released bundles, so it is never overwritten)."""
    from fedrad.server.release import generate_keys

    try:
        key, pub = generate_keys(Path(out), overwrite=False)
    except FileExistsError as exc:
        raise Refused(f"error: {exc}") from None
    print(f"private key {key} (mode 0600: keep it offline; it signs releases)\npublic key  {pub} "
          f"(give this to every site)")
    return key, pub


def release(run_dir: PathLike, *, key: PathLike, out: PathLike | None = None,
            finetune_results: PathLike | None = None, license: str | None = None, publish: bool = False,
            superlink: str | None = None, certs: PathLike | None = None, releases: PathLike | None = None,
            linger: float = 0.0) -> Path:
    """`fedrad release`: write a signed bundle from a run directory (returned); with publish=True, then publish it
    to the sites as `publish` does."""
    from fedrad.common.bundle import CARD, CONFIG, MANIFEST
    from fedrad.server.release import DEFAULT_LICENSE, release_bundle

    if publish and not superlink:
        raise BadInput("--publish needs --superlink (the coordinator's address)")
    folder = release_bundle(Path(run_dir), Path(key), Path(out) if out else None,
                            os.fspath(finetune_results) if finetune_results else None, license or DEFAULT_LICENSE)
    m = json.loads((folder / MANIFEST).read_text())
    r = m["release"]
    print(f"released {folder}: {m['model']} {m['input_size']}px, {m['objective']}, {m['rounds']} rounds, "
          f"{m['sites']} sites; run {r['run_id']} release #{r['sequence']}; weights sha256 {m['weights']['sha256']}"
          f"\nmodel card {folder / CARD} (signed with the manifest)"
          + (f"\ntimm config {folder / CONFIG}: timm.create_model('local-dir:{folder}', pretrained=True)"
             if m["config"]["file"] else f"\nno timm config.json: {m['config']['reason']}"))
    if publish:
        _publish(folder, key, superlink, certs, releases, linger)
    return folder


def publish(bundle: PathLike, *, sign_key: PathLike, superlink: str = SUPERLINK, certs: PathLike | None = None,
            releases: PathLike | None = None, linger: float = 0.0) -> dict[str, int]:
    """`fedrad publish`: send a signed bundle to every site over the consortium's connection; returns the count
    of the sites' answers. Refused (exit 1) when no site took it, one refused it, or the run failed."""
    return _publish(bundle, sign_key, superlink, certs, releases, linger)


def _publish(bundle: PathLike, sign_key: PathLike, superlink: str, certs: PathLike | None,
             releases: PathLike | None, linger: float) -> dict[str, int]:
    from fedrad.deploy.flower_cli import ca_from
    from fedrad.deploy.publish_command import DEFAULT_RELEASES, publish_bundle

    code, answers = publish_bundle(Path(bundle), Path(releases or DEFAULT_RELEASES), superlink, Path(sign_key),
                                   ca_from(certs), linger)
    summary = ", ".join(f"{n} {name}" for name, n in sorted(answers.items())) or "no site answered"
    print(f"fedrad publish: {summary} (codes: fedrad.common.release_wire.ReleaseCode; each site's reasons stay in "
          f"its refusals.jsonl)")
    held = answers["STORED"] + answers["HAVE"]
    refused = sum(n for name, n in answers.items() if name.startswith("REFUSED") or name == "FAILED")
    if code != 0 or not held or refused:
        raise Refused("")  # no site took it, or one refused it (said above)
    return dict(answers)


def certs_init(*, out: PathLike = "fedrad-certs", sites: str = "site-a,site-b,site-c",
               hosts: str = "localhost,127.0.0.1,::1") -> None:
    """`fedrad certs init`: a CA, a coordinator certificate and per-site node keys."""
    from fedrad.deploy.certs import certs_init_main

    check_exit(certs_init_main(out=out, sites=sites, hosts=hosts))


def certs_add_site(name: str, *, certs: PathLike = "fedrad-certs") -> None:
    """`fedrad certs add-site NAME`: a new site's node key pair under an existing CA."""
    from fedrad.deploy.certs import add_site_main

    check_exit(add_site_main(name, certs=certs))


def certs_register(pubkey: PathLike, *, certs: PathLike, superlink: str = SUPERLINK,
                   site_name: str | None = None) -> None:
    """`fedrad certs register PUBKEY`: enrol a site's node public key with the coordinator."""
    from fedrad.deploy.certs import register_main

    check_exit(register_main(pubkey, certs=certs, superlink=superlink, site_name=site_name))


def dashboard(*, runs_dir: PathLike = "runs", host: str = "127.0.0.1", port: int = 8050,
              superlink: str | None = None, certs: PathLike | None = None, token_file: PathLike | None = None,
              allow_host: list[str] | None = None, tls_cert: PathLike | None = None,
              tls_key: PathLike | None = None) -> None:
    """`fedrad dashboard`: the read-only web dashboard of the runs and sites, until Ctrl-C."""
    from fedrad.deploy.dashboard import dashboard_main

    check_exit(dashboard_main(runs_dir=runs_dir, host=host, port=port, superlink=superlink, certs=certs,
                              token_file=token_file, allow_host=allow_host, tls_cert=tls_cert, tls_key=tls_key))


def tensorboard(run_dir: PathLike, *, follow: bool = False) -> None:
    """`fedrad tensorboard RUN_DIR`: TensorBoard event files from the run's metrics."""
    from fedrad.deploy.tensorboard_command import tensorboard_main

    check_exit(tensorboard_main(run_dir, follow=follow))


def demo(*, workdir: PathLike = "fedrad-demo", rounds: int = 4, objective: str = "simclr", secure: bool = False,
         config: list[str] | None = None) -> None:
    """`fedrad demo`: a real local consortium of three synthetic hospitals, a run, a release, a fine-tune."""
    from fedrad.deploy.demo import demo_main

    check_exit(demo_main(workdir=workdir, rounds=rounds, objective=objective, secure=secure, config=config))


__all__ = ["certs_add_site", "certs_init", "certs_register", "coordinator", "dashboard", "demo", "keys_generate",
           "log", "publish", "release", "run", "runs", "sites", "stop", "tensorboard"]
