"""`fedrad coordinator` and `fedrad node`: the checks a hospital's node passes before it joins (trust, TLS,
policy, state folder, data or PACS location), then the real SuperLink / the pinned site runtime in the foreground.
"""

from __future__ import annotations

import sys
from pathlib import Path

from fedrad.client.runtime.site_runtime import SiteTrust
from fedrad.deploy.certs import tls_from
from fedrad.deploy.processes import (
    TlsFiles,
    _run_foreground,
    flower_env,
    is_loopback,
    superlink_command,
    supernode_command,
    with_default_port,
)


def _node_tls_from(certs: str | None, site: str | None) -> TlsFiles | None:
    """A site's TLS files: its own folder (`fedrad-certs/sites/site-a`: ca.pem + node.key, the site's name is
    the folder's), or the consortium folder plus `--site-name`."""
    if not certs:
        return None
    folder = Path(certs).resolve()
    if site is None:
        if not (folder / "node.key").exists():
            raise FileNotFoundError(f"--certs {folder}: no node.key here; give the site's own folder "
                                    "(e.g. fedrad-certs/sites/site-a) or add --site-name")
        site = folder.name
    return tls_from(certs, site)


def coordinator_main(args) -> int:
    state = Path(args.state).resolve()
    state.mkdir(parents=True, exist_ok=True)
    tls = tls_from(args.certs)
    cmd = superlink_command(state, args.host, args.port, tls, node_auth=tls is not None)
    print(f"fedrad coordinator: SuperLink on {args.host}:{args.port} "
          f"({'TLS + node authentication' if tls else 'insecure, loopback/trusted network only'}); "
          f"state in {state}. Ctrl-C stops it.", flush=True)
    return _run_foreground(cmd, flower_env())


def node_location(args) -> tuple[str | Path, str | None, dict[str, str], dict]:
    """(data-dir value, cache-dir, source-* node-config keys, extra scan_folder kwargs) for `fedrad node`:
    a folder, or a PACS URL whose query and limits travel as site-local node config (no secret, only where
    the secret is)."""
    source, cache, source_config, scan_kw = getattr(args, "source", None), args.cache, {}, {}
    if source:  # a PACS: node config data-dir holds its URL, source-* its query and limits (site-local)
        from fedrad.client.site.scan import PACS_LIMITS, source_options
        from fedrad.common.sources.pacs import default_source_cache_dir, is_source_url

        if args.data or not is_source_url(source):
            raise ValueError("--source: give dicomweb+https://HOST/PATH or dimse://AET@HOST:PORT, without --data")
        options = source_options(args.query, args.since, args.until,
                                 **{k: getattr(args, k, None) for k in PACS_LIMITS})
        cache = cache or str(default_source_cache_dir(source))
        data, source_config, scan_kw = source, options.to_config(), {"source_options": options, "cache_dir": cache}
    else:
        if not args.data:
            raise ValueError("give --data FOLDER or --source URL")
        data = Path(args.data).resolve()
        if not data.is_dir():
            raise FileNotFoundError(f"--data {data}: no such folder")
    return data, cache, source_config, scan_kw


# What Flower 1.41's SuperNode prints (exit code 305, API error 2004) when the SuperLink refuses to activate it:
# with node authentication, its public key is not registered (the reason is only in the coordinator's log).
NOT_ENROLLED = "Failed to activate SuperNode"


def node_main(args) -> int:
    data, cache, source_config, scan_kw = node_location(args)
    trust = SiteTrust(
        consortium_key=Path(args.consortium_key).resolve() if args.consortium_key else None,
        allow_unsigned=args.allow_unsigned,
        client_app=args.client_app,
        client_app_dir=Path(args.client_app_dir).resolve() if args.client_app_dir else None,
        fresh_process_per_message=getattr(args, "fresh_process_per_message", False))
    if trust.consortium_key is None and not trust.allow_unsigned:
        raise ValueError("--consortium-key is required (the consortium's public key, e.g. consortium.pub): this "
                         "node runs only what the consortium signed (--allow-unsigned: local experiments only)")
    if trust.consortium_key is not None:
        from fedrad.common.keys import load_public_key

        load_public_key(trust.consortium_key)  # KeyFileError (a ValueError) names the file
    args.superlink = with_default_port(args.superlink)
    if not args.certs and not args.insecure and not is_loopback(args.superlink):
        raise ValueError(f"--superlink {args.superlink} is not on this machine and --certs is not given: "
                         "give the site folder from `fedrad certs init` (TLS), or --insecure to send in plaintext")
    from fedrad.client.site.policy import check_coordinator_ca, default_policy, load_policy

    policy = load_policy(args.policy) if args.policy else default_policy()  # bad file: one line, exit 2
    if not args.no_scan:
        from fedrad.client.site.scan import scan_folder

        print(f"fedrad node: scanning {data} to show what this site would train on ...", flush=True)
        report = scan_folder(data, decode=False, progress=True, max_pixels=policy.max_pixels, **scan_kw)
        usable = report["usable"]
        if "pull" in report:
            p = report["pull"]
            print(f"fedrad node: fetched {p['fetched']} instances from the PACS in {p['fetch_seconds']:.1f} s "
                  f"({p['pending']} left for the next pull)", flush=True)
        print(f"fedrad node: {usable} usable images. Only model weights and aggregate numbers will leave "
              f"this machine; images and headers stay here.", flush=True)
    from fedrad.client.site.site_state import node_state_config

    procs = int(getattr(args, "ddp_procs", 1) or 1)
    if procs < 1:
        raise ValueError(f"--ddp-procs {procs}: give 1 or more processes")
    node_config = {"data-dir": str(data), "cache-dir": cache, "device": args.device, "ddp-procs": str(procs),
                   "labels": args.labels, "policy": str(Path(args.policy).resolve()) if args.policy else None,
                   **node_state_config(args.state_dir, data, cache, getattr(args, "audit_dir", None)),
                   **source_config}
    if getattr(args, "keep_resident", False):  # the warm worker keeps its model between rounds (fedrad.client.app.task)
        node_config["idle-release"] = "off"
    if getattr(args, "max_releases", None) is not None:  # the site's quota of held releases (release_store)
        node_config["max-releases"] = str(args.max_releases)
    if getattr(args, "max_release_gib", None) is not None:
        node_config["max-release-bytes"] = str(int(args.max_release_gib * (1 << 30)))
    tls = _node_tls_from(args.certs, args.site_name)
    check_coordinator_ca(policy, tls.ca_cert if tls else None)
    print(f"fedrad node: site policy {policy.source}; state (salt, DP ledger) in {node_config['state-dir']}; "
          f"audit in {node_config['audit-dir']}", flush=True)
    cmd = supernode_command(args.superlink, args.port, node_config, tls, trust, args.log_level)
    signed_by = f"runs signed by {trust.consortium_key}" if trust.consortium_key else "UNSIGNED runs too"
    print(f"fedrad node: joining the coordinator at {args.superlink} "
          f"({'TLS' if tls else 'plaintext'}); running {trust.client_app} for {signed_by}. Ctrl-C leaves.",
          flush=True)
    refused: list[str] = []
    code = _run_foreground(cmd, flower_env(), watch=lambda line: NOT_ENROLLED in line and refused.append(line))
    if refused and tls is not None:
        print(f"fedrad node: this node is not enrolled at the coordinator {args.superlink} (its key "
              f"{tls.node_public_key} is not registered there); the coordinator's operator enrols it with: "
              f"fedrad certs register CERTS/sites/{tls.node_public_key.parent.name}/node.pub --certs CERTS "
              f"--superlink {args.superlink}", file=sys.stderr, flush=True)
        return 2
    return code
