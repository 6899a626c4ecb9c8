"""atheris harness: arbitrary bytes through fedrad's DICOM read/check/decode path.

The contract under test (issue 12): any input ends in a usable [0, 1] image or SkipImage with a listed
reason; no other exception, no hang, bounded memory. Run (libFuzzer flags after the script):

    .venv/bin/python tests/fuzz/seeds.py /tmp/fz/dicom /tmp/fz/png        # build the seed corpus once
    .venv/bin/python tests/fuzz/fuzz_dicom.py /tmp/fz/dicom -max_len=65536 -rss_limit_mb=2048 \\
        -timeout=20 -max_total_time=600 -artifact_prefix=/tmp/fz/crash-

A crash writes `crash-<sha1>`: minimise it (`-minimize_crash=1 -runs=2000 crash-...`), copy it into
tests/fuzz/regressions/ and tests/test_fuzz.py turns it into a regression test.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent))
with atheris.instrument_imports(include=["contract", "fedrad", "pydicom", "PIL", "rle"]):
    from contract import check_dicom_bytes, fuzz


def TestOneInput(data: bytes) -> None:  # noqa: N802 - atheris' required name
    check_dicom_bytes(data)


if __name__ == "__main__":
    fuzz(TestOneInput)
