"""The contract between a site and the coordinator: what may cross the wire.

Error replies carry only a code from this fixed table and its fixed text: the real reason (paths, column
names, exception text) stays in the site's own log and audit file, never in the reply.
"""

from __future__ import annotations

from enum import IntEnum


class ErrorCode(IntEnum):
    """Why a site did not return a result. Stable numbers: the coordinator logs and stores only these."""

    POLICY_REFUSED = 4001  # the run breaks the site's policy (see the site's audit log for the rule)
    RUN_NOT_SIGNED = 4002  # the run's code is not signed by the consortium key the site trusts
    PRIVACY_BUDGET = 4003  # the site's own privacy budget would be exceeded by this round
    WIRE_BLOCKED = 4004  # the reply broke the wire protocol and was blocked at the site
    SITE_FAILED = 5001  # the site failed while handling the message (details in its own log)
    DATA_UNAVAILABLE = 5002  # the site has no usable data for this run


ERROR_TEXT: dict[ErrorCode, str] = {
    ErrorCode.POLICY_REFUSED: "refused by site policy",
    ErrorCode.RUN_NOT_SIGNED: "run not signed by the consortium",
    ErrorCode.PRIVACY_BUDGET: "site privacy budget exhausted",
    ErrorCode.WIRE_BLOCKED: "reply blocked by the site's wire guard",
    ErrorCode.SITE_FAILED: "site failed while handling the message",
    ErrorCode.DATA_UNAVAILABLE: "site data unavailable",
}
