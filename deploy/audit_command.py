"""`fedrad audit`: what left this site, per run and per day, and what it refused, from its own audit files.

Hospital IT's question is "what left this node this week": the wire guard describes every outgoing message in
`<audit>/outgoing.jsonl` (record names, array shapes, metric values; never array contents), refusals are in
`<audit>/refusals.jsonl` (the site policy's, the release handler's and the runtime's: two line formats, both
read here), and received releases in the state's release store. This module is the one reader of those files
for the command; it only reads (the writers are in fedrad.client). Files are streamed line by line, with a
bound on a line's length, so memory stays small on a long-running node's audit.

ε is what the site itself reported: the largest `dp_epsilon` among the metrics it sent in a run (its
image-level ε so far), so the figure is exactly what left, not a recomputation.
"""

from __future__ import annotations

import json
from collections import Counter, deque
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedrad.client.site.site_state import REFUSALS_FILE, SiteState
from fedrad.common.protocol import ErrorCode

OUTGOING_FILE = "outgoing.jsonl"  # written by fedrad.client.app.wire_guard
MAX_LINE = 1 << 20  # a longer line is not one of ours: skipped, never held in memory whole
RECENT = 10  # refusals listed one by one


def iso(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """The JSON objects of a .jsonl file; cut, oversized or non-object lines are skipped."""
    try:
        fh = open(path, encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return
    with fh:
        while True:
            line = fh.readline(MAX_LINE)
            if not line:
                return
            if not line.endswith("\n") and len(line) >= MAX_LINE:
                while (rest := fh.readline(MAX_LINE)) and not rest.endswith("\n"):
                    pass
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and isinstance(entry.get("time"), int | float):
                yield entry


def _blank() -> dict[str, Any]:
    return {"messages": 0, "train": 0, "evaluate": 0, "other": 0, "arrays": 0, "array_values": 0, "metrics": 0,
            "error_replies": 0, "blocked": 0, "epsilon": None, "first": None, "last": None}


def _count_outgoing(bucket: dict[str, Any], entry: dict[str, Any]) -> None:
    bucket["messages"] += 1
    kind = str(entry.get("message_type") or "")
    bucket[kind if kind in ("train", "evaluate") else "other"] += 1
    if entry.get("blocked"):
        bucket["blocked"] += 1
    if entry.get("error"):
        bucket["error_replies"] += 1
    elif isinstance(entry.get("content"), dict):  # a blocked reply's content is what was attempted, not sent
        for record in entry["content"].values():
            if not isinstance(record, dict):
                continue
            if record.get("kind") == "arrays":
                arrays = record.get("arrays") or {}
                bucket["arrays"] += len(arrays)
                for spec in arrays.values():
                    size = 1
                    for dim in (spec or {}).get("shape") or []:
                        size *= int(dim)
                    bucket["array_values"] += size
            elif record.get("kind") == "metrics":
                values = record.get("values") or {}
                bucket["metrics"] += len(values)
                eps = values.get("dp_epsilon")
                if isinstance(eps, int | float) and (bucket["epsilon"] is None or eps > bucket["epsilon"]):
                    bucket["epsilon"] = float(eps)
    t = float(entry["time"])
    bucket["first"] = t if bucket["first"] is None else min(bucket["first"], t)
    bucket["last"] = t if bucket["last"] is None else max(bucket["last"], t)


def refusal_of(entry: dict[str, Any]) -> dict[str, Any]:
    """One refusal in one shape, whichever writer wrote it: the site policy / release handler
    (`rule`, `reply.error_code`) or the runtime (`event`, `code`, `reason`)."""
    if "rule" in entry:
        code = (entry.get("reply") or {}).get("error_code")
        rule, detail = str(entry["rule"]), str(entry.get("detail") or "")
    else:
        code = entry.get("code")
        rule, detail = f"runtime: {entry.get('event') or 'refused'}", str(entry.get("reason") or "")
    try:
        name = ErrorCode(int(code)).name if code is not None else None
    except (TypeError, ValueError):
        name = None
    return {"time": iso(float(entry["time"])), "rule": rule, "code": int(code) if isinstance(code, int) else None,
            "code_name": name, "run_id": entry.get("run_id"), "message_type": entry.get("message_type") or None,
            "detail": detail[:300]}


def audit_summary(state: SiteState, since: float | None = None, until: float | None = None) -> dict[str, Any]:
    """What left the site per run and per day, the refusals by rule and code, the releases received."""
    total, by_run, by_day = _blank(), {}, {}
    for entry in jsonl(state.audit_dir / OUTGOING_FILE):
        t = float(entry["time"])
        if (since is not None and t < since) or (until is not None and t >= until):
            continue
        day = datetime.fromtimestamp(t, UTC).date().isoformat()
        for bucket in (total, by_run.setdefault(str(entry.get("run_id")), _blank()), by_day.setdefault(day, _blank())):
            _count_outgoing(bucket, entry)
    rules, codes, recent, refused = Counter(), Counter(), deque(maxlen=RECENT), 0
    for entry in jsonl(state.audit_dir / REFUSALS_FILE):
        t = float(entry["time"])
        if (since is not None and t < since) or (until is not None and t >= until):
            continue
        refusal = refusal_of(entry)
        refused += 1
        rules[refusal["rule"]] += 1
        codes[f"{refusal['code']} {refusal['code_name'] or ''}".strip() if refusal["code"] else "none"] += 1
        recent.append(refusal)
    from fedrad.client.site.release_store import held_releases

    releases = [{"release_id": h.release_id, "run_id": h.run_id, "sequence": h.sequence, "created": h.created,
                 "model": h.model} for h in held_releases(state.root)]
    return {
        "state_dir": str(state.root), "audit_dir": str(state.audit_dir),
        "since": iso(since), "until": iso(until),
        "outgoing": _iso_bucket(total),
        "by_run": [{"run_id": run, **_iso_bucket(b)} for run, b in sorted(by_run.items(), key=lambda x: x[1]["first"])],
        "by_day": [{"day": day, **_iso_bucket(b)} for day, b in sorted(by_day.items())],
        "refusals": {"total": refused, "by_rule": dict(rules.most_common()), "by_code": dict(codes.most_common()),
                     "recent": list(recent)},
        "releases": releases,
    }


def _iso_bucket(bucket: dict[str, Any]) -> dict[str, Any]:
    return {**bucket, "first": iso(bucket["first"]), "last": iso(bucket["last"])}


def _table(header: tuple[str, ...], rows: list[tuple]) -> str:
    cells = [header, *[tuple("-" if c is None else str(c) for c in r) for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells)


COLUMNS = ("MESSAGES", "TRAIN", "EVAL", "ARRAYS", "VALUES", "METRICS", "ERRORS", "BLOCKED", "EPSILON")


def _counts(b: dict[str, Any]) -> tuple:
    eps = None if b["epsilon"] is None else f"{b['epsilon']:.3f}"
    return (b["messages"], b["train"], b["evaluate"], b["arrays"], b["array_values"], b["metrics"],
            b["error_replies"], b["blocked"], eps)


def render(summary: dict[str, Any]) -> str:
    out = [f"fedrad audit: {summary['audit_dir']}"
           + (f" from {summary['since']}" if summary["since"] else "") + (f" to {summary['until']}" if summary["until"]
                                                                          else ""),
           "", "what left this site, per run (arrays: model arrays sent; values: numbers in them; metrics: numbers "
           "reported; epsilon: the largest image-level ε the site reported)",
           _table(("RUN", "FIRST", "LAST", *COLUMNS),
                  [(r["run_id"], r["first"], r["last"], *_counts(r)) for r in summary["by_run"]]),
           "", "per day (UTC)", _table(("DAY", *COLUMNS), [(d["day"], *_counts(d)) for d in summary["by_day"]])]
    ref = summary["refusals"]
    out += ["", f"refusals: {ref['total']}"]
    if ref["total"]:
        out += [_table(("RULE", "COUNT"), list(ref["by_rule"].items())), "",
                _table(("CODE", "COUNT"), list(ref["by_code"].items())), "", "latest:",
                _table(("TIME", "RUN", "RULE", "CODE", "DETAIL"),
                       [(r["time"], r["run_id"], r["rule"], r["code"], r["detail"][:80]) for r in ref["recent"]])]
    out += ["", f"releases received: {len(summary['releases'])}"]
    if summary["releases"]:
        out.append(_table(("RELEASE", "RUN", "SEQUENCE", "CREATED", "MODEL"),
                          [(r["release_id"], r["run_id"], r["sequence"], r["created"], r["model"])
                           for r in summary["releases"]]))
    return "\n".join(out)


def parse_when(text: str | None, flag: str) -> float | None:
    if not text:
        return None
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{flag} {text!r}: not a date (2026-01-31 or 2026-01-31T12:00:00Z)") from None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


__all__ = ["OUTGOING_FILE", "audit_summary", "parse_when", "jsonl", "refusal_of", "render"]
