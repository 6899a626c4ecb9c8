"""fedrad's commands as typed Python functions, one module per audience; the `fedrad` command line
(fedrad.deploy.cli) and the Python API (`import fedrad`) both call them.

    site       hospital IT: scan, ingest, node, verify, releases, audit, policy
    operator   the consortium: coordinator, run, runs, log, sites, stop, keys, release, publish, certs, dashboard,
               tensorboard, demo
    finetune   a fine-tuning site: finetune, embed, export, pretrain
    errors     what they raise instead of returning exit codes

Each function takes keyword options named like the command's long options (`image_size` for `--image-size`),
returns what it made (a path, a report) and raises `errors.BadInput` / `errors.Refused` (or a ValueError /
FileNotFoundError naming the bad input) when it cannot.
"""
