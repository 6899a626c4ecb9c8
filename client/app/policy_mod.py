"""The outermost Flower mod at a site: the site's policy and state are checked before anything else runs.

For every message (train, evaluate, any SecAgg+ stage) the coordinator's run-config is held against the
site's policy (`client/site/policy.py`) and the site's state folder is checked (`client/site/site_state.py`) before
any image is loaded, any model is built or any SecAgg+ key is made. A refusal is logged and written to
`<audit>/refusals.jsonl` with the rule; the reply carries only a code from `fedrad.common.protocol` and its
fixed text, so neither the rule nor anything about the site's data reaches the coordinator.

Every data-touching message is metered against the policy's daily limits: a training round (plain, or
SecAgg+'s masking stage) against `max_rounds_per_day`, an evaluate message (and a train message of an
eval-in-train run) against `max_evaluations_per_day`. Under dp = "sample" evaluate messages are refused:
their held-out metrics would leave un-noised. The stored `run-key` label is bounded here for every message.
"""

from __future__ import annotations

import re

from flwr.app import Context, Message
from flwr.app.message_type import MessageType

from fedrad.client.app.error_reply import refuse

_SECAGG_RECORD = "secaggplus_configs"  # flwr.common.secure_aggregation.secaggplus_constants.RECORD_KEY_CONFIGS
_SECAGG_TRAIN_STAGE = "collect_masked_vectors"  # the SecAgg+ stage in which the site trains
MAX_RUN_KEY = 64  # common.protocol's rule for `run-key`; it is stored at the site, so its length is bounded
_RUN_KEY = re.compile(rf"^[A-Za-z0-9._-]{{1,{MAX_RUN_KEY}}}$")


def _trains(msg: Message) -> bool:
    """True for the one message per round in which this site trains (plain, or SecAgg+'s masking stage)."""
    if msg.metadata.message_type != MessageType.TRAIN:
        return False
    if _SECAGG_RECORD not in msg.content.config_records:
        return True
    return str(msg.content.config_records[_SECAGG_RECORD].get("stage", "")) == _SECAGG_TRAIN_STAGE


def _cache_dir(node_config) -> str | None:
    from fedrad.common.node_config import NodeConfig

    node = NodeConfig.of(node_config)
    if node.cache_dir:
        return node.cache_dir
    data = node.data_dir
    if not data:
        return None
    from fedrad.client.site.site_data import default_cache_dir

    return str(default_cache_dir(data))


def site_policy_mod(msg: Message, context: Context, call_next) -> Message:
    from fedrad.client.site.policy import PolicyError, check_run, policy_for
    from fedrad.client.site.site_state import SiteStateError, count_activity, open_state, state_paths
    from fedrad.common.protocol import CONFIG, RUN_KEY, ErrorCode
    from fedrad.common.release_wire import MESSAGE_FILES, MESSAGE_OFFER
    from fedrad.common.run_config import RunConfig

    node_config = dict(context.node_config)
    try:
        state = state_paths(node_config)
    except SiteStateError as exc:
        return refuse(msg, ErrorCode.SITE_FAILED, "site_state", str(exc))  # no state: the log only
    try:
        open_state(state, _cache_dir(node_config))
    except (SiteStateError, OSError) as exc:
        return refuse(msg, ErrorCode.SITE_FAILED, "site_state", str(exc), audit=state)
    if str(msg.metadata.message_type) in (MESSAGE_OFFER, MESSAGE_FILES):
        # A release touches no data: the training rules do not apply; the bundle is checked on its own signature.
        return call_next(msg, context)
    try:
        policy = policy_for(node_config)
    except PolicyError as exc:  # a configured policy that does not load refuses everything
        return refuse(msg, ErrorCode.POLICY_REFUSED, "policy_file", str(exc), audit=state)
    try:
        cfg = RunConfig.of(context.run_config)
    except ValueError as exc:
        return refuse(msg, ErrorCode.POLICY_REFUSED, "run_config", str(exc), audit=state)
    refusal = check_run(policy, cfg)
    if refusal is not None:
        return refuse(msg, ErrorCode.POLICY_REFUSED, refusal.rule, f"{refusal.detail} (policy {policy.source})",
                      audit=state)
    sent = msg.content.config_records.get(CONFIG) if msg.has_content() else None
    run_key = sent.get(RUN_KEY) if sent is not None else None
    if run_key is not None and not (isinstance(run_key, str) and _RUN_KEY.match(run_key)):
        # The run-key is stored (ledger label, joined runs): bounded here, for every message.
        return refuse(msg, ErrorCode.PROTOCOL_MISMATCH, "run_key", f"message config '{RUN_KEY}' is not 1-{MAX_RUN_KEY} "
                      f"characters of [A-Za-z0-9._-] ({type(run_key).__name__}, {len(str(run_key))} characters)",
                      audit=state)
    evaluates = msg.metadata.message_type == MessageType.EVALUATE
    if evaluates and cfg.dp == "sample":
        return refuse(msg, ErrorCode.POLICY_REFUSED, "dp_sample_evaluate", "run has dp = \"sample\": an evaluate "
                      "reply's held-out metrics would leave un-noised, outside this site's image-level epsilon; "
                      "refused",
                      audit=state)
    limits = {}
    if _trains(msg):
        limits["train"] = policy.max_rounds_per_day
    if evaluates or (_trains(msg) and cfg.eval_in_train):  # eval-in-train measures the held-out images too
        limits["evaluate"] = policy.max_evaluations_per_day
    if limits:
        try:
            seen = count_activity(state, limits)
        except SiteStateError as exc:
            return refuse(msg, ErrorCode.SITE_FAILED, "site_state", str(exc), audit=state)
        if seen is not None:
            kind, count = seen
            rule = "max_rounds_per_day" if kind == "train" else "max_evaluations_per_day"
            what = "training rounds" if kind == "train" else "evaluations"
            return refuse(msg, ErrorCode.POLICY_REFUSED, rule, f"{count} {what} accepted in the last 24 hours; this "
                          f"site allows {getattr(policy, rule)} (policy {policy.source})", audit=state)
    return call_next(msg, context)
