"""The one exception contract of ingestion: every reason a file or item cannot be used.

Every reader and decoder ends any failure in `SkipImage(reason, detail)` with `reason` from REASONS, never
another exception type: the scan report, the cache and the site loader count and list these, and one bad
file must never stop a site from training. `skip_from(exc)` maps the exceptions third-party decoders are
known to raise (pydicom's BytesLengthException, MemoryError, zlib/PIL errors) onto that list.
"""

from __future__ import annotations

REASONS = (
    "not-dicom",
    "empty-file",
    "truncated",
    "no-pixel-data",
    "multi-frame",
    "colour",
    "bad-dimensions",
    "decode-failed",
    "unsupported-syntax",
    "unreadable",  # permission denied / I/O error / symlink loop: the file exists but cannot be opened
    "too-large",  # over the pixel budget (header or codec-declared size)
    "out-of-memory",  # the decoder ran out of memory (worker limit or a busy machine): retried at the next load
    "blank",  # RescaleSlope 0 / inf / NaN, or every pixel the same value: nothing to learn from
    "unsupported-format",  # a file fedrad has no reader for (NIfTI, archives, ...): reported, never silent
    "decoder-crashed",  # the decode worker process died (segfault, abort) on this file
    "modality-excluded",  # read, but the site policy does not use this modality (data.modalities)
    "burned-in-annotation",  # BurnedInAnnotation YES: skipped unless the site policy allows it
)


class SkipImage(Exception):
    """A file that cannot be used; `.reason` is a stable code from REASONS, `.detail` says more."""

    def __init__(self, reason: str, detail: str = "") -> None:
        if reason not in REASONS:  # a typo here would create a reason no report knows how to group
            detail, reason = f"(unlisted reason {reason!r}) {detail}", "decode-failed"
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail

    def __reduce__(self):  # survive pickling across decode worker processes
        return (SkipImage, (self.reason, self.detail))


FATAL = (KeyboardInterrupt, SystemExit, GeneratorExit)


def reraise_fatal(exc: BaseException) -> None:
    """Handlers catch BaseException because Rust decoders (pylibjpeg-rle via pyo3) raise PanicException,
    which is not an Exception; only interpreter-level exits must still propagate."""
    if isinstance(exc, FATAL):
        raise exc


def skip_from(exc: BaseException, context: str = "") -> SkipImage:
    """Any exception raised while reading or decoding one item -> the SkipImage that reports it."""
    if isinstance(exc, SkipImage):
        return exc
    reraise_fatal(exc)
    msg = " ".join(str(exc).split())[:240] or type(exc).__name__
    prefix = f"{context}: " if context else ""
    if isinstance(exc, MemoryError):
        return SkipImage("out-of-memory", f"{prefix}out of memory while decoding (decode memory limit or the "
                                           "machine's memory)")
    if isinstance(exc, EOFError) or "end of file" in msg.lower() or "truncat" in msg.lower():
        return SkipImage("truncated", prefix + msg)
    if type(exc).__name__ == "BytesLengthException" or "expected length" in msg or "doesn't match" in msg \
            or "reshape" in msg:
        return SkipImage("bad-dimensions", prefix + msg)
    if isinstance(exc, (PermissionError, FileNotFoundError, IsADirectoryError)):
        return SkipImage("unreadable", prefix + msg)
    return SkipImage("decode-failed", f"{prefix}{type(exc).__name__}: {msg}"[:240])
