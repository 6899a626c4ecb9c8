"""The `fedrad` command: a thin shell over the typed command functions of fedrad.deploy.commands
(site, operator, finetune), for hospital IT, consortium operators and fine-tuning sites.

Each subcommand parses its options and calls one function with them as keywords (`_lazy("site:scan")`), which
it imports only when the subcommand runs, so `fedrad --help` and the Flower processes that import this package
stay fast. The functions raise instead of returning exit codes; `main` turns errors.BadInput and the other
bad-input errors into one line and exit 2, errors.Refused into its line and exit 1 (or the code it carries).

This is the only module that imports argparse (tests/test_cli_shell.py checks it); it also parses the site
runtime's own command line (`parse_runtime_args`, for `python -m fedrad.deploy.runtime_entry`).

Why argparse and not typer (issue 24 suggested typer, which flwr installs): typer 0.20.1 without rich drops the
help text of positional arguments (`fedrad scan --help` shows `[DATA]` with no description) and prints usage
errors as three lines; `fedrad node --config` also needs parser defaults it can set from a file. The shell is
small either way, since every behaviour lives in the command functions.

Over 500 lines because it is the one parser of every audience's commands and their help texts.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from fedrad.common.losses import OBJECTIVES

# Flower phones home and checks for updates unless told not to; fedrad runs on closed networks.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

EPILOG = """\
hospital IT:   fedrad scan /data/dicom        (see what would be used; nothing is sent)
               fedrad node --data /data/dicom --superlink coordinator:8000 \\
                 --certs fedrad-certs/sites/site-a --consortium-key consortium.pub
operator:      fedrad keys generate --out consortium; fedrad coordinator
               fedrad run --superlink 127.0.0.1:8000 --sign-key consortium.key
               fedrad release RUN_DIR --key consortium.key --publish --superlink 127.0.0.1:8000
               fedrad runs (status, round, loss of each run); fedrad stop RUN
fine-tuning:   fedrad releases --state-dir S; fedrad finetune --release latest --state-dir S --pubkey P \\
                 --data DIR --labels CSV
everything at once on this machine:  fedrad demo
"""


EXIT_CODES = """
exit codes:    0 done; 1 refused or failed (bundle verification, a run that did not finish, an existing key);
               2 bad input (a missing file, a bad value: one line names it); 130 interrupted (Ctrl-C)
"""


COMMANDS = "fedrad.deploy.commands"
SHELL_ONLY = {"command", "func", "version", "log_format", "certs_cmd", "keys_cmd", "policy_cmd"}


def _lazy(target: str):
    """Return a handler that imports `AUDIENCE:function` of fedrad.deploy.commands only when the subcommand runs
    and calls it with the parsed options as keywords (a function with **options also gets every other option)."""

    def run(args: argparse.Namespace) -> int:
        import inspect

        module, name = target.split(":")
        func = getattr(importlib.import_module(f"{COMMANDS}.{module}"), name)
        params = inspect.signature(func).parameters
        rest = any(p.kind is p.VAR_KEYWORD for p in params.values())
        kwargs = {k: v for k, v in vars(args).items() if k not in SHELL_ONLY and (rest or k in params)}
        func(**kwargs)
        return 0

    return run


def _add_recipe_options(parser: argparse.ArgumentParser,
                        title: str = "training recipe (as `fedrad run -c KEY=VALUE`)") -> None:
    """One `--key` option per recipe field (fedrad.common.recipe.Recipe): its type, its default and its help from
    the declaration, so `fedrad pretrain` takes every switch a federated run takes, under the same name."""
    from fedrad.common.recipe import NORM_NAMES, OPTIMIZER_NAMES, Recipe

    def choices(kind: str | None) -> tuple[str, ...] | None:
        if kind == "objectives":  # read now: a test (or plugin) may register one after this module was imported
            from fedrad.common.losses import OBJECTIVES

            return tuple(OBJECTIVES)
        if kind == "lr_schedules":
            from fedrad.common.lr_schedule import LR_SCHEDULES

            return LR_SCHEDULES
        return {"optimizers": OPTIMIZER_NAMES, "norms": NORM_NAMES, None: None}[kind]

    group = parser.add_argument_group(title)
    for name in Recipe.recipe_fields():
        default, help_line, kind = Recipe.field_help(name)
        kw: dict = {"default": default, "help": help_line, "dest": name}
        if isinstance(default, bool):
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = type(default)
            allowed = choices(kind)
            if allowed:
                kw["choices"] = allowed
        group.add_argument("--" + name.replace("_", "-"), **kw)


def recipe_defaults_text() -> str:
    """`fedrad run --help`'s list of the training recipe's keys and defaults: the same declaration and values as
    `fedrad pretrain --help` (and pyproject's app config, tests/test_recipe_defaults.py)."""
    from fedrad.common.recipe import Recipe

    pairs = []
    for name in Recipe.recipe_fields():
        default = Recipe.field_help(name)[0]
        shown = str(default).lower() if isinstance(default, bool) else (repr(default) if default == "" else default)
        pairs.append(f"{name.replace('_', '-')}={shown}")
    return ("training recipe run-config keys and their defaults (the same as `fedrad pretrain --help`; set one with "
            "-c KEY=VALUE): " + ", ".join(pairs))


def _add_release_source(p) -> None:
    """`--release latest|ID` and `--state-dir` for finetune/embed/export (BUNDLE becomes optional)."""
    p.add_argument("--release", default=None, metavar="latest|ID",
                   help="use a release this site's node received (from --state-dir) instead of a BUNDLE folder; "
                        "still verified with --pubkey (default: BUNDLE)")
    p.add_argument("--state-dir", default=None, help="the site's state folder, for --release (no default)")


def _add_publish_options(p, superlink_default: str | None) -> None:
    p.add_argument("--superlink", default=superlink_default, help="coordinator address HOST[:PORT]"
                   + ("" if superlink_default else " (needed with --publish; no default)"))
    p.add_argument("--certs", default=None, help="folder holding the consortium CA, ca.pem (default: no TLS)")
    p.add_argument("--releases", default="fedrad-releases",
                   help="the coordinator's folder of published releases (the list offered to sites)")
    p.add_argument("--linger", type=float, default=0.0, metavar="SECONDS",
                   help="keep serving sites that connect for this long (default 0: the sites connected now)")


def _add_format(p, what: str = "output") -> None:
    p.add_argument("--format", default="table", choices=["table", "json"],
                   help=f"{what} (json: one JSON document on stdout, times ISO 8601, for piping)")


SUPERLINK_HELP = "coordinator address HOST[:PORT] (port 8000 if left out)"


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Examples kept as written, and every option's default shown, unless its help already says it in words
    (a default of None is "not given", which only the help text can explain; a flag is off by default)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text.lower() or action.default is None or action.default is False
                or action.default == argparse.SUPPRESS or action.required):
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """Every (sub)command parser formats its help with `HelpFormatter`."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def _add_scan(sub) -> None:
    p = sub.add_parser("scan", help="inventory a folder of DICOMs (or PNG+CSV), or a PACS, a site would train on")
    p.add_argument("data", nargs="?", default=None, help="folder to walk recursively (any file names, .dcm or not)")
    _add_source(p)
    p.add_argument("--json", dest="json_out", default=None, help="where to write the inventory JSON "
                   "(default: <data>/.fedrad-scan.json if writable, else ./fedrad-scan.json)")
    p.add_argument("--decode", action=argparse.BooleanOptionalAction, default=True,
                   help="decode pixels to prove each image is usable (default on)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--max-pixels", type=int, default=64 << 20,
                   help="largest image a header may declare (rows x columns x frames x samples) before the file is "
                   "skipped as too-large, undecoded (a site policy's data.max_megapixels sets it for the node)")
    p.add_argument("--policy", default=None, help="site policy file whose [data] rules (modalities, burned-in "
                   "annotation) the inventory applies (default: the built-in policy)")
    _add_format(p, "what is printed: the inventory as a table, or the inventory JSON itself")
    p.set_defaults(func=_lazy("site:scan"))


def _add_source(p) -> None:
    """A PACS as the site's data (scan and node): where, what, how fast, and with which credentials."""
    g = p.add_argument_group("PACS source (instead of a folder)")
    g.add_argument("--source", default=None, metavar="URL",
                   help="dicomweb+https://HOST/dicom-web (QIDO-RS + WADO-RS) or dimse://CALLED_AET@HOST:PORT "
                   "(C-FIND + C-GET); default: none, the data is a folder")
    g.add_argument("--query", action="append", default=[], metavar="KEY=V1,V2",
                   help="filter, repeatable: Modality=CR,DX  BodyPartExamined=CHEST (default: every instance)")
    g.add_argument("--since", default=None, metavar="YYYY-MM-DD",
                   help="studies on or after this date (default: no lower bound)")
    g.add_argument("--until", default=None, metavar="YYYY-MM-DD",
                   help="studies on or before this date (default: no upper bound)")
    g.add_argument("--cache", default=None, help="site cache: decoded images, and the instances fetched from a "
                   "PACS (default: <data>/.fedrad-cache for a folder, ~/.cache/fedrad/pacs-<hash> for a PACS)")
    g.add_argument("--max-instances", type=int, default=None, help="most instances fetched per pull (default "
                   "1000; the next pull continues)")
    g.add_argument("--concurrency", type=int, default=None, help="parallel connections to the PACS (default 2)")
    g.add_argument("--rate", type=float, default=None, help="most requests per second to the PACS (default 20)")
    g.add_argument("--auth-file", default=None,
                   help="file holding USER:PASSWORD (HTTP basic) or 'bearer TOKEN' (default: no credentials)")
    g.add_argument("--auth-env", default=None, metavar="VAR",
                   help="environment variable holding the same (default: none)")
    g.add_argument("--ca-bundle", default=None,
                   help="CA bundle (PEM) for the PACS's TLS (verification is always on; default: the system CAs)")
    g.add_argument("--calling-aet", default=None, help="this site's AE title for DIMSE (default FEDRAD)")
    g.add_argument("--max-listed", type=int, default=None, help="most instances a PACS listing may name before "
                   "the pull stops with an error (default 100000; a PACS paging forever is stopped here)")


def _add_pretrain(sub) -> None:
    p = sub.add_parser("pretrain", help="centralised contrastive pretraining on one folder (baseline)")
    p.add_argument("data", help="DICOM folder, or PNG folder with manifest.csv")
    p.add_argument("--steps", type=int, default=100, help="optimiser steps in all")
    p.add_argument("--rounds", type=int, default=1, help="rounds the steps are split into, each at its round's "
                   "learning rate under --lr-schedule with a fresh optimiser, as a federated site trains")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--cache", default=None, help="decoded-image cache folder (default <data>/.fedrad-cache)")
    p.add_argument("--out", default="pretrained.safetensors",
                   help="weights file to write (checked before training: not a folder, writable)")
    _add_recipe_options(p)  # every recipe switch, with the defaults `fedrad run` uses (fedrad.common.recipe)
    p.set_defaults(func=_lazy("finetune:pretrain"))


def _add_federation(sub) -> None:
    p = sub.add_parser("coordinator", help="start the consortium's Flower SuperLink")
    p.add_argument("--host", default="127.0.0.1", help="address the SuperLink listens on (0.0.0.0: all)")
    p.add_argument("--port", type=int, default=8000, help="the SuperLink's one port (Fleet + Control API)")
    p.add_argument("--state", default="fedrad-coordinator", help="folder for the SuperLink database and logs")
    p.add_argument("--certs", default=None,
        help="folder from `fedrad certs init` (TLS + node auth; default: insecure, loopback only)")
    p.set_defaults(func=_lazy("operator:coordinator"))

    p = sub.add_parser("node", help="start a site's Flower SuperNode next to its DICOMs")
    p.add_argument("--config", default=None, metavar="NODE_TOML",
                   help="node settings file: `key = value` lines named like these options without the dashes "
                   "(data, superlink, certs, consortium-key, policy, state-dir, site-name, device, ...); options given "
                   "on the command line win (default: none)")
    p.add_argument("--data", default=None, help="the site's image folder (default: none; or --source URL for a PACS)")
    p.add_argument("--superlink", default="127.0.0.1:8000", help=SUPERLINK_HELP)
    _add_source(p)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--ddp-procs", type=int, default=1, metavar="N",
                   help="split each local round over N processes with torch.distributed (one per GPU with --device "
                   "cuda: NCCL; gloo on CPU); the site still sends one reply (default 1: one process)")
    p.add_argument("--keep-resident", action="store_true",
                   help="the warm worker keeps the model and the site images' memory maps between rounds "
                   "(node-config idle-release off: no rebuild per round, more idle memory; default: let go of them "
                   "after each message)")
    p.add_argument("--port", type=int, default=9094, help="local Runtime API port on 127.0.0.1 (unique per node)")
    p.add_argument("--labels", default=None, help="optional CSV of labels to keep site-local (default: none)")
    p.add_argument("--certs", default=None,
        help="site folder from `fedrad certs init`, e.g. fedrad-certs/sites/site-a (CA + node key; default: no TLS, "
                   "loopback only)")
    p.add_argument("--site-name", default=None, help="this site's folder under --certs/sites "
                   "(default: --certs is the site's own folder, named after the site)")
    p.add_argument("--no-scan", action="store_true", help="skip the inventory scan before joining")
    p.add_argument("--audit-dir", default=None,
                   help="log a description of every outgoing message (names, shapes, numbers) here "
                        "(default <state-dir>/audit)")
    p.add_argument("--policy", default=None, help="this site's policy file (`fedrad policy init`); default: the "
                   "built-in default policy")
    p.add_argument("--state-dir", default=None, help="the site's salt, DP ledger and audit, kept apart from the "
                   "cache (default $XDG_STATE_HOME/fedrad/<hash of --data>, i.e. ~/.local/state/fedrad/...)")
    p.add_argument("--consortium-key", default=None, metavar="CONSORTIUM_PUB",
                   help="the consortium's public key (consortium.pub): only runs it signed are run here "
                        "(required unless --allow-unsigned; no default)")
    p.add_argument("--allow-unsigned", action="store_true",
                   help="also run unsigned runs (local experiments only; still only this site's own code)")
    p.add_argument("--insecure", action="store_true",
                   help="allow plaintext to a coordinator that is not on this machine (no --certs)")
    p.add_argument("--fresh-process-per-message", action="store_true",
                   help="answer each message in a fresh process instead of the run's warm worker (slower; the "
                        "older runtime, kept as a fallback)")
    p.add_argument("--client-app", default="fedrad.client.app.client_app:app", metavar="MODULE:ATTR",
                   help="the ClientApp installed here that answers the coordinator (default: fedrad's)")
    p.add_argument("--client-app-dir", default=None,
        help="folder holding --client-app's module, if not installed (default: the installed package)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="INFO: one line per round at this site (steps, loss, images/s, ε); DEBUG adds Flower's "
                        "details, WARNING only problems")
    p.add_argument("--max-releases", type=int, default=None, help="most released models this site keeps; a "
                   "newer one is refused until an older one is removed (default 5)")
    p.add_argument("--max-release-gib", type=float, default=None, help="most GiB of released models kept (default 20)")
    p.set_defaults(func=_lazy("site:node"))

    p = sub.add_parser("run", help="submit a pretraining run to the coordinator and follow it",
                       epilog=recipe_defaults_text())
    p.add_argument("--superlink", default="127.0.0.1:8000", help=SUPERLINK_HELP)
    p.add_argument("--run-dir", default=None,
        help="where checkpoints, metrics and plots go (default: runs/<date-time>)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR",
        help="continue a run from its last checkpoint (default: a new run)")
    p.add_argument("--config", "-c", action="append", default=[],
                   help="run-config override KEY=VALUE (e.g. -c num-server-rounds=5) or a TOML file of such lines "
                   "(-c run.toml), repeatable; later values win (default: the app's pyproject defaults)")
    p.add_argument("--certs", default=None,
        help="folder holding the consortium CA, ca.pem (default: no TLS, loopback only)")
    p.add_argument("--sign-key", default=None, metavar="CONSORTIUM_KEY",
                   help="consortium private key (`fedrad keys generate`): signs the run so sites accept it "
                        "(default: unsigned; only --allow-unsigned sites run it)")
    p.add_argument("--valid-days", type=float, default=7.0, metavar="DAYS",
                   help="with --sign-key: the run must start by then (sites refuse to START it after this many "
                        "days; a run already started goes on to its last round); each signature is usable for "
                        "one run only (default: 7)")
    p.set_defaults(func=_lazy("operator:run"))

    p = sub.add_parser("runs", help="list the coordinator's runs: status, round, last loss (flwr ls)")
    p.add_argument("--superlink", default="127.0.0.1:8000", help=SUPERLINK_HELP)
    p.add_argument("--certs", default=None, help="folder holding the consortium CA, ca.pem (default: no TLS)")
    p.add_argument("--runs-dir", default="runs",
                   help="where `fedrad run` put the run directories (their metrics give round and loss)")
    p.set_defaults(func=_lazy("operator:runs"))

    p = sub.add_parser("stop", help="stop a run on the coordinator (flwr stop)")
    p.add_argument("run", metavar="RUN", help="the run id, as `fedrad runs` lists it")
    p.add_argument("--superlink", default="127.0.0.1:8000", help=SUPERLINK_HELP)
    p.add_argument("--certs", default=None, help="folder holding the consortium CA, ca.pem (default: no TLS)")
    p.set_defaults(func=_lazy("operator:stop"))

    p = sub.add_parser("demo", help="a real local consortium: 3 synthetic hospitals, SuperLink + 3 SuperNodes")
    p.add_argument("--workdir", default="fedrad-demo", help="folder for the sites, run directory and bundle")
    p.add_argument("--rounds", type=int, default=4, help="federated rounds")
    p.add_argument("--objective", default="simclr", choices=OBJECTIVES, help="self-supervised loss")
    p.add_argument("--secure", action="store_true", help="TLS + SuperNode authentication on loopback")
    p.add_argument("--config", "-c", action="append", default=[], help="extra run-config KEY=VALUE")
    p.set_defaults(func=_lazy("operator:demo"))


def _add_policy(sub) -> None:
    p = sub.add_parser("policy", help="the site's policy: what this node agrees to run, whatever the coordinator asks")
    ps = p.add_subparsers(dest="policy_cmd", required=True)
    i = ps.add_parser("init", help="write the commented default policy file")
    i.add_argument("path", nargs="?", default=None, help="where (default fedrad-site-policy.toml)")
    i.add_argument("--force", action="store_true", help="replace an existing file")
    i.set_defaults(func=_lazy("site:policy_init"))
    c = ps.add_parser("check", help="validate a policy file (errors name the line; exit 2)")
    c.add_argument("path", help="the policy file")
    c.add_argument("--ca", default=None,
        help="also check this CA certificate against coordinator.ca_sha256 (default: no CA check)")
    c.set_defaults(func=_lazy("site:policy_check"))


def _add_release(sub) -> None:
    p = sub.add_parser("keys", help="consortium signing keys")
    ks = p.add_subparsers(dest="keys_cmd", required=True)
    g = ks.add_parser("generate", help="make an Ed25519 signing key pair")
    g.add_argument("--out", default="fedrad-signing", help="path prefix: writes PREFIX.key (0600) and PREFIX.pub")
    g.set_defaults(func=_lazy("operator:keys_generate"))

    p = sub.add_parser("release", help="write a signed foundation-weights bundle from a run directory")
    p.add_argument("run_dir", help="the run directory `fedrad run` wrote")
    p.add_argument("--key", required=True, help="private signing key (from `fedrad keys generate`)")
    p.add_argument("--out", default=None, help="bundle folder (default RUN_DIR/release)")
    p.add_argument("--finetune-results", default=None, metavar="RESULTS_JSON",
                   help="results.json of `fedrad finetune`: its AUCs go into the bundle's MODEL_CARD.md "
                        "(default: the card says no evaluation is attached)")
    p.add_argument("--license", default=None, metavar="ID",
                   help="the weights' licence as the model card and timm config.json state it (a Hugging Face "
                        "licence id; default apache-2.0)")
    p.add_argument("--publish", action="store_true", help="then publish the bundle to the sites (signed "
                   "with --key; see `fedrad publish`)")
    _add_publish_options(p, None)
    p.set_defaults(func=_lazy("operator:release"))

    p = sub.add_parser("publish", help="send a signed bundle to every site over the consortium's connection")
    p.add_argument("bundle", help="the bundle folder (from `fedrad release`)")
    p.add_argument("--sign-key", required=True, metavar="CONSORTIUM_KEY",
                   help="consortium private key: signs the publish run (sites run only signed runs) and checks the "
                        "bundle before it is sent")
    _add_publish_options(p, "127.0.0.1:8000")
    p.set_defaults(func=_lazy("operator:publish"))

    p = sub.add_parser("releases", help="list the verified releases this site's node received")
    p.add_argument("--state-dir", required=True, help="the site's state folder (as `fedrad node` printed it)")
    p.add_argument("--pubkey", default=None, help="verify each again with this consortium.pub (default: list only)")
    _add_format(p)
    p.set_defaults(func=_lazy("site:releases"))

    p = sub.add_parser("verify", help="check a bundle's signature and the hashes of its weights and model card")
    p.add_argument("bundle", help="the bundle folder (from `fedrad release`)")
    p.add_argument("--pubkey", required=True, help="the consortium's public key (consortium.pub)")
    _add_release_policy(p)
    p.set_defaults(func=_lazy("site:verify"))

    p = sub.add_parser("finetune", help="label-efficiency fine-tuning of a bundle on a site's labelled set")
    p.add_argument("bundle", nargs="?", help="the bundle folder (from `fedrad release`), or give --release")
    _add_release_source(p)
    p.add_argument("--pubkey", default=None, help="verify the bundle first (required unless --insecure; no default)")
    p.add_argument("--insecure", action="store_true", help="skip signature verification")
    p.add_argument("--data", required=True, help="DICOM folder, PNG folder, or a .npz (MedMNIST layout)")
    p.add_argument("--labels", default=None,
        help="CSV of labels (file or SOPInstanceUID -> label columns; default: the labels inside --data)")
    p.add_argument("--target", default=None,
        help="label column(s), comma separated (multi-label if several; default: every label column)")
    p.add_argument("--test-data", default=None, metavar="OTHER",
                   help="test on this other labelled set (folder or .npz) instead of a held-out part of --data: "
                   "the probe trains on --data, out-of-distribution as in REMEDIS (default: a patient split of --data)")
    p.add_argument("--test-labels", default=None, help="labels CSV for --test-data (default: the labels inside it)")
    p.add_argument("--mode", default="linear", choices=["linear", "mlp", "full"],
                   help="linear probe, MLP head, or full fine-tuning")
    p.add_argument("--fractions", default="0.1,1.0", help="label fractions to train on, comma separated")
    p.add_argument("--seeds", type=int, default=1, help="repeats per fraction (for CIs)")
    p.add_argument("--compare", default=None, help="a second bundle to compare against (the --expect-run/"
                   "--min-* checks apply to BUNDLE only; default: random-init only)")
    p.add_argument("--dp-epsilon", type=float, default=None,
        help="fine-tune with DP-SGD to this epsilon (default: no DP)")
    p.add_argument("--dp-delta", type=float, default=1e-5, help="DP delta with --dp-epsilon")
    p.add_argument("--epochs", type=int, default=20, help="training epochs per fraction and seed")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--out", default="finetune-results", help="results folder (JSON, CSV, plot)")
    _add_release_policy(p)
    p.set_defaults(func=_lazy("finetune:finetune"))

    p = sub.add_parser("embed", help="write embeddings (npy + CSV) and a t-SNE plot for a folder")
    p.add_argument("bundle", nargs="?", help="the bundle folder (from `fedrad release`), or give --release")
    _add_release_source(p)
    p.add_argument("--pubkey", default=None, help="verify the bundle first (required unless --insecure; no default)")
    p.add_argument("--insecure", action="store_true", help="skip signature verification")
    p.add_argument("--data", required=True, help="DICOM folder, PNG folder, or a .npz (MedMNIST layout)")
    p.add_argument("--color-by", default=None, help="label column to colour the t-SNE plot (default: one colour)")
    p.add_argument("--out", default="embeddings", help="output folder")
    _add_release_policy(p)
    p.set_defaults(func=_lazy("finetune:embed"))

    from fedrad.client.tools.exporters import FORMATS

    p = sub.add_parser("export", help="write a verified release as a MONAI bundle, an ONNX graph or TorchScript")
    p.add_argument("bundle", nargs="?", help="the release folder (from `fedrad release`), or give --release")
    _add_release_source(p)
    p.add_argument("--format", required=True, choices=FORMATS, help="what to write")
    p.add_argument("--pubkey", required=True, help="consortium public key: the release is verified first")
    p.add_argument("--out", required=True, help="output folder (created)")
    _add_release_policy(p)
    p.set_defaults(func=_lazy("finetune:export"))


def _add_release_policy(p) -> None:
    """What a site insists on beyond a valid signature: refuse an older bundle signed by the same key."""
    p.add_argument("--expect-run", default=None, metavar="RUN_ID",
                   help="refuse a bundle not released from this run (run id or run key, as `verify` prints; "
                        "default: any run)")
    p.add_argument("--min-sequence", type=int, default=None, metavar="N",
                   help="refuse a bundle whose release number within its run is below N (default: any)")
    p.add_argument("--min-created", default=None, metavar="DATE",
                   help="refuse a bundle signed before DATE (UTC; 2026-01-31 or 2026-01-31T12:00:00Z; default: any)")


def _add_security(sub) -> None:
    p = sub.add_parser("certs", help="consortium CA, coordinator TLS certificate and site keys")
    cs = p.add_subparsers(dest="certs_cmd", required=True)
    i = cs.add_parser("init", help="make a CA, a coordinator certificate and per-site node keys")
    i.add_argument("--out", default="fedrad-certs", help="output folder (mode 0700)")
    i.add_argument("--sites", default="site-a,site-b,site-c", help="site names, comma separated")
    i.add_argument("--hosts", default="localhost,127.0.0.1,::1", help="coordinator DNS names / IPs (SANs)")
    i.set_defaults(func=_lazy("operator:certs_init"))
    a = cs.add_parser("add-site", help="add a site's node key pair to an existing consortium (CA unchanged)")
    a.add_argument("name", help="the new site's name (its folder under --certs/sites)")
    a.add_argument("--certs", default="fedrad-certs", help="the consortium folder from `fedrad certs init`")
    a.set_defaults(func=_lazy("operator:certs_add_site"))
    r = cs.add_parser("register", help="enrol a site's public key with the coordinator")
    r.add_argument("pubkey", help="the site's node public key file")
    r.add_argument("--superlink", default="127.0.0.1:8000", help=SUPERLINK_HELP)
    r.add_argument("--certs", required=True, help="folder holding the consortium CA")
    r.add_argument("--site-name", default=None, help="the name the coordinator shows for this site in logs, "
                   "metrics and plots (default: the key's folder, e.g. site-a for sites/site-a/node.pub)")
    r.set_defaults(func=_lazy("operator:certs_register"))


def _add_console(sub, parser) -> None:
    """The operator's console (issue 28): detach and re-attach runs, list sites, the dashboard, the site's audit."""
    parser.add_argument("--log-format", default=None, choices=["text", "json"], help="log lines of fedrad and "
                        "of the processes it starts: text (ISO time, level) or JSON lines (default: "
                        "$FEDRAD_LOG_FORMAT, else text)")
    run, runs = sub.choices["run"], sub.choices["runs"]
    run.add_argument("--detach", action="store_true", help="return once the coordinator accepted the run (prints "
                     "its id; re-attach with `fedrad log RUN --follow`)")
    _add_format(runs)
    p = sub.add_parser("log", help="the log of a run at the coordinator; --follow re-attaches until it ends")
    p.add_argument("run", metavar="RUN", help="the run id, as `fedrad run --detach` or `fedrad runs` prints it")
    p.add_argument("--follow", "-f", action="store_true",
                   help="stream until the run ends; exit 0 if it completed, 1 if it failed or was stopped")
    p.add_argument("--superlink", default="127.0.0.1:8000", help=SUPERLINK_HELP)
    p.add_argument("--certs", default=None, help="folder holding the consortium CA, ca.pem (default: no TLS)")
    p.set_defaults(func=_lazy("operator:log"))
    p = sub.add_parser("sites", help="the sites enrolled at the coordinator, connected or not (flwr supernode list)")
    p.add_argument("--superlink", default="127.0.0.1:8000", help=SUPERLINK_HELP)
    p.add_argument("--certs", default=None, help="folder holding the consortium CA, ca.pem (default: no TLS)")
    p.add_argument("--runs-dir", default="runs", help="run directories: the sites' names, images and rejections")
    p.add_argument("--format", default="table", choices=["table", "json"], help="output (json: ISO 8601 times)")
    p.set_defaults(func=_lazy("operator:sites"))
    p = sub.add_parser("dashboard", help="read-only web dashboard of the runs and sites, on the coordinator host")
    p.add_argument("--runs-dir", default="runs", help="where `fedrad run` puts the run directories")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (beyond loopback only with TLS and a "
                   "token)")
    p.add_argument("--port", type=int, default=8050, help="port to listen on")
    p.add_argument("--superlink", default=None, help="coordinator address, for run status and connected sites "
                   "(default: none, the run directories only)")
    p.add_argument("--certs", default=None, help="folder holding the consortium CA, ca.pem (default: no TLS)")
    p.add_argument("--token-file", default=None, help="file (mode 0600) holding the access token (default: "
                   "$FEDRAD_DASHBOARD_TOKEN, else no token: loopback only)")
    p.add_argument("--allow-host", action="append", default=None, metavar="NAME", help="another name browsers "
                   "reach it by (repeatable; default: loopback and --host only)")
    p.add_argument("--tls-cert", default=None, help="HTTPS certificate (PEM; default: plain HTTP on loopback)")
    p.add_argument("--tls-key", default=None, help="HTTPS private key (PEM; with --tls-cert; default: none)")
    p.set_defaults(func=_lazy("operator:dashboard"))
    p = sub.add_parser("audit", help="at a site: what left this node per run and per day, refusals, releases")
    p.add_argument("--state-dir", default=None, help="the node's --state-dir (default: derived from --data)")
    p.add_argument("--data", default=None, help="the node's --data folder, to find its default state (default: none)")
    p.add_argument("--audit-dir", default=None, help="the node's --audit-dir (default <state-dir>/audit)")
    p.add_argument("--days", type=float, default=None, help="only the last N days (default: everything)")
    p.add_argument("--since", default=None, metavar="DATE", help="from this UTC date or time (default: the start)")
    p.add_argument("--until", default=None, metavar="DATE", help="before this UTC date or time (default: now)")
    _add_format(p)
    p.set_defaults(func=_lazy("site:audit"))
    p = sub.add_parser("tensorboard", help="TensorBoard event files from a run's metrics.jsonl (RUN_DIR/tensorboard)")
    p.add_argument("run_dir", help="the run directory `fedrad run` wrote")
    p.add_argument("--follow", action="store_true",
                   help="keep exporting new rounds until the run finishes (default: export once)")
    p.set_defaults(func=_lazy("operator:tensorboard"))


def _add_ingest(sub) -> None:
    """issue 26: a large site decodes its folder before and between rounds, never inside one."""
    p = sub.add_parser("ingest", help="decode a site folder into the node's image store (resumable, every core)")
    p.add_argument("data", help="the site's image folder (the node's --data)")
    p.add_argument("--image-size", type=int, default=64, help="the runs' image size (run config image-size)")
    p.add_argument("--cache", default=None, help="the node's --cache (default <data>/.fedrad-cache)")
    p.add_argument("--state-dir", default=None, help="the node's --state-dir: its salt keys the patients "
                   "(default: derived from the folder, as for the node)")
    p.add_argument("--policy", default=None, help="site policy whose pixel budget applies (default: built-in)")
    p.add_argument("--max-pixels", type=int, default=64 << 20, help="pixel budget without --policy")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--full", action="store_true", help="stat every file (default: skip folders unchanged since "
                   "the last pass; a full pass runs by itself when the last one is over 24 h old)")
    p.add_argument("--compact", action="store_true", help="then rewrite the store without the images of deleted "
                   "files (refused, exit 2, while a round or another ingest uses the store)")
    p.set_defaults(func=_lazy("site:ingest"))


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="fedrad",
        description="Federated contrastive pretraining for radiology: only model weights leave a site.",
        epilog=EPILOG + EXIT_CODES,
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_scan(sub)
    _add_pretrain(sub)
    _add_federation(sub)
    _add_policy(sub)
    _add_release(sub)
    _add_security(sub)
    _add_console(sub, parser)
    _add_ingest(sub)
    return parser


def command_parsers(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()
                    ) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """(words, parser) of every command under `parser` that runs something (`fedrad certs init` is
    ("certs", "init")), depth first; argparse keeps subcommands in its private `_subparsers`."""
    for action in parser._subparsers._group_actions if parser._subparsers else []:
        for name, sub in action.choices.items():
            if sub.get_default("func") is not None:
                yield (*prefix, name), sub
            if sub._subparsers is not None:
                yield from command_parsers(sub, (*prefix, name))


def _with_node_config(parser: argparse.ArgumentParser, args: argparse.Namespace,
                      argv: list[str] | None) -> argparse.Namespace:
    """`fedrad node --config node.toml`: the file's values become the node command's defaults, then the command
    line is parsed again so that options given there win. Unknown keys and bad values name the file and line."""
    import tomllib

    from fedrad.deploy.run_command import config_line

    path = Path(args.config)
    try:
        text = path.read_text(encoding="utf-8")
        data = tomllib.loads(text)
    except OSError as exc:
        raise FileNotFoundError(f"--config {path}: cannot read ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML: {exc}") from None
    node_parser = dict(command_parsers(parser))[("node",)]
    actions = {a.dest: a for a in node_parser._actions if a.option_strings}
    defaults = {}
    for key, value in data.items():
        dest = key.replace("-", "_")
        action = actions.get(dest)
        if action is None or dest in ("config", "help"):
            raise ValueError(f"{path}:{config_line(text, key)}: unknown node setting '{key}'")
        if isinstance(value, dict):
            raise ValueError(f"{path}:{config_line(text, key)}: '{key}' must be a single value")
        if action.type is not None and not isinstance(value, bool):
            try:
                value = action.type(value)
            except (TypeError, ValueError):
                raise ValueError(f"{path}:{config_line(text, key)}: '{key}' = {value!r} is not valid") from None
        defaults[dest] = value
    node_parser.set_defaults(**defaults)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "command", None) == "node" and getattr(args, "config", None):
        try:
            args = _with_node_config(parser, args, argv)
        except (FileNotFoundError, ValueError) as exc:
            print(f"fedrad node: error: {exc}", file=sys.stderr)
            return 2
    if args.version:
        from importlib.metadata import version

        print(f"fedrad {version('fedrad')}")
        return 0
    if args.log_format:  # the processes fedrad starts (node runtime, ServerApp) inherit it
        os.environ["FEDRAD_LOG_FORMAT"] = args.log_format
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return run_command(args.func, args, _command_words(args))


def _command_words(args: argparse.Namespace) -> str:
    sub = next((getattr(args, k) for k in ("certs_cmd", "keys_cmd", "policy_cmd") if getattr(args, k, None)), None)
    return f"{args.command} {sub}" if sub else args.command


def run_command(func, args: argparse.Namespace, command: str) -> int:
    """Call the command; its exceptions become one line on stderr and the exit code (README "Exit codes")."""
    from fedrad.deploy.commands.errors import BundleRefused, FedradError

    try:
        return func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BundleRefused as exc:
        print(f"fedrad {command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except FedradError as exc:
        if str(exc):  # empty: what ran already said why
            kind = "error: " if exc.exit_code == 2 and not str(exc).startswith("error:") else ""
            print(f"fedrad {command}: {kind}{exc}", file=sys.stderr)
        return exc.exit_code
    except (FileNotFoundError, ValueError, PermissionError) as exc:
        # Bad input: say what and where, without a traceback wall.
        print(f"fedrad {command}: error: {exc}", file=sys.stderr)
        return 2


def parse_runtime_args(argv: list[str] | None = None):
    """The site runtime's command line (`python -m fedrad.deploy.runtime_entry MODE --port N ... [-- SUPERNODE]`,
    started by `fedrad node` and by the runtime itself) as fedrad.client.runtime.site_runtime.RuntimeArgs."""
    from fedrad.client.runtime.log_lines import LOG_LEVELS
    from fedrad.client.runtime.site_runtime import DEFAULT_CLIENT_APP, RUNTIME_MODES, RuntimeArgs

    argv = list(sys.argv[1:] if argv is None else argv)
    supernode_cmd: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, supernode_cmd = argv[:cut], argv[cut + 1:]
    p = argparse.ArgumentParser(prog="python -m fedrad.deploy.runtime_entry",
                                description="fedrad's site runtime: the trust gate between the SuperNode and the "
                                "ClientApp")
    p.add_argument("mode", choices=RUNTIME_MODES)
    p.add_argument("--port", type=int, required=True, help="the SuperNode's Runtime API port on 127.0.0.1")
    p.add_argument("--consortium-key", type=Path, default=None, help="consortium.pub: runs must be signed by it")
    p.add_argument("--allow-unsigned", action="store_true", help="also run unsigned runs (local experiments)")
    p.add_argument("--client-app", default=DEFAULT_CLIENT_APP, help="the installed ClientApp, module:attribute")
    p.add_argument("--client-app-dir", type=Path, default=None, help="folder holding --client-app's module")
    p.add_argument("--log-level", default="INFO", choices=LOG_LEVELS, help="the node's and its tasks' log level")
    p.add_argument("--fresh-process-per-message", action="store_true",
                   help="serve: a fresh process per message instead of a warm worker per run (slower; fallback)")
    p.add_argument("--run-id", type=int, default=0, help="worker: the run it serves (for its log lines)")
    return RuntimeArgs(**vars(p.parse_args(argv)), supernode_cmd=tuple(supernode_cmd))


if __name__ == "__main__":
    sys.exit(main())
