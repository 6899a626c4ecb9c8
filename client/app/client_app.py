"""Flower ClientApp: what runs at a hospital for every message from the coordinator.

Flower starts a fresh process per message, so this module imports only Flower; torch, timm and pydicom
are imported inside the handlers (via `fedrad.client.app.task`).
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedrad.client.app.policy_mod import site_policy_mod
from fedrad.client.app.privacy_mods import privacy_mod
from fedrad.client.app.wire_guard import wire_guard_mod

# The wire guard (outermost) is the last thing a reply passes on its way out: it enforces
# fedrad.common.protocol on what actually leaves (SecAgg+ records and the site policy's refusals included),
# turns any exception into a bare error code, and audits every outgoing message. The site policy comes next:
# it refuses a run that breaks the hospital's policy before any data is touched. privacy_mod runs Flower's
# SecAgg+ (and DP clipping) when the run-config asks for it and refuses a mismatch with what the coordinator sends.
app = ClientApp(mods=[wire_guard_mod, site_policy_mod, privacy_mod])


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Local contrastive pretraining on this site's images, starting from the global weights."""
    from fedrad.client.app.release_handler import note_training
    from fedrad.client.app.task import handle_train, release_after

    try:
        reply = handle_train(msg, context)
        note_training(msg, reply, context)  # a release of this run is accepted here later
        return reply
    finally:
        release_after(context)  # the warm worker waits for the next round without the model (idle-release)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Held-out contrastive loss and alignment/uniformity of the global model on this site's images."""
    from fedrad.client.app.task import handle_evaluate, release_after

    try:
        return handle_evaluate(msg, context)
    finally:
        release_after(context)


@app.query("release_offer")  # fedrad.common.release_wire.ACTION_OFFER
def release_offer(msg: Message, context: Context) -> Message:
    """The coordinator offers a published release: answer with a code (want it, hold it, or refuse it)."""
    from fedrad.client.app.release_handler import handle_offer

    return handle_offer(msg, context)


@app.query("release_files")  # fedrad.common.release_wire.ACTION_FILES
def release_files(msg: Message, context: Context) -> Message:
    """The bundle's files: verified with this site's consortium key, stored, acknowledged with a code."""
    from fedrad.client.app.release_handler import handle_files

    return handle_files(msg, context)
