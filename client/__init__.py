"""The site's code, by lifecycle (each sub-package imports only the ones below it; tests/test_layers.py):

- site/: the site's stored data and state (image store, scan, ingest, policy, privacy budget, releases);
- training/: local training (trainer, DP-SGD engines, multi-process rounds, centralised pretraining);
- evaluation/: the linear-probe evaluation fine-tuning and the round monitor share;
- app/: the per-message node app (ClientApp, handlers, the mods guarding what leaves);
- tools/: offline tools on released weights (fine-tuning, embeddings, exports);
- runtime/: the long-lived site process that owns the SuperNode and its warm worker.
"""
