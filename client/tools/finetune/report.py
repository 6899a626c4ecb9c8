"""The outputs of a fine-tuning run: results.json, results.md (a table) and auc_vs_fraction.png, each atomic."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def markdown_table(rows: list[dict[str, Any]]) -> str:
    dp = any(r.get("epsilon") is not None for r in rows)
    head = "| backbone | mode | labels | train patients | test ROC-AUC | 95% CI |" + (" ε spent |" if dp else "")
    sep = "|---|---|---|---|---|---|" + ("---|" if dp else "")
    lines = [head, sep]
    for r in rows:
        line = (f"| {r['backbone']} | {r['mode']} | {r['fraction']:.0%} | {r['train_patients']} | "
                f"{r['auc']:.3f} | [{r['ci_low']:.3f}, {r['ci_high']:.3f}] |")
        if dp:
            line += f" {r['epsilon']:.2f} |" if r.get("epsilon") is not None else " - |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def plot_auc(rows: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """AUC vs label fraction (log x), one line per backbone and mode, 95 % CI as error bars; atomic."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fedrad.common.atomic import atomic_write

    fig, ax = plt.subplots(figsize=(6, 4))
    keys = list(dict.fromkeys((r["backbone"], r["mode"]) for r in rows))
    for name, mode in keys:
        sel = sorted((r for r in rows if r["backbone"] == name and r["mode"] == mode), key=lambda r: r["fraction"])
        x = [r["fraction"] * 100 for r in sel]
        y = [r["auc"] for r in sel]
        err = [[max(0.0, r["auc"] - r["ci_low"]) for r in sel], [max(0.0, r["ci_high"] - r["auc"]) for r in sel]]
        label = name if len({m for _, m in keys}) == 1 else f"{name} ({mode})"
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("labelled training patients (%)")
    ax.set_ylabel("test ROC-AUC")
    ax.set_title(title or "label efficiency")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=120))
    plt.close(fig)
    return path


def write_outputs(out_dir: Path, rows: list[dict[str, Any]], meta: dict[str, Any], title: str = "") -> str:
    """results.json, results.md and auc_vs_fraction.png in `out_dir`, each written atomically."""
    from fedrad.common.atomic import atomic_write_bytes, atomic_write_json

    out_dir.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows)
    atomic_write_json(out_dir / "results.json", {"meta": meta, "rows": rows})
    md = f"# {title or 'fedrad fine-tuning'}\n\n" + "".join(f"- {k}: {v}\n" for k, v in meta.items()) + "\n" + table
    atomic_write_bytes(out_dir / "results.md", md.encode("utf-8"))
    plot_auc(rows, out_dir / "auc_vs_fraction.png", title)
    return table



__all__ = ["markdown_table", "plot_auc", "write_outputs"]
