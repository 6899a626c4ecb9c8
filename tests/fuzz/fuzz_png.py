"""atheris harness: arbitrary bytes through the PNG/JPEG reader's decode (fedrad.common.sources.image_folder).

    .venv/bin/python tests/fuzz/fuzz_png.py /tmp/fz/png -max_len=65536 -rss_limit_mb=2048 -timeout=20 \\
        -max_total_time=600 -artifact_prefix=/tmp/fz/crash-png-
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent))
with atheris.instrument_imports(include=["contract", "fedrad", "pydicom", "PIL", "rle"]):
    from contract import check_image_bytes, fuzz


def TestOneInput(data: bytes) -> None:  # noqa: N802 - atheris' required name
    check_image_bytes(data)


if __name__ == "__main__":
    fuzz(TestOneInput)
