"""`fedrad coordinator` and `fedrad node`: the checks a hospital's node passes before it joins (trust, TLS,
policy, state folder, data or PACS location), then the real SuperLink / the pinned site runtime in the foreground.
"""

from __future__ import annotations

import os
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

PathLike = str | os.PathLike[str]


def _node_tls_from(certs: PathLike | None, site: str | None) -> TlsFiles | None:
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


def coordinator_main(*, host: str = "127.0.0.1", port: int = 8000, state: PathLike = "fedrad-coordinator",
                     certs: PathLike | None = None) -> int:
    """`fedrad coordinator`: the SuperLink in the foreground; returns its exit status."""
    folder = Path(state).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    tls = tls_from(certs)
    cmd = superlink_command(folder, host, port, tls, node_auth=tls is not None)
    print(f"fedrad coordinator: SuperLink on {host}:{port} "
          f"({'TLS + node authentication' if tls else 'insecure, loopback/trusted network only'}); "
          f"state in {folder}. Ctrl-C stops it.", flush=True)
    return _run_foreground(cmd, flower_env())


def node_location(data: PathLike | None = None, source: str | None = None, *, query: list[str] | None = None,
                  since: str | None = None, until: str | None = None, cache: PathLike | None = None,
                  **limits) -> tuple[str | Path, str | None, dict[str, str], dict]:
    """(data-dir value, cache-dir, source-* node-config keys, extra scan_folder kwargs) for `fedrad node`:
    a folder, or a PACS URL whose query and limits travel as site-local node config (no secret, only where
    the secret is). `limits` are the PACS limits (fedrad.client.site.scan.PACS_LIMITS: max_instances, rate, ...)."""
    cache = os.fspath(cache) if cache else None
    if source:  # a PACS: node config data-dir holds its URL, source-* its query and limits (site-local)
        from fedrad.client.site.scan import source_options
        from fedrad.common.sources.pacs import default_source_cache_dir, is_source_url

        if data or not is_source_url(source):
            raise ValueError("--source: give dicomweb+https://HOST/PATH or dimse://AET@HOST:PORT, without --data")
        options = source_options(query, since, until, **limits)  # an unknown limit: TypeError
        cache = cache or str(default_source_cache_dir(source))
        return source, cache, options.to_config(), {"source_options": options, "cache_dir": cache}
    if not data:
        raise ValueError("give --data FOLDER or --source URL")
    folder = Path(data).resolve()
    if not folder.is_dir():
        raise FileNotFoundError(f"--data {folder}: no such folder")
    return folder, cache, {}, {}


# What Flower 1.41's SuperNode prints (exit code 305, API error 2004) when the SuperLink refuses to activate it:
# with node authentication, its public key is not registered (the reason is only in the coordinator's log).
NOT_ENROLLED = "Failed to activate SuperNode"


def node_main(*, data: PathLike | None = None, superlink: str = "127.0.0.1:8000", source: str | None = None,
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
              max_release_gib: float | None = None, keep_resident: bool = False) -> int:
    """`fedrad node`: the site's checks, then its SuperNode (through the site runtime) in the foreground until it
    stops; returns its exit status (2: the coordinator has not enrolled this node)."""
    data, cache, source_config, scan_kw = node_location(
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
    superlink = with_default_port(superlink)
    if not certs and not insecure and not is_loopback(superlink):
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
    tls = _node_tls_from(certs, site_name)
    check_coordinator_ca(site_policy, tls.ca_cert if tls else None)
    print(f"fedrad node: site policy {site_policy.source}; state (salt, DP ledger) in {node_config['state-dir']}; "
          f"audit in {node_config['audit-dir']}", flush=True)
    cmd = supernode_command(superlink, port, node_config, tls, trust, log_level)
    signed_by = f"runs signed by {trust.consortium_key}" if trust.consortium_key else "UNSIGNED runs too"
    print(f"fedrad node: joining the coordinator at {superlink} "
          f"({'TLS' if tls else 'plaintext'}); running {trust.client_app} for {signed_by}. Ctrl-C leaves.",
          flush=True)
    refused: list[str] = []
    code = _run_foreground(cmd, flower_env(), watch=lambda line: NOT_ENROLLED in line and refused.append(line))
    if refused and tls is not None:
        print(f"fedrad node: this node is not enrolled at the coordinator {superlink} (its key "
              f"{tls.node_public_key} is not registered there); the coordinator's operator enrols it with: "
              f"fedrad certs register CERTS/sites/{tls.node_public_key.parent.name}/node.pub --certs CERTS "
              f"--superlink {superlink}", file=sys.stderr, flush=True)
        return 2
    return code
