"""`fedrad export --format monai-bundle|onnx|torchscript RELEASE --pubkey consortium.pub --out DIR`.

Exports never skip verification: the release is checked with the consortium key (and the usual rollback
policy) first, the backbone is built from the verified bytes, and only then does fedrad.client.tools.exporters
write the format. A MONAI bundle's signed copy of the release is verified again once written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub, lazy, add_policy) -> None:
    """Add `export`, and `--license` to `release` (called by deploy.cli.build_parser with its lazy handler
    factory and its rollback-policy options)."""
    from fedrad.client.tools.exporters import FORMATS
    from fedrad.deploy.publish_command import add_release_source

    p = sub.add_parser("export", help="write a verified release as a MONAI bundle, an ONNX graph or TorchScript")
    p.add_argument("bundle", nargs="?", help="the release folder (from `fedrad release`), or give --release")
    add_release_source(p)
    p.add_argument("--format", required=True, choices=FORMATS, help="what to write")
    p.add_argument("--pubkey", required=True, help="consortium public key: the release is verified first")
    p.add_argument("--out", required=True, help="output folder (created)")
    add_policy(p)
    p.set_defaults(func=lazy(f"{__name__}:cmd_export"))
    sub.choices["release"].add_argument(
        "--license", default=None, metavar="ID",
        help="the weights' licence as the model card and timm config.json state it (a Hugging Face licence id; "
             "default apache-2.0)")


def cmd_export(args: argparse.Namespace) -> int:
    """0 and what was written; 1 when the release is refused; 2 for bad input or a missing extra."""
    from fedrad.client.site.release_store import bundle_from_args
    from fedrad.client.tools.exporters import EXPORTERS, RELEASE_DIR, MissingExtra, require_extra
    from fedrad.common.bundle import (
        WEIGHTS,
        BundleVerificationError,
        build_backbone,
        policy_from_args,
        read_verified,
    )

    try:
        require_extra(args.format)
    except MissingExtra as exc:
        print(f"fedrad export: error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    bundle = Path(bundle_from_args(args))  # BUNDLE, or --release latest|ID from the site's store
    try:
        verified = read_verified(bundle, Path(args.pubkey), policy_from_args(args))
        backbone = build_backbone(verified.manifest, verified.state_dict(), bundle, bundle / WEIGHTS)
    except BundleVerificationError as exc:
        print(f"fedrad export: bundle verification FAILED: {exc}", file=sys.stderr)
        return 1
    if not verified.manifest.get("input_size"):
        raise ValueError(f"{bundle}: the manifest records no input size, so there is no input shape to export")
    out.mkdir(parents=True, exist_ok=True)
    result = EXPORTERS[args.format](verified, backbone, out)
    if args.format == "monai-bundle":
        read_verified(out / RELEASE_DIR, Path(args.pubkey))  # the copy a later `finetune`/`embed` verifies
    m = verified.manifest
    line = f"fedrad export: {bundle} verified; {m['model']} as {args.format} -> {result['file']}"
    if "max_abs_diff" in result:
        line += f" (onnxruntime vs PyTorch max abs diff {result['max_abs_diff']:.2e})"
    print(line)
    return 0


__all__ = ["cmd_export", "register"]
