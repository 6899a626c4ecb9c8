"""Hospital IT's commands: scan, ingest, node, verify, releases, audit, policy init/check.

Typed functions with the command's options as keywords; `fedrad.deploy.cli` is only their argument parser.
They print what a person reads and return what a script uses; bad input raises ValueError/FileNotFoundError
(or errors.BadInput) naming it, a refusal raises errors.Refused / errors.BundleRefused.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Literal

from fedrad.deploy.commands.errors import BadInput, BundleRefused, Refused, check_exit

PathLike = str | os.PathLike[str]
Format = Literal["table", "json"]
DEFAULT_MAX_PIXELS = 64 << 20


def _format(value: str) -> str:
    if value not in ("table", "json"):
        raise BadInput(f"--format {value!r}: give table or json")
    return value


def release_policy(expect_run: str | None = None, min_sequence: int | None = None, min_created: str | None = None):
    """The rollback policy a site puts on a bundle beyond its signature (`--expect-run/--min-*`)."""
    from fedrad.common.bundle import ReleasePolicy

    return ReleasePolicy.from_args(expect_run, min_sequence, min_created)


def scan(data: PathLike | None = None, *, source: str | None = None, query: list[str] | None = None,
         since: str | None = None, until: str | None = None, cache: PathLike | None = None,
         max_instances: int | None = None, concurrency: int | None = None, rate: float | None = None,
         auth_file: PathLike | None = None, auth_env: str | None = None, ca_bundle: PathLike | None = None,
         calling_aet: str | None = None, max_listed: int | None = None, json_out: PathLike | None = None,
         decode: bool = True, quiet: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS,
         policy: PathLike | None = None, format: Format = "table") -> dict[str, Any]:
    """`fedrad scan`: inventory a folder (or a PACS), write the inventory JSON, print it (as a table, or the
    JSON itself with format="json"), and return the report."""
    from fedrad.client.site.scan import (
        NOTHING_SENT,
        PACS_SENT,
        format_report,
        policy_rules,
        scan_folder,
        source_options,
    )
    from fedrad.common.sources.pacs import is_source_url
    from fedrad.common.sources.walk import display_name

    _format(format)
    if source and data:
        raise BadInput("give a folder or --source, not both")
    if not source and not data:
        raise BadInput("give a folder, or --source URL for a PACS")
    if source and not is_source_url(source):
        raise BadInput("--source: expected dicomweb+https://HOST/PATH or dimse://AET@HOST:PORT")
    folder = Path(data) if not source else None
    if folder is not None and not folder.is_dir():
        raise BadInput(f"folder not found: {display_name(str(data))}")
    options = None
    if source:
        options = source_options(query, since, until, max_instances=max_instances, concurrency=concurrency,
                                 rate=rate, auth_file=auth_file, auth_env=auth_env, ca_bundle=ca_bundle,
                                 calling_aet=calling_aet, max_listed=max_listed)
    report = scan_folder(source or folder, decode=decode, progress=not quiet and format == "table",
                         max_pixels=max_pixels or DEFAULT_MAX_PIXELS, source_options=options, cache_dir=cache,
                         rules=policy_rules(str(policy) if policy else None))
    from fedrad.client.site.scan import write_inventory

    out = write_inventory(report, str(json_out) if json_out else None,
                          Path(report["store"]) if source else folder.resolve())
    if format == "json":
        print(json.dumps(report, indent=1, sort_keys=True, default=str))
        return report
    print(format_report(report))
    print(f"\ninventory written to {display_name(str(out))}")
    print(PACS_SENT if source else NOTHING_SENT)
    return report


def ingest(data: PathLike, *, image_size: int = 64, cache: PathLike | None = None, state_dir: PathLike | None = None,
           policy: PathLike | None = None, max_pixels: int = DEFAULT_MAX_PIXELS, quiet: bool = False,
           full: bool = False, compact: bool = False) -> dict[str, Any]:
    """`fedrad ingest`: decode every file of the folder not stored yet into the node's image store; returns the
    counts. A quick pass skips folders unchanged since the last pass (`full`: list every file; a pass is full
    anyway once a day); `compact` then drops the stored images of deleted files. A full disk, or a compaction
    while a round or another ingest holds the store, is bad input (exit 2): what was committed is kept."""
    import errno
    import logging
    import sqlite3

    from fedrad.client.site.ingest import ingest_site
    from fedrad.common.sources.walk import display_name
    from fedrad.common.store_compact import CompactRefused

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    folder = Path(data)
    if not folder.is_dir():
        raise BadInput(f"folder not found: {display_name(str(data))}")
    if policy:
        from fedrad.client.site.policy import load_policy

        max_pixels = load_policy(policy).max_pixels
    try:
        out = ingest_site(folder, image_size, cache_dir=cache, state_dir=state_dir, max_pixels=max_pixels,
                          progress=not quiet, full=full, compact=compact)
    except CompactRefused as exc:
        raise BadInput(str(exc)) from None
    except (OSError, sqlite3.OperationalError) as exc:
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) if isinstance(exc, OSError) else \
            any(w in str(exc) for w in ("full", "disk I/O"))
        if full:
            why = getattr(exc, "strerror", None) or exc
            raise BadInput(f"the store's disk is full ({why}); everything committed so far is kept: free space and "
                           "run `fedrad ingest` again to continue") from None
        raise
    print(f"ingest done ({'full' if out['full_pass'] else 'quick'} pass): {out['files']} files listed, "
          f"{out['decoded']} decoded now, {out['stored_before']} already stored, {out['changed_while_read']} changed "
          f"while read (decoded at the next ingest), {out['folders_unchanged']} unchanged folders skipped, "
          f"{out['seconds']:.1f} s")
    if compact:
        print(f"compacted: {out['rows_dropped']} images of deleted files dropped, {out['chunks_rewritten']} chunks "
              f"rewritten, {out['bytes_freed']} bytes freed")
    return out


def node(*, data: PathLike | None = None, superlink: str = "127.0.0.1:8000", source: str | None = None,
         query: list[str] | None = None, since: str | None = None, until: str | None = None,
         cache: PathLike | None = None, max_instances: int | None = None, concurrency: int | None = None,
         rate: float | None = None, auth_file: PathLike | None = None, auth_env: str | None = None,
         ca_bundle: PathLike | None = None, calling_aet: str | None = None, max_listed: int | None = None,
         device: str = "auto", ddp_procs: int = 1, port: int = 9094, labels: PathLike | None = None,
         certs: PathLike | None = None, site_name: str | None = None, no_scan: bool = False,
         audit_dir: PathLike | None = None, policy: PathLike | None = None, state_dir: PathLike | None = None,
         consortium_key: PathLike | None = None, allow_unsigned: bool = False, insecure: bool = False,
         fresh_process_per_message: bool = False, client_app: str = "fedrad.client.app.client_app:app",
         client_app_dir: PathLike | None = None, log_level: str = "INFO", max_releases: int | None = None,
         max_release_gib: float | None = None, keep_resident: bool = False) -> None:
    """`fedrad node`: start the site's SuperNode next to its data and run until it stops (Ctrl-C).
    Refused (exit 2) when the coordinator has not enrolled this node, Refused with Flower's code if it fails."""
    from fedrad.client.runtime.site_trust import SiteTrust
    from fedrad.deploy import node_command as nc
    from fedrad.deploy import processes  # looked up at call time: tests replace its process starts

    data, cache, source_config, scan_kw = nc.node_location(
        data, source, query=query, since=since, until=until, cache=cache, max_instances=max_instances,
        concurrency=concurrency, rate=rate, auth_file=auth_file, auth_env=auth_env, ca_bundle=ca_bundle,
        calling_aet=calling_aet, max_listed=max_listed)
    trust = SiteTrust(
        consortium_key=Path(consortium_key).resolve() if consortium_key else None,
        allow_unsigned=allow_unsigned,
        client_app=client_app,
        client_app_dir=Path(client_app_dir).resolve() if client_app_dir else None,
        fresh_process_per_message=fresh_process_per_message)
    if trust.consortium_key is None and not trust.allow_unsigned:
        raise ValueError("--consortium-key is required (the consortium's public key, e.g. consortium.pub): this "
                         "node runs only what the consortium signed (--allow-unsigned: local experiments only)")
    if trust.consortium_key is not None:
        from fedrad.common.keys import load_public_key

        load_public_key(trust.consortium_key)  # KeyFileError (a ValueError) names the file
    superlink = processes.with_default_port(superlink)
    if not certs and not insecure and not processes.is_loopback(superlink):
        raise ValueError(f"--superlink {superlink} is not on this machine and --certs is not given: "
                         "give the site folder from `fedrad certs init` (TLS), or --insecure to send in plaintext")
    from fedrad.client.site.policy import check_coordinator_ca, default_policy, load_policy

    site_policy = load_policy(policy) if policy else default_policy()  # bad file: one line, exit 2
    if not no_scan:
        from fedrad.client.site.scan import scan_folder

        print(f"fedrad node: scanning {data} to show what this site would train on ...", flush=True)
        report = scan_folder(data, decode=False, progress=True, max_pixels=site_policy.max_pixels, **scan_kw)
        usable = report["usable"]
        if "pull" in report:
            p = report["pull"]
            print(f"fedrad node: fetched {p['fetched']} instances from the PACS in {p['fetch_seconds']:.1f} s "
                  f"({p['pending']} left for the next pull)", flush=True)
        print(f"fedrad node: {usable} usable images. Only model weights and aggregate numbers will leave "
              f"this machine; images and headers stay here.", flush=True)
    from fedrad.client.site.site_state import node_state_config

    procs = int(ddp_procs or 1)
    if procs < 1:
        raise ValueError(f"--ddp-procs {procs}: give 1 or more processes")
    node_config = {"data-dir": str(data), "cache-dir": cache, "device": device, "ddp-procs": str(procs),
                   "labels": os.fspath(labels) if labels else labels,
                   "policy": str(Path(policy).resolve()) if policy else None,
                   **node_state_config(os.fspath(state_dir) if state_dir else None, data, cache,
                                       os.fspath(audit_dir) if audit_dir else None),
                   **source_config}
    if keep_resident:  # the warm worker keeps its model between rounds (fedrad.client.app.task)
        node_config["idle-release"] = "off"
    if max_releases is not None:  # the site's quota of held releases (release_store)
        node_config["max-releases"] = str(max_releases)
    if max_release_gib is not None:
        node_config["max-release-bytes"] = str(int(max_release_gib * (1 << 30)))
    tls = nc.node_tls_from(certs, site_name)
    check_coordinator_ca(site_policy, tls.ca_cert if tls else None)
    print(f"fedrad node: site policy {site_policy.source}; state (salt, DP ledger) in {node_config['state-dir']}; "
          f"audit in {node_config['audit-dir']}", flush=True)
    cmd = processes.supernode_command(superlink, port, node_config, tls, trust, log_level)
    signed_by = f"runs signed by {trust.consortium_key}" if trust.consortium_key else "UNSIGNED runs too"
    print(f"fedrad node: joining the coordinator at {superlink} "
          f"({'TLS' if tls else 'plaintext'}); running {trust.client_app} for {signed_by}. Ctrl-C leaves.",
          flush=True)
    refused: list[str] = []
    code = processes._run_foreground(cmd, processes.flower_env(),
                                     watch=lambda line: nc.NOT_ENROLLED in line and refused.append(line))
    if refused and tls is not None:
        print(f"fedrad node: this node is not enrolled at the coordinator {superlink} (its key "
              f"{tls.node_public_key} is not registered there); the coordinator's operator enrols it with: "
              f"fedrad certs register CERTS/sites/{tls.node_public_key.parent.name}/node.pub --certs CERTS "
              f"--superlink {superlink}", file=sys.stderr, flush=True)
        raise Refused("", exit_code=2)
    check_exit(code)


def verify(bundle: PathLike, *, pubkey: PathLike, expect_run: str | None = None, min_sequence: int | None = None,
           min_created: str | None = None) -> dict[str, Any]:
    """`fedrad verify`: the manifest of a bundle that passes its signature, hashes and rollback policy; prints a
    summary. BundleRefused (exit 1) otherwise."""
    from fedrad.common.bundle import BundleVerificationError, describe, verify_bundle

    policy = release_policy(expect_run, min_sequence, min_created)
    try:
        manifest = verify_bundle(Path(bundle), Path(pubkey), policy)
    except BundleVerificationError as exc:
        raise BundleRefused(f"FAILED: {exc}") from None
    print(describe(manifest, str(bundle), str(pubkey)))
    return manifest


def releases(*, state_dir: PathLike, pubkey: PathLike | None = None, format: Format = "table") -> list[dict]:
    """`fedrad releases`: the releases this site holds, oldest first (with pubkey: each verified again).
    Printed as lines, or as one JSON list with format="json"; Refused (exit 1) if one fails verification."""
    from fedrad.client.site.release_store import held_releases, releases_dir
    from fedrad.common.bundle import BundleVerificationError, verify_bundle

    _format(format)
    root = Path(state_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"--state-dir {root}: no such folder")
    rows, failed = [], []
    for h in held_releases(root):
        row = {"release": h.release_id, "run_id": h.run_id, "sequence": h.sequence, "created": h.created,
               "model": h.model, "path": str(h.path)}
        if pubkey:
            try:
                verify_bundle(h.path, pubkey)
                row["verified"] = True
            except BundleVerificationError as exc:
                row["verified"], row["error"] = False, str(exc)
                failed.append(h.release_id)
        rows.append(row)
    if format == "json":
        print(json.dumps(rows, indent=1))
    elif not rows:
        print(f"no releases in {releases_dir(root)}")
    else:
        for r in rows:
            line = (f"{r['release']:<18} run {r['run_id']} release #{r['sequence']}  created {r['created']}  "
                    f"{r['model']}  {r['path']}")
            if "verified" in r:
                line += "  verified" if r["verified"] else f"  FAILED: {r['error']}"
            print(line)
        print(f"latest: {rows[-1]['release']}")
    if failed:
        raise Refused("", exit_code=1)  # each failure is on its own line above
    return rows


def audit(*, state_dir: PathLike | None = None, data: PathLike | None = None, audit_dir: PathLike | None = None,
          days: float | None = None, since: str | None = None, until: str | None = None,
          format: Format = "table") -> dict[str, Any]:
    """`fedrad audit`: what left this node per run and per day, its refusals and releases (table or JSON)."""
    from datetime import UTC, datetime, timedelta

    from fedrad.client.site.site_state import SiteState, state_paths
    from fedrad.deploy.audit_command import audit_summary, parse_when, render

    _format(format)
    if not (state_dir or data or audit_dir):
        raise BadInput("give --state-dir (or --data, as the node was started with, or --audit-dir)")
    state = state_paths({"state-dir": str(state_dir or ""), "data-dir": str(data or ""),
                         "audit-dir": str(audit_dir or "")}) if (state_dir or data) else \
        SiteState(root=Path(audit_dir).absolute().parent, audit_dir=Path(audit_dir).absolute())
    if not state.audit_dir.is_dir():
        raise FileNotFoundError(f"{state.audit_dir}: no audit folder (has the node run with this state?)")
    start, end = parse_when(since, "--since"), parse_when(until, "--until")
    if days is not None:
        if days <= 0:
            raise BadInput(f"--days {days}: must be a positive number of days")
        start = (datetime.now(UTC) - timedelta(days=days)).timestamp()
    summary = audit_summary(state, start, end)
    if format == "json":
        json.dump(summary, sys.stdout, indent=1)
        print()
    else:
        print(render(summary))
    return summary


def policy_init(path: PathLike | None = None, *, force: bool = False) -> Path:
    """`fedrad policy init`: write the commented default policy (never over an existing file unless force)."""
    from fedrad.client.site.policy import DEFAULT_POLICY_FILE, PolicyError, default_policy_text
    from fedrad.common.atomic import atomic_write_bytes

    out = Path(path or DEFAULT_POLICY_FILE)
    if out.exists() and not force:
        raise PolicyError(f"{out}: already exists (use --force to replace it)")
    atomic_write_bytes(out, default_policy_text().encode("utf-8"))
    print(f"fedrad policy: wrote {out}. Edit it, check it with `fedrad policy check {out}`, and start the "
          f"node with `fedrad node --policy {out} ...`.")
    return out


def policy_check(path: PathLike, *, ca: PathLike | None = None):
    """`fedrad policy check`: validate a policy file (errors name the line; exit 2), print a summary, return it."""
    from fedrad.client.site.policy import check_coordinator_ca, check_models_known, file_sha256, load_policy

    path = Path(path)
    policy = load_policy(path)
    check_models_known(policy, path.read_text(encoding="utf-8"), str(path))
    if ca:
        check_coordinator_ca(policy, ca)
    dp_floor = "DP optional" if "none" in policy.dp_modes else f"dp in {list(policy.dp_modes)}"
    print(f"{path}: OK (sha256 {file_sha256(path)[:16]})\n"
          f"  objectives {', '.join(policy.objectives)}; models {', '.join(policy.models)}\n"
          f"  at most: image {policy.max_image_size} px, batch {policy.max_batch_size}, "
          f"{policy.max_local_steps} local steps, {policy.max_rounds_per_day or 'unlimited'} rounds/day, "
          f"{policy.max_evaluations_per_day or 'unlimited'} evaluations/day\n"
          f"  label fields {', '.join(policy.label_fields) or '(none)'}\n"
          f"  privacy floor: secagg {'required' if policy.require_secagg else 'optional'}, {dp_floor}, "
          f"dp-noise >= {policy.min_dp_noise:g}, dp-delta <= {policy.dp_delta:g}; site epsilon budget "
          f"{policy.epsilon_budget:g} over all runs{' (none)' if not policy.epsilon_budget else ''}\n"
          f"  coordinator CA: {policy.ca_sha256 or 'any given with --certs'}")
    return policy


__all__ = ["audit", "ingest", "node", "policy_check", "policy_init", "release_policy", "releases", "scan",
           "verify"]
