"""Site-side privacy mods: SecAgg+ (Flower's `secaggplus_mod`) and DP clipping, chosen by the run-config.

`privacy_mod` sits just inside the wire guard. With run-config `secagg = false` it passes messages through;
with `secagg = true` training messages go through

    wire guard -> secaggplus_mod -> update edge -> [fixedclipping_mod when dp = client] -> legacy edge -> handler

so `task.handle_train` trains exactly as in plain mode: the legacy edge turns Flower's legacy FitIns into the
fedrad message (packed arrays + config) and the reply back into a FitRes; the update edge replaces the
(clipped) weights by the update (weights minus the global weights) that SecAgg+ masks. What leaves the site
in secagg mode is Flower's masked integer vectors, public keys and encrypted key shares, plus the SiteReport
metrics; the wire guard checks each SecAgg+ stage's reply for exactly that structure.

A mismatch between the run-config and what the coordinator sends is refused loudly: a secagg run never
answers a plain training message (that would expose the site's update), and a plain run never joins a
SecAgg+ exchange (which would train nothing).
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.app.message_type import MessageType

from fedrad.client.app.error_reply import refuse
from fedrad.common.protocol import (
    ARRAYS,
    CONFIG,
    FIT_CONFIG,
    FIT_PARAMS,
    METRICS,
    SECAGG_MAX_WEIGHT,
    SECAGG_RECORD,
    SERVER_ROUND,
    ErrorCode,
    SiteReport,
)


def _secagg_on(context: Context) -> bool:
    value = context.run_config.get("secagg", False)
    return value if isinstance(value, bool) else str(value).lower() == "true"


def _refuse(msg: Message, why: str) -> Message:
    """A mismatch refusal: the code leaves, `why` stays in the site's log and audit file."""
    return refuse(msg, ErrorCode.PROTOCOL_MISMATCH, "privacy_mode", f"fedrad privacy: {why}")


def privacy_mod(msg: Message, context: Context, call_next) -> Message:
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)
    has_secagg = SECAGG_RECORD in msg.content.config_records
    if _secagg_on(context) and not has_secagg:
        return _refuse(msg, "run-config secagg=true but the coordinator sent a plain training message; refusing "
                            "to send this site's update unmasked (is the coordinator's ServerApp fedrad's?)")
    if not _secagg_on(context):
        if has_secagg:
            return _refuse(msg, "the coordinator speaks SecAgg+ but run-config secagg=false; refusing")
        return call_next(msg, context)
    from flwr.client.mod import fixedclipping_mod, secaggplus_mod

    dp_client = str(context.run_config.get("dp", "none")) == "client"

    def inner(m: Message, c: Context) -> Message:
        return _legacy_edge(m, c, call_next)

    def clipped(m: Message, c: Context) -> Message:
        return fixedclipping_mod(m, c, inner) if dp_client else inner(m, c)

    def update(m: Message, c: Context) -> Message:
        return _update_edge(m, c, clipped)

    return secaggplus_mod(msg, context, update)


def _model_layout(context: Context):
    from fedrad.client.app.task import model_layout
    from fedrad.common.run_config import RunConfig

    return model_layout(RunConfig.of(context.run_config))


def _legacy_edge(msg: Message, context: Context, call_next) -> Message:
    """FitIns (unnamed arrays: the packed model, one array per dtype) -> fedrad's packed-arrays message; the
    reply -> FitRes with the full (packed) weights."""
    import numpy as np
    from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.compat.common import recorddict_compat as compat

    groups = list(_model_layout(context).groups)
    global_nd = msg.content.array_records[FIT_PARAMS].to_numpy_ndarrays()
    if len(global_nd) != len(groups):
        return _refuse(msg, f"the coordinator sent {len(global_nd)} arrays, this model packs into {len(groups)}")
    config = dict(msg.content.config_records[FIT_CONFIG])
    msg.content = RecordDict({  # the handler unpacks these against the model's layout (names, dtypes, lengths)
        ARRAYS: ArrayRecord({g: Array(np.array(a, order="C")) for g, a in zip(groups, global_nd, strict=True)}),
        CONFIG: ConfigRecord({SERVER_ROUND: int(config.get(SERVER_ROUND, 0))}),
    })
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    arrays = reply.content[ARRAYS]
    metrics = SiteReport.from_metrics(reply.content[METRICS], MessageType.TRAIN).to_metrics()
    # Integer buffers travel as float64 from here on, so Flower's clipping arithmetic can scale them.
    weights = [arrays[g].numpy().astype(np.float64 if a.dtype.kind in "iu" else a.dtype, copy=False)
               for g, a in zip(groups, global_nd, strict=True)]
    num_examples = int(metrics.get("num_examples", 1))
    if str(context.run_config.get("dp", "none")) == "client":
        num_examples = int(float(config.get(SECAGG_MAX_WEIGHT, 1)))  # equal weights: DP noise assumes them
    else:
        num_examples = min(num_examples, int(float(config.get(SECAGG_MAX_WEIGHT, num_examples))))
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(weights), max(1, num_examples), metrics)
    reply.content = compat.fitres_to_recorddict(fitres, keep_input=True)
    return reply


def _update_edge(msg: Message, context: Context, call_next) -> Message:
    """Replace the reply's weights by the update (float; zero for integer buffers) that SecAgg+ will mask."""
    import numpy as np
    from flwr.common import ndarrays_to_parameters
    from flwr.compat.common import recorddict_compat as compat

    global_nd = [a.copy() for a in msg.content.array_records[FIT_PARAMS].to_numpy_ndarrays()]
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
    from flwr.common import parameters_to_ndarrays

    local = parameters_to_ndarrays(fitres.parameters)
    deltas = []
    for g, w in zip(global_nd, local, strict=True):
        if g.dtype.kind in "iu":
            deltas.append(np.zeros(g.shape, dtype=np.float32))
        else:
            deltas.append((w.astype(np.float64) - g.astype(np.float64)).astype(np.float32))
    fitres.parameters = ndarrays_to_parameters(deltas)
    reply.content = compat.fitres_to_recorddict(fitres, keep_input=True)
    return reply
