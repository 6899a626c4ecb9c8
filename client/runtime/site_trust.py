"""Which runs the site runtime serves: the consortium's signature over a run's FAB and fused run-config
(checked on every message, the verdict cached by a warm worker), the signed claims (never cached) and the
ClientApp installed at the site that a verified message is handed to. Split from site_runtime.py, which
starts the processes, so the trust decision reads on its own.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedrad.common.protocol import ErrorCode
from fedrad.common.run_signature import (
    SIGNATURE_KEY,
    claims_problem,
    parse_signature,
    run_statement,
    sha256_hex,
)

DEFAULT_CLIENT_APP = "fedrad.client.app.client_app:app"
log = logging.getLogger("fedrad.runtime")


@dataclass(frozen=True)
class SiteTrust:
    """What a site runs and for whom: its own ClientApp, for runs signed by the key it trusts."""

    consortium_key: Path | None = None
    allow_unsigned: bool = False  # local experiments only: run unsigned runs (still the site's own code)
    client_app: str = DEFAULT_CLIENT_APP
    client_app_dir: Path | None = None  # folder holding a site-named ClientApp module (tests, site extensions)
    fresh_process_per_message: bool = False  # the older runtime: a fresh `task` process per message, no warm worker

    def args(self) -> list[str]:
        """Command-line form, shared by `fedrad node`, the demo and the test harness."""
        out = ["--client-app", self.client_app]
        if self.fresh_process_per_message:
            out.append("--fresh-process-per-message")
        if self.consortium_key is not None:
            out += ["--consortium-key", str(self.consortium_key)]
        if self.allow_unsigned:
            out.append("--allow-unsigned")
        if self.client_app_dir is not None:
            out += ["--client-app-dir", str(self.client_app_dir)]
        return out


# --- the signature check (pure: no network, no site data) ---------------------------------------------


def check_run(trust: SiteTrust, fab_bytes: bytes, run_config: dict[str, Any]) -> str | None:
    """Why this run may not run here (for the site's audit log), or None when it may."""
    reason = _signature_problem(trust.consortium_key, fab_bytes, run_config)
    if reason is not None and trust.allow_unsigned:
        log.warning("fedrad runtime: running an unverified run (--allow-unsigned): %s", reason)
        return None
    return reason


class VerdictCache:
    """A warm worker's signature verdicts, keyed by everything `check_run` reads: the FAB's sha256, the fused
    run-config and the bytes of the consortium key file (a key replaced on disk is a new key). Bounded."""

    MAX_ENTRIES = 64

    def __init__(self) -> None:
        self._verdicts: dict[tuple[str, str, str], str | None] = {}

    def check(self, trust: SiteTrust, fab_bytes: bytes, run_config: dict[str, Any]) -> str | None:
        try:
            key_bytes = trust.consortium_key.read_bytes() if trust.consortium_key is not None else b""
        except OSError:
            return check_run(trust, fab_bytes, run_config)  # unreadable now: check (and refuse) uncached
        config = json.dumps(run_config, sort_keys=True, default=repr).encode()
        key = (sha256_hex(fab_bytes), hashlib.sha256(config).hexdigest(), hashlib.sha256(key_bytes).hexdigest())
        if key not in self._verdicts:
            if len(self._verdicts) >= self.MAX_ENTRIES:
                self._verdicts.clear()
            self._verdicts[key] = check_run(trust, fab_bytes, run_config)
        return self._verdicts[key]


def _signature_problem(key_path: Path | None, fab_bytes: bytes, run_config: dict[str, Any]) -> str | None:
    from fedrad.common.keys import KeyFileError, key_fingerprint, load_public_key, signature_valid

    if key_path is None:
        return "this node has no consortium key (start it with --consortium-key consortium.pub)"
    try:
        public_key = load_public_key(key_path)
    except KeyFileError as exc:
        return f"consortium key unusable: {exc}"
    raw = run_config.get(SIGNATURE_KEY, "")
    if not raw:
        return "the run carries no signature"
    parsed = parse_signature(raw)
    if parsed is None:
        return "the run's signature is malformed"
    signer, claims, signature = parsed
    trusted = key_fingerprint(public_key)
    if signer != trusted:
        return f"the run is signed by key {signer[:16]}..., not by the consortium key {trusted[:16]}..."
    if not signature_valid(public_key, signature, run_statement(sha256_hex(fab_bytes), run_config, claims)):
        return "the signature does not match this FAB and run-config (altered or signed for another run)"
    return None


def _server_round(message) -> int | None:
    """The `server-round` a message carries (plain config, or SecAgg+'s legacy FitIns config), if any."""
    from fedrad.common.protocol import CONFIG, FIT_CONFIG, SERVER_ROUND

    for name in (CONFIG, FIT_CONFIG):
        record = message.content.config_records.get(name) if message.has_content() else None
        if record is not None and SERVER_ROUND in record:
            value = record[SERVER_ROUND]
            return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 1 << 62
    return None


def check_claims(run_config: dict[str, Any], message, run_id: int,
                 node_config: dict[str, Any], now: float | None = None) -> tuple[str, str, ErrorCode] | None:
    """For a run whose signature carries claims: (rule, why, code) when this message may not run, else None.

    Refused: a message type the statement does not name, a server-round above its signed num-server-rounds,
    its nonce under a Flower run id other than the first that used it here, and the START of a run whose
    statement is past its not-after (bound and checked in the site's state, fedrad.client.site.site_state.bind_nonce:
    a run accepted before its not-after is served on after it). Called for every message."""
    parsed = parse_signature(run_config.get(SIGNATURE_KEY, ""))
    if parsed is None:
        return None  # unsigned (only reached with --allow-unsigned): nothing was promised to check
    claims = parsed[1]
    problem = claims_problem(claims, run_config, str(message.metadata.message_type), _server_round(message))
    if problem is not None:
        rule, why = problem
        return rule, why, ErrorCode.RUN_OUT_OF_BOUNDS
    from fedrad.client.site.site_state import SiteStateError, StatementExpired, bind_nonce, state_paths

    try:
        first = bind_nonce(state_paths(node_config), claims.nonce, int(run_id), claims.not_after, now)
    except StatementExpired as exc:  # a new run, too late to start; one already running here goes on
        return exc.rule, str(exc), ErrorCode.RUN_EXPIRED
    except (SiteStateError, OSError) as exc:  # the nonce cannot be recorded: the run cannot be shown fresh
        return "run_nonce", f"the signed run's nonce cannot be recorded: {exc}", ErrorCode.SITE_FAILED
    if first is not None:
        return ("run_nonce", f"the signed run (nonce {claims.nonce[:8]}...) was already used by Flower run {first}: "
                "a replay", ErrorCode.RUN_REPLAYED)
    return None


def load_site_app(trust: SiteTrust):
    """The ClientApp installed at this site (never anything from the FAB)."""
    from flwr.clientapp import ClientApp

    if trust.client_app == DEFAULT_CLIENT_APP and trust.client_app_dir is None:
        from fedrad.client.app.client_app import app
    else:
        from flwr.clientapp.client_app import LoadClientAppError
        from flwr.supercore.object_ref import load_app

        app = load_app(trust.client_app, LoadClientAppError, trust.client_app_dir or Path.cwd())
    if not isinstance(app, ClientApp):
        raise TypeError(f"--client-app {trust.client_app} is not a Flower ClientApp")
    return app
