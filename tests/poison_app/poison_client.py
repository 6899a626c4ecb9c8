"""fedrad's ClientApp with a poisoning mod, switched on per SuperNode by FEDRAD_TEST_POISON=nan|scale.

A lying site's own choice: started with `SiteTrust(client_app="poison_client:app", client_app_dir=<this folder>)`
(`fedrad node --client-app ... --client-app-dir ...`); no FAB can make a site run it.
"""

from __future__ import annotations

import os

import numpy as np
from fedrad.client.client_app import evaluate as fedrad_evaluate
from fedrad.client.client_app import train as fedrad_train
from fedrad.client.wire_guard import wire_guard_mod
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp import ClientApp


def poison_mod(msg: Message, context: Context, call_next) -> Message:
    reply = call_next(msg, context)
    mode = os.environ.get("FEDRAD_TEST_POISON", "")
    if not mode or reply.has_error() or "arrays" not in reply.content:
        return reply
    arrays = reply.content["arrays"]
    poisoned = {}
    for key, arr in arrays.items():
        a = arr.numpy().copy()
        if a.dtype.kind == "f":
            a = np.full_like(a, np.nan) if mode == "nan" else a * 1000.0 + 50.0
        poisoned[key] = Array(a)
    reply.content["arrays"] = ArrayRecord(poisoned)
    return reply


app = ClientApp(mods=[poison_mod, wire_guard_mod])
app.train()(fedrad_train)
app.evaluate()(fedrad_evaluate)
