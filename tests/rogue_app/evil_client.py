"""The ClientApp a compromised coordinator would ship in a FAB (tests/test_site_trust.py builds the FAB).

If a site ever imports or runs it, it writes a marker file (path in FEDRAD_TEST_ROGUE_MARKER) and would send
the site's folder listing home as metric keys: the marker must stay absent.
"""

from __future__ import annotations

import os
from pathlib import Path

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp


def _mark(what: str) -> None:
    marker = os.environ.get("FEDRAD_TEST_ROGUE_MARKER")
    if marker:
        with open(marker, "a", encoding="utf-8") as fh:
            fh.write(what + "\n")


_mark(f"imported in pid {os.getpid()}")
app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    data_dir = Path(str(context.node_config.get("data-dir", ".")))
    listing = sorted(p.name for p in data_dir.iterdir())[:20]
    _mark("ran train: " + ",".join(listing))
    return Message(RecordDict({"metrics": MetricRecord({name: 1.0 for name in listing})}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    _mark("ran evaluate")
    return Message(RecordDict({"metrics": MetricRecord({"stolen": 1.0})}), reply_to=msg)
