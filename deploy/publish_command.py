"""`fedrad publish`, `fedrad release --publish`, `fedrad releases`, and `--release` for finetune/embed.

Publishing is a Flower run signed like a training run (`--sign-key`): the sites run it only if the consortium
signed it, and each site verifies the bundle itself with its own consortium.pub. The operator's side here
checks the bundle with the signing key's public half before anything is sent, copies its allowlisted files
into the coordinator's releases folder (the published list), and submits a `publish-only` run that offers the
latest release to every node that connects within `--linger` seconds (fedrad.server.publish).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

DEFAULT_RELEASES = "fedrad-releases"


def publish_bundle(bundle: Path, releases: Path, superlink: str, sign_key: Path, ca_cert: Path | None = None,
                   linger: float = 0.0, timeout: float | None = None, verify: bool = True) -> tuple[int, Counter]:
    """(flwr exit code, count of the sites' answers) after publishing `bundle` through `releases`.

    `verify=False` skips the operator-side check (tests use it to push a bundle the sites must refuse).
    """
    from fedrad.common.bundle import BundleVerificationError, verify_bundle
    from fedrad.deploy.processes import with_default_port
    from fedrad.deploy.run_command import submit_run
    from fedrad.server.publish import PUBLISH_LOG, stage_release
    from fedrad.server.release import load_private_key

    if linger < 0:
        raise ValueError(f"--linger {linger}: must be >= 0 seconds")
    if not Path(bundle).is_dir():
        raise FileNotFoundError(f"bundle folder {bundle} not found")
    key = load_private_key(sign_key)
    if verify:
        try:
            verify_bundle(bundle, key.public_key())
        except BundleVerificationError as exc:
            raise ValueError(f"{bundle} does not verify with {sign_key}'s public key: {exc}") from None
    releases = Path(releases).resolve()
    staged = stage_release(Path(bundle), releases)
    log_path = releases / PUBLISH_LOG
    start = log_path.stat().st_size if log_path.is_file() else 0
    overrides = {"publish-dir": str(releases), "publish-only": True, "publish-linger": float(linger)}
    print(f"fedrad publish: offering {staged.name} to the sites of {superlink} (linger {linger:.0f}s)", flush=True)
    code = submit_run(with_default_port(superlink), overrides, log_path=releases / "flwr-publish.log",
                      ca_cert=ca_cert, timeout=timeout, sign_key=Path(sign_key).resolve())
    answers: Counter = Counter()
    if log_path.is_file():
        with open(log_path, encoding="utf-8") as fh:
            fh.seek(start)
            for line in fh:
                entry = json.loads(line)
                if entry.get("release") == staged.name:
                    answers[entry["result"]] += 1
    return code, answers


def cmd_publish(args: argparse.Namespace) -> int:
    from fedrad.deploy.run_command import _ca_from

    code, answers = publish_bundle(Path(args.bundle), Path(args.releases), args.superlink, Path(args.sign_key),
                                   _ca_from(args.certs), args.linger)
    summary = ", ".join(f"{n} {name}" for name, n in sorted(answers.items())) or "no site answered"
    print(f"fedrad publish: {summary} (codes: fedrad.common.release_wire.ReleaseCode; each site's reasons stay in "
          f"its refusals.jsonl)")
    held = answers["STORED"] + answers["HAVE"]
    refused = sum(n for name, n in answers.items() if name.startswith("REFUSED") or name == "FAILED")
    return 0 if code == 0 and held and not refused else 1  # 1: no site took it, or one refused it


def cmd_release(args: argparse.Namespace) -> int:
    """`fedrad release`, then (with --publish) `fedrad publish` of the bundle just written."""
    from fedrad.server.release import cmd_release as write_release

    if args.publish and not args.superlink:
        raise ValueError("--publish needs --superlink (the coordinator's address)")
    status = write_release(args)
    if status or not args.publish:
        return status
    args.bundle = args.out or str(Path(args.run_dir) / "release")
    args.sign_key = args.key
    return cmd_publish(args)


def _add_publish_options(p: argparse.ArgumentParser, superlink_default: str | None) -> None:
    p.add_argument("--superlink", default=superlink_default, help="coordinator address HOST[:PORT]"
                   + ("" if superlink_default else " (needed with --publish; no default)"))
    p.add_argument("--certs", default=None, help="folder holding the consortium CA, ca.pem (default: no TLS)")
    p.add_argument("--releases", default=DEFAULT_RELEASES,
                   help="the coordinator's folder of published releases (the list offered to sites)")
    p.add_argument("--linger", type=float, default=0.0, metavar="SECONDS",
                   help="keep serving sites that connect for this long (default 0: the sites connected now)")


def register(sub, lazy) -> None:
    """Add `publish` and `releases`, and `--publish` to `release` (called by deploy.cli.build_parser, which
    passes its `lazy(module:function)` handler factory)."""
    p = sub.add_parser("publish", help="send a signed bundle to every site over the consortium's connection")
    p.add_argument("bundle", help="the bundle folder (from `fedrad release`)")
    p.add_argument("--sign-key", required=True, metavar="CONSORTIUM_KEY",
                   help="consortium private key: signs the publish run (sites run only signed runs) and checks the "
                        "bundle before it is sent")
    _add_publish_options(p, "127.0.0.1:8000")
    p.set_defaults(func=lazy(f"{__name__}:cmd_publish"))

    release = sub.choices["release"]
    release.add_argument("--publish", action="store_true", help="then publish the bundle to the sites (signed "
                         "with --key; see `fedrad publish`)")
    _add_publish_options(release, None)
    release.set_defaults(func=lazy(f"{__name__}:cmd_release"))

    p = sub.add_parser("releases", help="list the verified releases this site's node received")
    p.add_argument("--state-dir", required=True, help="the site's state folder (as `fedrad node` printed it)")
    p.add_argument("--pubkey", default=None, help="verify each again with this consortium.pub (default: list only)")
    p.set_defaults(func=lazy("fedrad.client.site.release_store:cmd_releases"))


def add_release_source(p: argparse.ArgumentParser) -> None:
    """`--release latest|ID` and `--state-dir` for finetune/embed (BUNDLE becomes optional)."""
    p.add_argument("--release", default=None, metavar="latest|ID",
                   help="use a release this site's node received (from --state-dir) instead of a BUNDLE folder; "
                        "still verified with --pubkey (default: BUNDLE)")
    p.add_argument("--state-dir", default=None, help="the site's state folder, for --release (no default)")
