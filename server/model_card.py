"""MODEL_CARD.md: what a released backbone is, what it was trained on and how, what it is for and not for.

Written by `fedrad release` beside manifest.json from the same run directory (run.json, summary.json,
metrics.jsonl) and the manifest just built, so the card and the signed numbers agree; its sha256 is listed
in the manifest, so the signature covers it. The coordinator knows only what crossed the wire: per-site image
counts and losses, never headers, so modalities and views are stated as not reported (each site's own
`fedrad scan` shows them). Fine-tuning AUCs appear when the operator passes a `fedrad finetune` results.json.

The card opens with Hugging Face front matter (licence, tags, metrics, the training data described without
dataset identifiers), written by `huggingface_hub.ModelCardData`, so `huggingface_hub.ModelCard.load` and the
Hub read it. Per-site counts are those the coordinator weighted by (`site_counts`), beside what each claimed.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from fedrad.common.bundle import CARD
from fedrad.server.run_log import site_labels

_RESULT_FIELDS = ("backbone", "mode", "fraction", "auc", "ci_low", "ci_high")
_RESULT_META = ("targets", "mode", "split", "seeds", "epochs", "dp", "ci")
MAX_RESULT_ROWS = 200


def read_finetune_results(path: Path) -> dict[str, Any]:
    """A `fedrad finetune` results.json ({"meta": {...}, "rows": [...]}); ValueError naming the file and what
    is wrong (exit 2), so a card never carries a number that was not a fine-tuning result."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--finetune-results {path}: no such file (the results.json `fedrad finetune` wrote)")
    if path.stat().st_size > 4 << 20:
        raise ValueError(f"--finetune-results {path}: larger than 4 MiB, not a fedrad results.json")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"--finetune-results {path}: not valid JSON ({str(exc)[:120]})") from None
    rows = data.get("rows") if isinstance(data, dict) else None
    if not isinstance(rows, list) or not rows or len(rows) > MAX_RESULT_ROWS:
        raise ValueError(f"--finetune-results {path}: no 'rows' list of 1-{MAX_RESULT_ROWS} results "
                         "(the results.json `fedrad finetune` wrote)")
    for n, row in enumerate(rows):
        if not isinstance(row, dict) or any(k not in row for k in _RESULT_FIELDS):
            raise ValueError(f"--finetune-results {path}: rows[{n}] lacks one of {', '.join(_RESULT_FIELDS)}")
        for key in ("fraction", "auc", "ci_low", "ci_high"):
            value = row[key]
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"--finetune-results {path}: rows[{n}].{key} is not a finite number")
    meta = data.get("meta") if isinstance(data.get("meta"), dict) else {}
    return {"meta": meta, "rows": rows}


def site_counts(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Node id -> {"claimed", "counted", "reason", "round"}: the images each site reported and those the
    coordinator weighted its update by, from the last round the site took part in.

    The one reader of the run's per-site counts (kept in one place so a change to what the coordinator
    records touches only this): a round's `sites[node].num_examples` is the count after the cap, and its
    `capped[node]` says why ("claimed N examples, counted as M ..."), the claim being read from that text.
    """
    out: dict[str, dict[str, Any]] = {}
    for row in sorted(rows, key=lambda r: int(r.get("round", 0))):
        capped = {str(k): str(v) for k, v in (row.get("capped") or {}).items()}
        rejected = {str(k) for k in (row.get("rejected") or {})}
        for node, record in (row.get("sites") or {}).items():
            node = str(node)
            if record.get("num_examples") is None or node in rejected:
                continue
            counted = float(record["num_examples"])
            reason = capped.get(node)
            claim = re.match(r"claimed ([0-9.eE+]+) examples", reason or "")
            out[node] = {"claimed": float(claim.group(1)) if claim else counted, "counted": counted,
                         "reason": reason, "round": int(row.get("round", 0))}
    return out


def _front_matter(manifest: dict[str, Any], counts: dict[str, dict[str, Any]], results: dict[str, Any] | None
                  ) -> str:
    """The YAML front matter, through huggingface_hub's ModelCardData (no dataset identifiers: the images
    stayed at the sites, so the data are described, not named)."""
    from huggingface_hub import EvalResult, ModelCardData

    p = manifest.get("privacy") or {}
    rel = manifest.get("release") or {}
    dp = str(p.get("differential_privacy", "none"))
    tags = ["fedrad", "federated-learning", "radiology", "medical-imaging", "grayscale", "feature-extraction",
            str(manifest.get("objective") or "contrastive")] + ([] if dp == "none" else ["differential-privacy"])
    name = f"fedrad-{manifest['model']}-run{rel.get('run_id')}-release{rel.get('sequence')}"
    evals = [EvalResult(task_type="image-classification", dataset_type="site-local-labelled-radiographs",
                        dataset_name="labelled radiographs of the site that ran fedrad finetune",
                        metric_type="roc_auc", metric_value=round(float(r["auc"]), 4),
                        metric_name=f"test ROC-AUC ({str(r['backbone'])[:40]}, {str(r['mode'])[:20]}, "
                                    f"{float(r['fraction']):.0%} labels)")
             for r in (results or {}).get("rows", [])]
    data = ModelCardData(
        license=manifest.get("license"), library_name="timm", pipeline_tag="image-feature-extraction", tags=tags,
        model_name=name, metrics=["roc_auc"] if evals else None, eval_results=evals or None,
        training_data={
            "description": "grayscale radiographs held at the consortium's sites; they never left the sites, "
                           "so no dataset identifier is given",
            "sites": len(counts), "images_counted": int(sum(c["counted"] for c in counts.values())),
            "images_claimed": int(sum(c["claimed"] for c in counts.values())),
            "modalities_and_views": "not recorded at the coordinator (each site's `fedrad scan` shows them)"},
        privacy={"differential_privacy": dp, "epsilon": p.get("epsilon"), "delta": p.get("delta"),
                 "unit": p.get("unit"), "secure_aggregation": bool(p.get("secure_aggregation"))},
        input={"channels": manifest["in_chans"], "size": manifest["input_size"], "intensity": manifest["intensity"]},
    )
    return f"---\n{data.to_yaml()}\n---\n"


def model_card(manifest: dict[str, Any], run: dict[str, Any], summary: dict[str, Any],
               rows: list[dict[str, Any]], results: dict[str, Any] | None = None) -> str:
    """The card's Markdown with its front matter, from the manifest and the run directory's files (see the
    module docstring); parsed once by `huggingface_hub.ModelCard`, so a card the Hub cannot read is never signed."""
    from huggingface_hub import ModelCard

    config: dict[str, Any] = dict(run.get("config") or {})
    rel = manifest.get("release") or {}
    counts = site_counts(rows)
    parts = [
        _front_matter(manifest, counts, results),
        f"# Model card: {manifest['model']} radiograph backbone (fedrad run {rel.get('run_id')}, "
        f"release #{rel.get('sequence')})\n",
        f"Released {manifest['created']} by the consortium key {manifest['signer']['public_key_sha256'][:16]}...; "
        f"this file's sha256 is listed in manifest.json, which manifest.sig signs (`fedrad verify` checks both).\n",
        _model_section(manifest, config),
        _training_section(manifest, config, summary, rows),
        _sites_section(rows, counts, manifest.get("privacy") or {}),
        _privacy_section(manifest.get("privacy") or {}),
        _evaluation_section(results),
        _USE_AND_LIMITS,
        _load_section(manifest),
        f"## License\n\nThe weights are released under `{manifest.get('license')}`.\n",
    ]
    return str(ModelCard("\n".join(parts)))


def _load_section(m: dict[str, Any]) -> str:
    entry = m.get("config") or {}
    timm_line = ("`config.json` (timm): `timm.create_model(\"local-dir:BUNDLE\", pretrained=True)` rebuilds the "
                 "backbone and `timm.data.resolve_data_config(model=model)` gives its preprocessing (1 channel in "
                 "[0, 1], no mean/std, longer side resized bilinearly and zero-padded to a square)."
                 if entry.get("file") else f"No timm `config.json`: {entry.get('reason') or 'older bundle'}.")
    return (f"## How to load\n\n```python\n{m['load_with']}\n```\n\n{timm_line}\n\n"
            "Or `fedrad.load_backbone(BUNDLE, pubkey='consortium.pub')`, which verifies the bundle first; "
            "`fedrad export --format monai-bundle|onnx|torchscript BUNDLE --pubkey consortium.pub --out DIR` "
            "writes a verified MONAI bundle, ONNX graph or TorchScript module.\n")


def _model_section(m: dict[str, Any], config: dict[str, Any]) -> str:
    return ("## Model\n\n"
            f"- Architecture: `{m['model']}` (timm), {m['in_chans']} input channel, no classifier head "
            f"(`num_classes=0`), normalisation: {m['norm']} norm\n"
            f"- Input: {m['input_size']} x {m['input_size']} px, {m['intensity']}\n"
            f"- Weights: `{m['weights']['file']}`, {m['weights']['bytes']} bytes, sha256 {m['weights']['sha256']}\n"
            f"- fedrad {m.get('fedrad_version')}\n")


def _training_section(m: dict[str, Any], config: dict[str, Any], summary: dict[str, Any],
                      rows: list[dict[str, Any]]) -> str:
    planned = summary.get("rounds_planned") or config.get("num-server-rounds")
    stopped = summary.get("stopped")
    lines = ["## Training\n",
             f"- Objective: {m['objective']} ({_positives(m.get('objective'), config)})",
             f"- Rounds: {m['rounds']}" + (f" of {planned} planned" if planned else "")
             + (f" ({stopped})" if stopped else ""),
             f"- Aggregation: {summary.get('aggregation') or m.get('strategy')}; local steps per round "
             f"{config.get('local-steps', '?')}, batch size {config.get('batch-size', '?')}",
             f"- Images seen in local steps (all sites, all rounds): {m.get('examples_seen')}"]
    curve = [(r.get("round"), r.get("train_loss"), r.get("eval_loss")) for r in rows]
    if curve:
        shown = curve if len(curve) <= 12 else [*curve[:6], None, *curve[-5:]]
        lines += ["", "| round | train loss (weighted mean) | held-out loss |", "|---|---|---|"]
        for point in shown:
            lines.append("| ... | | |" if point is None else f"| {point[0]} | {_num(point[1])} | {_num(point[2])} |")
    return "\n".join(lines) + "\n"


def _positives(objective: str | None, config: dict[str, Any]) -> str:
    """What the objective treated as the same image, in words (header fields are read at the sites only)."""
    from fedrad.common.losses import REGISTRY

    cls = REGISTRY.get(str(objective or "").lower())
    kind = getattr(cls, "positives", "augment")
    if kind == "labels":
        return (f"supervised-contrastive on header fields {config.get('label-fields', '?')}, read at each site; "
                "their values never left it")
    if kind == "patient":
        return "positives are a patient's other images, grouped at each site; no ids left it"
    return "self-supervised: positives are two augmentations of one image; no labels used"


def _sites_section(rows: list[dict[str, Any]], counts: dict[str, dict[str, Any]], privacy: dict[str, Any]
                   ) -> str:
    """One line per site: its enrolled name (else "site N"), the images it claimed and those its update was
    weighted by (with why they differ), its weight share, rounds taken part, last loss and, with DP, its ε."""
    labels = site_labels(rows)
    rounds: dict[str, int] = {}
    last_loss: dict[str, Any] = {}
    epsilon: dict[str, float] = {}  # dp=sample: each site's image-level ε so far, as it reported it
    for row in rows:
        for node, record in (row.get("sites") or {}).items():
            node = str(node)
            if record.get("dp_epsilon") is not None:
                epsilon[node] = float(record["dp_epsilon"])
            if record.get("train_loss") is not None:
                last_loss[node] = record["train_loss"]
                if node not in (row.get("rejected") or {}):
                    rounds[node] = rounds.get(node, 0) + 1
    if not labels:
        return "## Sites\n\nNo per-site record in metrics.jsonl.\n"
    epsilon = _site_epsilons(labels, epsilon, privacy)
    eps_head, eps_sep = (" ε |", "---|") if epsilon else ("", "")
    total = sum(c["counted"] for c in counts.values()) or 1.0
    lines = ["## Sites\n", "| site | images reported | images counted (weight) | weight share | rounds aggregated "
             "| last train loss |" + eps_head, "|---|---|---|---|---|---|" + eps_sep]
    notes = []
    for node, label in labels.items():
        c = counts.get(node)
        claimed, counted = (f"{c['claimed']:.0f}", f"{c['counted']:.0f}") if c else ("-", "-")
        share = f"{c['counted'] / total:.1%}" if c else "-"
        eps = (f" {_num(epsilon.get(node))} |" if epsilon else "")
        lines.append(f"| {label} | {claimed} | {counted} | {share} | {rounds.get(node, 0)} | "
                     f"{_num(last_loss.get(node))} |" + eps)
        if c and c["reason"]:
            notes.append(f"- {label}, round {c['round']}: {c['reason']}")
    lines += ["", f"{len(labels)} sites; {sum(c['claimed'] for c in counts.values()):.0f} images reported, "
              f"{sum(c['counted'] for c in counts.values()):.0f} counted in aggregation (each site's last round). "
              "The coordinator weights an update by the images counted: a claim far above the round's median is "
              "cut down to a cap, so one site cannot outweigh the others by its word alone."]
    if notes:
        lines += ["", "Counts cut by the coordinator:", *notes]
    lines += ["",
              "Site names are those the operator enrolled the sites' keys under; \"site N\" marks a site enrolled "
              "without a name.",
              "",
              "Modalities and views: not recorded. Sites send the coordinator only model weights and numeric "
              "training metrics, never header values; each site's `fedrad scan` lists the modalities, views and "
              "body parts of its own images."]
    return "\n".join(lines) + "\n"


def _site_epsilons(labels: dict[str, str], reported: dict[str, float], privacy: dict[str, Any]) -> dict[str, float]:
    """Each site's ε where DP was on: the site's own report (dp=sample), else the run's per-site accounting,
    else the run's ε for every site (dp=client protects each site as a whole with one ε)."""
    if privacy.get("differential_privacy", "none") == "none":
        return {}
    out = dict(reported)
    for node, eps in (privacy.get("site_epsilons") or {}).items():
        out.setdefault(str(node), float(eps))
    if isinstance(privacy.get("epsilon"), int | float):
        for node in labels:
            out.setdefault(node, float(privacy["epsilon"]))
    return out


def _privacy_section(p: dict[str, Any]) -> str:
    dp = p.get("differential_privacy", "none")
    lines = ["## Privacy\n",
             f"- Differential privacy: {dp}" + ("" if dp == "none" else
                                                f" (epsilon {p.get('epsilon')}, delta {p.get('delta')})"),
             f"- Secure aggregation (SecAgg+): {'on' if p.get('secure_aggregation') else 'off'}"]
    for key, name in (("mechanism", "Mechanism"), ("unit", "Protected unit"), ("accountant", "Accountant"),
                      ("formal_guarantee", "Formal guarantee")):
        if key in p:
            lines.append(f"- {name}: {p[key]}")
    if p.get("statement"):
        lines.append(f"\n{p['statement']}")
    lines.append("\nImages and DICOM headers never left the sites; only model weights and the numbers above did.")
    return "\n".join(lines) + "\n"


def _evaluation_section(results: dict[str, Any] | None) -> str:
    if not results:
        return ("## Evaluation\n\nNo fine-tuning results were attached to this release (`fedrad release "
                "--finetune-results results.json`); run `fedrad finetune` on your own labelled data before use.\n")
    meta = results.get("meta") or {}
    lines = ["## Evaluation (label-efficiency fine-tuning, `fedrad finetune`)\n"]
    lines += [f"- {k}: {_plain(meta[k])}" for k in _RESULT_META if k in meta]
    lines += ["", "| backbone | mode | labels | test ROC-AUC | 95% CI |", "|---|---|---|---|---|"]
    for r in results["rows"]:
        lines.append(f"| {str(r['backbone'])[:60]} | {str(r['mode'])[:20]} | {float(r['fraction']):.0%} | "
                     f"{float(r['auc']):.3f} | [{float(r['ci_low']):.3f}, {float(r['ci_high']):.3f}] |")
    lines.append("\nMeasured on the labelled data of the site that ran `fedrad finetune`; another site's data may "
                 "give other numbers.")
    return "\n".join(lines) + "\n"


_USE_AND_LIMITS = """## Intended use

- A starting point for grayscale radiograph models at the consortium's sites: frozen features with a linear
  or MLP probe, or full fine-tuning, on a task the site labels and validates itself (`fedrad finetune`).
- Research and development. It is not a medical device, makes no diagnosis and has no clinical validation.

## Limits

- It learned from the sites' images listed above only: other scanners, populations, protocols, body parts or
  modalities may be represented poorly, and features may encode site or scanner as well as anatomy.
- Self-supervised features are not predictions: any use needs labelled local data, a held-out test and a check
  for bias across patient groups before it informs a decision.
- Without differential privacy the weights may leak information about training images (membership inference,
  model inversion); with it, the guarantee is the epsilon above for the stated unit, nothing more.
"""


def _plain(value: Any) -> str:
    """A results.json meta value in one short line (lists joined by commas)."""
    text = ", ".join(map(str, value)) if isinstance(value, list) else str(value)
    return text[:200]


def _num(value: Any) -> str:
    return "-" if value is None else f"{float(value):.4f}"


__all__ = ["CARD", "model_card", "read_finetune_results", "site_counts"]
