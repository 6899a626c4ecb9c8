"""The one way a site says no: an error reply carrying a protocol code and its fixed text, nothing else.

The runtime (unsigned run, crashed app), the site policy and the wire guard all refuse with it, so no
path can put site text (paths, counts, exception messages) into the `reason` field that crosses the wire.
"""

from __future__ import annotations

from flwr.app import Message
from flwr.app.error import Error

from fedrad.common.protocol import ERROR_TEXT, ErrorCode


def error_reply(msg: Message, code: ErrorCode) -> Message:
    """A reply to `msg` holding only `code` and ERROR_TEXT[code] (fedrad.common.protocol)."""
    return Message(Error(code=int(code), reason=ERROR_TEXT[code]), reply_to=msg)
