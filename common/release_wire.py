"""The release-distribution contract: how a signed bundle travels from the coordinator to a site, and what
the site may answer.

Two Flower `query` messages, coordinator -> site, in a run the consortium signed like any training run:

1. an offer (`query.release_offer`): a ConfigRecord naming the release (id, run id/key, sequence, created).
   The claims are unsigned hints: they only let a site that already holds the release, or would refuse it,
   say so before any byte of weights is sent;
2. the files (`query.release_files`): one ArrayRecord of uint8 chunks, keys `<file>/<index>`, only the files
   in BUNDLE_FILES, each at most RELEASE_CHUNK_BYTES per chunk.

Every reply is a MetricRecord holding exactly one key, RELEASE_CODE, whose value is a `ReleaseCode`: nothing
else leaves the site (the reason of a refusal goes to its own audit file). A separate module from
`protocol` (training messages) because the two message families never share a record.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from enum import IntEnum
from typing import Any

from fedrad.common.bundle import CARD as MODEL_CARD
from fedrad.common.bundle import CONFIG as TIMM_CONFIG
from fedrad.common.bundle import MANIFEST, MAX_CARD_BYTES, MAX_CONFIG_BYTES, SIGNATURE, WEIGHTS

ACTION_OFFER = "release_offer"
ACTION_FILES = "release_files"
MESSAGE_OFFER = f"query.{ACTION_OFFER}"
MESSAGE_FILES = f"query.{ACTION_FILES}"

# the only files that travel (fixed allowlist); MODEL_CARD and TIMM_CONFIG (timm's config.json) are stored only
# when the signed manifest lists them
BUNDLE_FILES = (WEIGHTS, MANIFEST, SIGNATURE, MODEL_CARD, TIMM_CONFIG)
REQUIRED_FILES = (WEIGHTS, MANIFEST, SIGNATURE)
RELEASE_CHUNK_BYTES = 8 << 20  # one array per 8 MiB: well under Flower's message and object limits

CONFIG = "config"  # the offer's ConfigRecord
BUNDLE = "bundle"  # the files message's ArrayRecord
RELEASE_CODE = "release_code"  # the one metric of every release reply

OFFER_ID = "release-id"
OFFER_RUN_ID = "release-run-id"
OFFER_RUN_KEY = "release-run-key"
OFFER_SEQUENCE = "release-sequence"
OFFER_CREATED = "release-created"


class ReleaseCode(IntEnum):
    """A site's answer to an offer or a transfer. Stable numbers: the coordinator logs only these."""

    WANT = 1  # offer: the site lacks this release and may take it; send the files
    HAVE = 2  # the site already holds this release
    STORED = 3  # files: verified with the site's consortium key and stored
    REFUSED_UNVERIFIED = 10  # unsigned, wrongly signed, tampered, or incomplete bundle
    REFUSED_ROLLBACK = 11  # older than a release the site holds
    REFUSED_NOT_PARTICIPANT = 12  # from a run this site did not take part in
    REFUSED_MALFORMED = 13  # the message breaks this contract (file names, chunking, sizes)
    REFUSED_QUOTA = 14  # the site holds as many releases (or bytes) as it allows; it frees room itself
    FAILED = 20  # the site could not store it (disk, permissions); details in its log


DONE_CODES = frozenset({ReleaseCode.HAVE, ReleaseCode.STORED, ReleaseCode.REFUSED_UNVERIFIED,
                        ReleaseCode.REFUSED_ROLLBACK, ReleaseCode.REFUSED_NOT_PARTICIPANT,
                        ReleaseCode.REFUSED_MALFORMED,
                        ReleaseCode.REFUSED_QUOTA})  # the coordinator does not offer this release again


class ReleaseWireError(ValueError):
    """A release message or reply breaks this contract; the text stays where it was raised."""


_SAFE = re.compile(r"[^A-Za-z0-9]")


def release_id(run_id: Any, run_key: Any, sequence: int) -> str:
    """`<first 12 of the run key (else run id)>-<sequence>`: a folder name, the same at both ends."""
    run = _SAFE.sub("", str(run_key or run_id or ""))[:12] or "run"
    return f"{run}-{int(sequence)}"


def manifest_release_id(manifest: Mapping[str, Any]) -> str:
    """The release id of a (format 2) manifest; ReleaseWireError if it has no release block."""
    release = manifest.get("release")
    if not isinstance(release, Mapping) or not isinstance(release.get("sequence"), int):
        raise ReleaseWireError("the manifest carries no release run/sequence (bundle format 1)")
    return release_id(release.get("run_id"), release.get("run_key"), release["sequence"])


def chunk_key(name: str, index: int) -> str:
    return f"{name}/{index}"


def split_chunks(name: str, data: bytes, chunk: int = RELEASE_CHUNK_BYTES) -> list[tuple[str, bytes]]:
    """(key, piece) pairs of one file; an empty file is one empty chunk so it still arrives."""
    return [(chunk_key(name, i), data[off:off + chunk])
            for i, off in enumerate(range(0, max(len(data), 1), chunk))]


def join_chunks(pieces: Mapping[str, bytes], limits: Mapping[str, int]) -> dict[str, bytes]:
    """file name -> bytes from `<file>/<index>` pieces; ReleaseWireError for an unknown file, a gap in the
    indices, or a file over its limit (checked before joining, so memory stays bounded by the message)."""
    parts: dict[str, dict[int, bytes]] = {}
    for key, piece in pieces.items():
        name, _, index = key.rpartition("/")
        if name not in BUNDLE_FILES or not index.isdigit() or len(index) > 6:
            raise ReleaseWireError(f"chunk {key[:60]!r} is not <allowed file>/<index>")
        parts.setdefault(name, {})[int(index)] = piece
    out: dict[str, bytes] = {}
    for name, by_index in parts.items():
        if sorted(by_index) != list(range(len(by_index))):
            raise ReleaseWireError(f"{name}: chunk indices are not 0..{len(by_index) - 1}")
        size = sum(len(p) for p in by_index.values())
        if size > limits[name]:
            raise ReleaseWireError(f"{name}: {size} bytes, more than the {limits[name]} allowed")
        out[name] = b"".join(by_index[i] for i in range(len(by_index)))
    return out


def reply_code(values: Mapping[str, Any]) -> ReleaseCode:
    """The ReleaseCode of a reply's MetricRecord; ReleaseWireError unless it is exactly {RELEASE_CODE: code}."""
    if set(values) != {RELEASE_CODE}:
        raise ReleaseWireError(f"release reply keys {sorted(values)[:4]} are not [{RELEASE_CODE!r}]")
    value = values[RELEASE_CODE]
    if isinstance(value, bool) or not isinstance(value, int | float) or float(value) != int(value):
        raise ReleaseWireError("release reply code is not a whole number")
    try:
        return ReleaseCode(int(value))
    except ValueError:
        raise ReleaseWireError(f"release reply code {int(value)} is not a ReleaseCode") from None


__all__ = ["ACTION_FILES", "ACTION_OFFER", "BUNDLE", "BUNDLE_FILES", "CONFIG", "DONE_CODES", "MAX_CARD_BYTES",
           "MAX_CONFIG_BYTES", "TIMM_CONFIG",
           "MESSAGE_FILES", "MESSAGE_OFFER", "MODEL_CARD", "OFFER_CREATED", "OFFER_ID", "OFFER_RUN_ID",
           "OFFER_RUN_KEY", "OFFER_SEQUENCE", "RELEASE_CHUNK_BYTES", "RELEASE_CODE", "REQUIRED_FILES",
           "ReleaseCode", "ReleaseWireError", "chunk_key", "join_chunks", "manifest_release_id", "release_id",
           "reply_code", "split_chunks"]
