"""fedrad's ClientApp with a poisoning mod outside the wire guard (a site that lies on purpose), switched on
per SuperNode by FEDRAD_TEST_POISON:

- nan: every float weight NaN;
- scale5: the update (trained minus received weights) multiplied by 5, a normal-looking but dominant site;
- count: an honest update claiming num_examples = 1e9.

A lying site's own choice: started with `SiteTrust(client_app="poison_client:app", client_app_dir=<this folder>)`
(`fedrad node --client-app ... --client-app-dir ...`); no FAB can make a site run it.
"""

from __future__ import annotations

import os

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord
from flwr.clientapp import ClientApp

from fedrad.client.app.client_app import evaluate as fedrad_evaluate
from fedrad.client.app.client_app import train as fedrad_train
from fedrad.client.app.privacy_mods import privacy_mod
from fedrad.client.app.wire_guard import wire_guard_mod


def poison_mod(msg: Message, context: Context, call_next) -> Message:
    # The arrays are packed (fedrad.common.packing: one flat array per dtype); elementwise poisoning of the
    # packed buffers is the same as poisoning every named array.
    received = {k: v.numpy().copy() for k, v in msg.content["arrays"].items()} if "arrays" in msg.content else {}
    reply = call_next(msg, context)
    mode = os.environ.get("FEDRAD_TEST_POISON", "")
    if not mode or reply.has_error() or "arrays" not in reply.content:
        return reply
    if mode == "count":
        metrics = dict(reply.content["metrics"])
        metrics["num_examples"] = 1e9
        reply.content["metrics"] = MetricRecord(metrics)
        return reply
    poisoned = {}
    for key, arr in reply.content["arrays"].items():
        a = arr.numpy().copy()
        if a.dtype.kind == "f":
            ref = received[key]
            a = np.full_like(a, np.nan) if mode == "nan" else (ref + 5.0 * (a - ref)).astype(a.dtype)
        poisoned[key] = Array(a)
    reply.content["arrays"] = ArrayRecord(poisoned)
    return reply


app = ClientApp(mods=[poison_mod, wire_guard_mod, privacy_mod])
app.train()(fedrad_train)
app.evaluate()(fedrad_evaluate)
