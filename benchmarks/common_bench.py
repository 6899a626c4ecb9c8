"""Shared bits of the benchmarks: where the shared data is, what machine this is, how a result is recorded."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "RESULTS.md"


def shared_data() -> Path | None:
    path = Path(os.environ.get("FEDRAD_SHARED_DATA", REPO.parent / "shared" / "data"))
    return path if path.is_dir() else None


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = "no GPU"
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return f"{cpu} ({os.cpu_count()} cores); {gpu}"


def append_result(section: str, header: str, row: str) -> None:
    """Append a table row under `## section` in RESULTS.md, creating the section with its header if new."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    marker = f"## {section}"
    if marker not in text:
        text = text.rstrip("\n") + f"\n\n{marker}\n\n{header}\n"
        sep = "|" + "|".join("---" for _ in header.strip("|").split("|")) + "|"
        text += sep + "\n"
    # Insert after the section's last table row (prose under the table stays under it).
    start = text.index(marker)
    end = text.find("\n## ", start + len(marker))
    end = len(text) if end == -1 else end
    lines = text[start:end].rstrip("\n").split("\n")
    last_row = max((i for i, line in enumerate(lines) if line.startswith("|")), default=len(lines) - 1)
    block = "\n".join(lines[:last_row + 1] + [row] + lines[last_row + 1:]) + "\n"
    text = text[:start] + block + ("\n" + text[end:].lstrip("\n") if end < len(text) else "")
    RESULTS.write_text(text)


def today() -> str:
    return time.strftime("%Y-%m-%d %H:%M")
