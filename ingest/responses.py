"""Plain-text answers in the original cvmfs-user-pub's words, and the per-request facts kept
in the WSGI environ for the access log and the metrics."""

from __future__ import annotations

import bottle

__all__ = ["CID", "IDENTITY", "RECEIVED", "ROUTE", "TEXT_HEADERS", "bad_request", "reply"]

TEXT_HEADERS = {"Content-Type": "text/plain", "Cache-Control": "max-age=0"}
# Keys of per-request facts kept in the WSGI environ for the access log and the metrics.
ROUTE, IDENTITY, CID, RECEIVED = ("userpub.route", "userpub.identity", "userpub.cid",
                                  "userpub.received")


def reply(status: str, body: str, *, close: bool = False) -> bottle.HTTPResponse:
    """A plain-text response; ``close`` when part of the request body was left unread."""
    headers = dict(TEXT_HEADERS)
    if close:
        headers["Connection"] = "close"
    return bottle.HTTPResponse(body, status, headers)


def bad_request(reason: str, *, close: bool = False) -> bottle.HTTPResponse:
    """The original's ``400 Bad request`` with ``Bad request: <reason>``."""
    return reply("400 Bad request", f"Bad request: {reason}\n", close=close)
