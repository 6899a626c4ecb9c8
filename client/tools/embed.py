"""`fedrad embed`: a site's images as foundation-model embeddings, for its own analyses, plus a t-SNE view.

Writes `embeddings.npy` (float32 [N, D]), `index.csv` (row, path relative to the data folder, salted patient
key, label columns; never a raw patient ID) and `tsne.png` coloured by `--color-by`, each atomically.
A quick t-SNE coloured by site, view or finding shows at a glance what the features separate.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

import numpy as np


def _folder_rows(data_dir: Path, size: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
    from fedrad.client.site.site_data import load_site

    site = load_site(data_dir, size, progress=False)
    root = data_dir.resolve()
    rows = []
    for i, p in enumerate(site.paths):
        try:
            rel = os.path.relpath(p, root)
        except ValueError:
            rel = Path(p).name
        row: dict[str, Any] = {"row": i, "path": rel, "patient_key": site.patient_keys[i]}
        row.update({k: v[i] for k, v in site.labels.items()})
        rows.append(row)
    images = site.as_float(np.arange(len(site))).numpy()[:, 0] if len(site) else np.zeros((0, size, size))
    return images, rows


def _npz_rows(path: Path, size: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
    from fedrad.client.evaluation.data import load_npz

    ds = load_npz(path, size)
    split = np.empty(len(ds), dtype=object)
    for name, idx in (ds.split or {}).items():
        split[idx] = name
    rows = [{"row": i, "path": f"{split[i]}/{i}", "split": split[i],
             "label": ",".join(t for k, t in enumerate(ds.targets) if ds.y[i, k] > 0.5) or "negative"}
            for i in range(len(ds))]
    return ds.images, rows


def tsne_plot(emb: np.ndarray, colours: list[str] | None, path: Path, title: str, seed: int = 0) -> Path:
    """2-D t-SNE of the embeddings (PCA init, perplexity scaled to N), one colour per label value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    from fedrad.common.atomic import atomic_write

    n = len(emb)
    fig, ax = plt.subplots(figsize=(6, 5))
    if n >= 5:
        perplexity = float(max(2.0, min(30.0, (n - 1) / 3.0)))
        xy = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(
            emb.astype(np.float64))
        values = colours or ["all"] * n
        for v in sorted(set(values)):
            m = np.array([c == v for c in values])
            ax.scatter(xy[m, 0], xy[m, 1], s=8, alpha=0.7, label=str(v) or "(none)")
        if len(set(values)) <= 20:
            ax.legend(fontsize=7, markerscale=2)
    else:
        ax.text(0.5, 0.5, f"{n} images: too few for t-SNE", ha="center")
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=120))
    plt.close(fig)
    return path


def write_index(path: Path, rows: list[dict[str, Any]]) -> Path:
    from fedrad.common.atomic import atomic_write_bytes

    cols = list(dict.fromkeys(k for r in rows for k in r)) or ["row", "path"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return atomic_write_bytes(path, buf.getvalue().encode("utf-8"))


def embed_folder(backbone, manifest: dict[str, Any], data: str | os.PathLike[str], out: str | os.PathLike[str],
                 color_by: str | None = None) -> Path:
    """Embed every usable image of `data` (folder or .npz) with a loaded backbone; write npy + index + t-SNE
    into `out` and return it."""
    from fedrad.client.evaluation.heads import embed_images
    from fedrad.common.atomic import atomic_write

    size = int(manifest.get("input_size") or 64)
    data = Path(data)
    if data.suffix == ".npz":
        if not data.is_file():
            raise FileNotFoundError(f"--data {data}: no such file")
        images, rows = _npz_rows(data, size)
    else:
        if not data.is_dir():
            raise FileNotFoundError(f"--data {data}: no such folder")
        images, rows = _folder_rows(data, size)
    if not rows:
        raise ValueError(f"{data}: no usable images")
    if color_by and color_by not in rows[0]:
        raise ValueError(f"--color-by {color_by!r}: not a column (have {', '.join(rows[0])})")
    emb = embed_images(backbone, images, size)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    def save(p: Path) -> None:
        with open(p, "wb") as f:  # a file object: np.save on a path would append ".npy" to the temp name
            np.save(f, emb.astype(np.float32))

    atomic_write(out / "embeddings.npy", save)
    write_index(out / "index.csv", rows)
    colours = [str(r.get(color_by, "")) for r in rows] if color_by else None
    tsne_plot(emb, colours, out / "tsne.png", f"{manifest.get('model')} embeddings"
              + (f" by {color_by}" if color_by else ""))
    print(f"fedrad embed: {emb.shape[0]} images x {emb.shape[1]} features -> {out / 'embeddings.npy'}, "
          f"{out / 'index.csv'}, {out / 'tsne.png'}")
    return out


__all__ = ["embed_folder", "tsne_plot", "write_index"]
