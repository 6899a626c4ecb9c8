"""Where a site's memory goes: Linux /proc/<pid>/smaps_rollup per process, and what imports alone cost.

RSS counts every page a process maps, including the shared libraries' code (libtorch's text is mapped by every
worker on the machine, but is in RAM once), so summing RSS over 20 sites overstates what they take. Here:
- `rss`: resident pages; `pss`: each shared page divided by how many processes map it (sums to real RAM);
- `uss`: private pages only (Private_Clean + Private_Dirty): what the machine gets back when the process ends;
- `anon`: anonymous pages (heap, Python objects, tensors): what imports and data allocate, not file mappings.
`import_ladder` starts fresh interpreters that import what a site's processes import, step by step, and reads
the same numbers, so an idle worker's USS can be split into "imports" and "everything else" (data, model, heap).
Used by bench_many_sites.py and bench_worker_memory.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

MIB = 1024 * 1024
FIELDS = {"Rss": "rss", "Pss": "pss", "Private_Clean": "uss", "Private_Dirty": "uss", "Anonymous": "anon"}


def smaps(pid: int) -> dict[str, int]:
    """{rss, pss, uss, anon} bytes of one process (zeros once it is gone or unreadable)."""
    out = dict.fromkeys(("rss", "pss", "uss", "anon"), 0)
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name in FIELDS:
            out[FIELDS[name]] += int(rest.split()[0]) * 1024
    return out


def kind_of(cmdline: list[str]) -> str:
    """Which of a site's processes this is: runtime (serve), supernode, worker, task, or other."""
    own = cmdline[:cmdline.index("--")] if "--" in cmdline else cmdline  # serve names the SuperNode after "--"
    # the runtime's entry (fedrad.deploy.runtime_entry; site_runtime itself before the client/ reorganisation)
    runtime = next((m for m in ("fedrad.deploy.runtime_entry", "fedrad.client.runtime.site_runtime") if m in own), "")
    if runtime:
        mode = own[own.index(runtime) + 1] if own[-1] != runtime else ""
        return {"serve": "runtime", "worker": "worker", "task": "task"}.get(mode, "other")
    if "fedrad.client.runtime.node_poll" in own or any(Path(a).name == "flower-supernode" for a in own):
        return "supernode"
    return "other"


def tree(pid: int) -> list:
    """psutil processes of `pid` and its live descendants ([] once it is gone)."""
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def tree_split(pid: int) -> dict[str, dict[str, int]]:
    """{kind: {rss, pss, uss, anon}} summed over a process and its descendants, plus "total"."""
    import psutil

    out: dict[str, dict[str, int]] = {}
    for p in tree(pid):
        try:
            kind = kind_of(p.cmdline())
        except psutil.NoSuchProcess:
            continue
        numbers = smaps(p.pid)
        for key in (kind, "total"):
            slot = out.setdefault(key, dict.fromkeys(numbers, 0))
            for k, v in numbers.items():
                slot[k] += v
    return out


def tree_cpu_by_kind(pid: int) -> dict[str, float]:
    """User + system CPU seconds of a process and its live descendants (children that exited are not counted),
    by kind_of (runtime, supernode, ...)."""
    import psutil

    out: dict[str, float] = {}
    for p in tree(pid):
        try:
            t, kind = p.cpu_times(), kind_of(p.cmdline())
            out[kind] = out.get(kind, 0.0) + t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return out


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its live descendants."""
    return sum(tree_cpu_by_kind(pid).values())


# What each of a site's processes imports (fedrad.client.runtime.site_runtime's serve, the SuperNode, the warm
# worker before and after its first message); each step includes the ones before it.
LADDER = {
    "python": "",
    "runtime serve": "import fedrad.client.runtime.site_runtime; from flwr.supercore.runtime import RuntimeHttpClient",
    "supernode": "import fedrad.client.runtime.node_poll, flwr.supernode.cli, flwr.supernode.start_client_internal",
    "worker before a message": "import fedrad.client.runtime.site_runtime, fedrad.client.app.client_app",
    "worker after a message": ("import fedrad.client.runtime.site_runtime, fedrad.client.app.client_app, "
                               "fedrad.client.app.task, fedrad.client.training.trainer, fedrad.client.site.site_data, "
                               "fedrad.common.models; "
                               "from fedrad.common.models import build_model; "
                               "build_model('test_resnet', 'simclr', 32, proj_dim=32)"),
}
_PROBE = ("import json, sys\n{imports}\n"
          "from pathlib import Path\n"
          "sys.path.insert(0, {here!r})\n"
          "from memory_split import smaps\n"
          "print(json.dumps({{**smaps(__import__('os').getpid()), 'modules': len(sys.modules), "
          "'torch': 'torch' in sys.modules, 'timm': 'timm' in sys.modules}}))\n")


def import_ladder(python: str = sys.executable) -> dict[str, dict]:
    """{step: {rss, pss, uss, anon, modules, torch, timm}} of a fresh interpreter after that step's imports."""
    out = {}
    here = str(Path(__file__).parent)
    for step, imports in LADDER.items():
        code = _PROBE.format(imports=imports, here=here)
        res = subprocess.run([python, "-c", code], capture_output=True, text=True, env=dict(os.environ), timeout=600)
        if res.returncode != 0:
            raise RuntimeError(f"import step {step!r} failed: {res.stderr.strip()[-400:]}")
        out[step] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def mib(d: dict[str, int]) -> dict[str, float]:
    return {k: round(v / MIB, 1) for k, v in d.items() if isinstance(v, int | float) and not isinstance(v, bool)}


if __name__ == "__main__":
    for name, numbers in import_ladder().items():
        print(f"{name:>26}: " + ", ".join(f"{k} {v:.0f} MiB" for k, v in mib(numbers).items() if k != "modules")
              + f", {numbers['modules']} modules, torch {numbers['torch']}, timm {numbers['timm']}")
