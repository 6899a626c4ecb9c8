"""docs/ARCHITECTURE.md "Where a change goes", held to its word: a toy objective, strategy, site metric and source
are added in exactly the places the table names (the registries, patched here as the edited files would define them) and
then work everywhere that reads them, with no other edit."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from flwr.serverapp import strategy as fl

from fedrad.common.losses.simsiam import SimSiam
from fedrad.common.run_config import RunConfig

DOC = "docs/ARCHITECTURE.md"


class ToySiam(SimSiam):
    """`common/losses/toy_siam.py`: an Objective subclass (SimSiam's loss, its own name)."""

    name = "toy-siam"


class ToyMean(fl.FedAvg):
    """A Flower strategy a consortium might add (FedAvg's weighted mean under another name)."""


@pytest.fixture
def toy_objective(monkeypatch):
    import fedrad.client.site.policy as policy
    import fedrad.common.losses as losses

    # "+ one line in REGISTRY (common/losses/__init__.py)"; OBJECTIVES is derived from it there.
    registry = {**losses.REGISTRY, ToySiam.name: ToySiam}
    monkeypatch.setattr(losses, "REGISTRY", registry)
    monkeypatch.setattr(losses, "OBJECTIVES", tuple(registry))
    policy.default_policy.cache_clear()  # built from OBJECTIVES once per process, as at a site's start
    yield ToySiam.name
    policy.default_policy.cache_clear()


@pytest.fixture
def toy_strategy(monkeypatch):
    import fedrad.common.run_config as run_config
    import fedrad.server.strategies as strategies

    # "common/run_config.py STRATEGY_NAMES" + "server/strategies.py STRATEGY_SPECS"
    monkeypatch.setitem(run_config.STRATEGY_NAMES, "toymean", None)
    monkeypatch.setitem(strategies.STRATEGY_SPECS, "toymean", strategies.StrategySpec(ToyMean, mean=True))
    return "toymean"


def test_the_table_names_these_files() -> None:
    from pathlib import Path

    text = (Path(__file__).parents[1] / DOC).read_text()
    row = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| a new ")}
    assert "`common/losses/__init__.py`" in row["a new objective"] and "REGISTRY" in row["a new objective"]
    assert "STRATEGY_NAMES" in row["a new strategy"] and "STRATEGY_SPECS" in row["a new strategy"]
    assert "`SiteReport` field in `common/protocol.py`" in row["a new site metric"]
    assert "`Reader` subclass" in row["a new source"] and "`common/sources/layout.py`" in row["a new source"]


def test_a_new_objective_is_one_file_and_one_registry_line(toy_objective: str) -> None:
    import argparse

    import torch
    from fake_site import make_fake_site

    from fedrad.client.site.policy import default_policy
    from fedrad.client.training.trainer import TrainConfig, train_local
    from fedrad.common.models import build_model
    from fedrad.deploy.cli import build_parser

    cfg = RunConfig(objective=toy_objective, dp="sample", dp_noise=1.0)  # run config + DP eligibility (per_sample)
    assert toy_objective in default_policy().objectives  # the site policy's default list
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert sub.choices["pretrain"].parse_args(["D", "--objective", toy_objective]).objective == toy_objective
    torch.manual_seed(0)
    model = build_model("test_resnet", cfg.objective, 32, proj_dim=16)  # its heads
    result = train_local(model, make_fake_site(n=24, size=32),
                         TrainConfig.from_recipe(cfg, 2, "cpu"), progress=False)  # the trainer's views
    assert result.steps == 2 and all(np.isfinite(result.losses))


def test_a_new_strategy_is_one_name_and_one_spec_row(toy_strategy: str) -> None:
    from test_server_units import _reply

    from fedrad.server.strategies import STRATEGY_SPECS, build_strategy

    cfg = RunConfig(strategy=toy_strategy, secagg=True)  # None in STRATEGY_NAMES: a weighted mean runs on SecAgg+
    strategy = build_strategy(cfg)
    assert isinstance(strategy, ToyMean) and STRATEGY_SPECS[toy_strategy].mean  # streamed by round_modes too
    g = ArrayRecord({"w": Array(np.zeros(3, np.float32))})
    strategy.global_arrays = g
    replies = [_reply(1, ArrayRecord({"w": Array(np.ones(3, np.float32))}), 10),
               _reply(2, ArrayRecord({"w": Array(np.full(3, 4.0, np.float32))}), 30)]
    from fedrad.server.round_modes import screening_rules
    from fedrad.server.screening import screen_replies

    kept, report = screen_replies(replies, g, screening_rules(RunConfig(strategy=toy_strategy, norm_outlier_factor=0,
                                                                           max_site_share=1.0, max_example_factor=0)))
    agg, _ = strategy.aggregate_train(1, kept)
    assert agg is not None, (len(kept), strategy.last_refusal, report)
    np.testing.assert_allclose(agg["w"].numpy(), np.full(3, (1 * 10 + 4 * 30) / 40, np.float32), rtol=1e-6)





def test_no_file_over_500_lines_without_its_reason() -> None:
    import ast
    from pathlib import Path

    root = Path(__file__).parents[1]
    long = []
    for folder in ("common", "client", "server", "deploy", "benchmarks", "tests"):
        for path in sorted((root / folder).rglob("*.py")):
            text = path.read_text(encoding="utf-8")
            rel = path.relative_to(root).as_posix()
            if text.count("\n") > 500:
                if "Over 500 lines" not in (ast.get_docstring(ast.parse(text)) or ""):
                    long.append(rel)
    assert not long, f"over 500 lines with no reason in the module docstring: {long}"


# -- a new site metric: "a SiteReport field in common/protocol.py + filling it in client/app/task.py" ----------------
@pytest.fixture
def toy_metric(monkeypatch):
    """SiteReport as common/protocol.py would define it with one more field: a held-out score that every reader
    of AGGREGATE and SITE_RECORD picks up (the class is swapped wherever it was imported, as an edit of its
    definition would change it everywhere)."""
    import dataclasses
    import sys

    import fedrad.common.protocol as protocol

    original = protocol.SiteReport
    toy = dataclasses.make_dataclass(
        "SiteReport", [("toy_score", float | None, protocol._metric(float, protocol._TE,
                                                                    (protocol.SITE_RECORD, protocol.AGGREGATE),
                                                                    "a toy held-out score"))],
        bases=(original,), frozen=True)
    for name, module in list(sys.modules.items()):
        if name.startswith("fedrad.") and getattr(module, "SiteReport", None) is original:
            monkeypatch.setattr(module, "SiteReport", toy)
    return "toy_score"


def test_a_new_metric_is_one_report_field(toy_metric: str) -> None:
    from flwr.app import Message, MetricRecord, RecordDict
    from test_server_units import _reply

    from fedrad.client.app.wire_guard import Expected, check_outgoing
    from fedrad.common.protocol import AGGREGATE, METRICS, SITE_RECORD, SiteReport, metric_specs, metrics_for
    from fedrad.server.secagg import weighted_means

    assert toy_metric in metric_specs() and toy_metric in metrics_for(AGGREGATE)
    report = SiteReport(num_examples=10, eval_loss=1.0, **{toy_metric: 0.25})  # what client/app/task.py would fill
    evaluate = Message(RecordDict({METRICS: MetricRecord(report.to_metrics())}), reply_to=_reply(1, ArrayRecord()))
    assert check_outgoing(Expected("evaluate"), evaluate) is None  # the wire guard lets it out
    bad = Message(RecordDict({METRICS: MetricRecord({toy_metric: float("nan")})}), reply_to=_reply(1, ArrayRecord()))
    assert "not finite" in check_outgoing(Expected("evaluate"), bad)  # ... as a finite scalar only
    parsed = {n: SiteReport.from_metrics({toy_metric: v, "train_loss": 1.0}, "train") for n, v in (("a", 1.0),
                                                                                                    ("b", 3.0))}
    assert parsed["a"].values(SITE_RECORD)[toy_metric] == 1.0  # the per-site record of metrics.jsonl
    assert weighted_means(parsed, {"a": 1.0, "b": 3.0})[toy_metric] == pytest.approx(2.5)  # the round's mean

    from fedrad.server.round_modes import screening_rules
    from fedrad.server.screening import screen_replies

    g = ArrayRecord({"w": Array(np.zeros(3, np.float32))})
    replies = [_reply(1, ArrayRecord({"w": Array(np.ones(3, np.float32))}), 10, **{toy_metric: 1.0}),
               _reply(2, ArrayRecord({"w": Array(np.ones(3, np.float32))}), 30, **{toy_metric: 3.0})]
    kept, _ = screen_replies(replies, g, screening_rules(RunConfig(norm_outlier_factor=0, max_site_share=1.0,
                                                                   max_example_factor=0)))
    assert all(toy_metric in m.content[METRICS] for m in kept)  # plain mode's strategies average it


# -- a new source: "common/sources/<name>.py (a Reader subclass) + its detection in common/sources/layout.py" ------
def toy_entry(locator: str, size: int, salt: bytes = b"", max_pixels: int = 0):
    """`common/sources/npy_folder.py`'s decoder: one 2-D .npy array per image, min-max scaled."""
    from fedrad.common.image_ops import fit_square
    from fedrad.common.sources.errors import SkipImage

    arr = np.load(locator, allow_pickle=False).astype(np.float32)
    if arr.ndim != 2 or float(arr.max()) - float(arr.min()) < 1e-6:
        raise SkipImage("bad-dimensions", f"shape {arr.shape}")
    return fit_square((arr - arr.min()) / (arr.max() - arr.min()), size), {}


def toy_check(locator: str, max_pixels: int = 0) -> dict:
    return {"shape": list(np.load(locator, mmap_mode="r").shape)}


@pytest.fixture
def toy_source(monkeypatch):
    from pathlib import Path

    import fedrad.common.sources.layout as layout
    from fedrad.common.sources.base import Item, Listing, Reader

    class NpyFolderReader(Reader):
        kind = "npy"
        entry = staticmethod(toy_entry)
        check = staticmethod(toy_check)

        def __init__(self, root, max_pixels: int = 0) -> None:
            super().__init__(max_pixels)
            self.root = Path(root).resolve()

        def list_items(self) -> Listing:
            files = sorted(self.root.glob("*.npy"))
            return Listing(items=[Item(p.name, str(p)) for p in files], files_seen=len(files))

    detect, open_ = layout.detect_source, layout.open_source

    def detect_source(folder):  # "+ its detection in layout.py": a folder of .npy files
        return layout.Layout("npy", None) if any(Path(folder).glob("*.npy")) else detect(folder)

    def open_source(folder, max_pixels=layout.DEFAULT_MAX_PIXELS, layout_=None, labels_csv=None, **pacs):
        found = layout_ or detect_source(folder)
        if found.kind == "npy":
            return NpyFolderReader(folder, max_pixels)
        return open_(folder, max_pixels, found, labels_csv, **pacs)

    monkeypatch.setattr(layout, "detect_source", detect_source)
    monkeypatch.setattr(layout, "open_source", open_source)
    return NpyFolderReader


def test_a_new_source_is_one_reader_and_its_detection(toy_source, tmp_path) -> None:
    from fedrad.common.sources.layout import open_location

    rng = np.random.default_rng(0)
    for i in range(3):
        np.save(tmp_path / f"img{i}.npy", rng.random((40, 30)))
    opened = open_location(tmp_path)  # the one dispatch site data, scan and fine-tune open a folder with
    assert isinstance(opened.reader, toy_source) and opened.layout.kind == "npy"
    listing = opened.reader.list_items()
    assert [it.item_id for it in listing.items] == ["img0.npy", "img1.npy", "img2.npy"]
    image, signals = opened.reader.decode(listing.items[0], 32)
    assert image.shape == (32, 32) and 0.0 <= float(image.min()) and float(image.max()) <= 1.0

    from fedrad.client.site.scan import format_report, scan_folder
    from fedrad.common.data_rules import DataRules

    # `fedrad scan` asks the reader for its inventory (Reader.inventory's default), never its layout's kind
    report = scan_folder(tmp_path, progress=False, cache_dir=tmp_path / "cache", rules=DataRules(modalities=()))
    assert (report["layout"], report["usable"], report["candidates"], report["patients"]) == ("npy", 3, 3, 3)
    assert report["modality"] == {"unknown": 3} and "[npy folder]" in format_report(report)
