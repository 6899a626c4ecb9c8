"""`fedrad finetune`: how much do the foundation weights save a site in labels?

A site verifies the bundle, then fits a classifier on 1-100 % of its labelled patients and reports test
ROC-AUC with a patient-level bootstrap 95 % CI, next to a randomly initialised backbone of the same
architecture (and optionally a second bundle). Splits and label subsampling are always by patient, so no
patient's images are on both sides and "10 % of labels" means 10 % of patients.

Modes: `linear` (logistic regression on frozen embeddings, the standard probe), `mlp` (small torch head on
frozen embeddings; the mode that supports sample-level DP cheaply), `full` (end to end, backbone lr 10x lower
than the head's). `--dp-epsilon` trains the mlp head or the whole network with Opacus DP-SGD.

Modules: data (labelled sets), splits, heads (features and fitted heads), metrics (ROC-AUC, bootstrap CI),
experiment (backbones x fractions), report (json/md/png), command (the CLI handler). torch is imported
lazily, so importing this package is cheap.
"""

from __future__ import annotations

from fedrad.client.evaluation.data import LabelledSet, binarise, load_data, load_folder, load_npz
from fedrad.client.evaluation.heads import embed_images, fit_full, fit_linear, fit_mlp
from fedrad.client.evaluation.metrics import auc_score, bootstrap_ci, macro_auc
from fedrad.client.evaluation.splits import holdout_split, patient_split, subsample_patients
from fedrad.client.tools.finetune.experiment import Arm, random_arm, run_experiment
from fedrad.client.tools.finetune.report import markdown_table, plot_auc, write_outputs

__all__ = ["Arm", "LabelledSet", "auc_score", "binarise", "bootstrap_ci", "embed_images", "fit_full", "fit_linear",
           "fit_mlp", "holdout_split", "load_data", "load_folder", "load_npz", "macro_auc", "markdown_table",
           "patient_split", "plot_auc", "random_arm", "run_experiment", "subsample_patients", "write_outputs"]
