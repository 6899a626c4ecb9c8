"""Publishing a release: what `fedrad publish` and `fedrad release --publish` (fedrad.deploy.commands.operator) do.

Publishing is a Flower run signed like a training run (`--sign-key`): the sites run it only if the consortium
signed it, and each site verifies the bundle itself with its own consortium.pub. The operator's side here
checks the bundle with the signing key's public half before anything is sent, copies its allowlisted files
into the coordinator's releases folder (the published list), and submits a `publish-only` run that offers the
latest release to every node that connects within `--linger` seconds (fedrad.server.publish).
"""

from __future__ import annotations

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


__all__ = ["DEFAULT_RELEASES", "publish_bundle"]
