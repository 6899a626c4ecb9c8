"""What `fedrad node` (fedrad.deploy.commands.site.node) checks before a site joins: its data or PACS location
and its TLS files."""

from __future__ import annotations

import os
from pathlib import Path

from fedrad.deploy.certs import tls_from
from fedrad.deploy.processes import TlsFiles

PathLike = str | os.PathLike[str]


def node_tls_from(certs: PathLike | None, site: str | None) -> TlsFiles | None:
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
