"""The two kinds of error an operator sees as one ``fatal: <message>`` line.

* :class:`ServiceError` is what library code raises when it cannot do its job with this setup
  (an unreadable certificate, a port in use, a repository that cannot recover). Every room
  raises its own subclass (``IngestError``, ``PublisherError``, ``JanitorError``,
  ``RepositoryError``, ...), so a caller can tell them apart.
* :class:`Fatal` is raised by the front door alone (``userpub.cli``): a command-line problem,
  or a library's error turned into a message for the operator.

The CLI prints either as ``fatal: <message>`` and exits 1, without a traceback.
"""

from __future__ import annotations

__all__ = ["Fatal", "ServiceError"]


class ServiceError(Exception):
    """A library's refusal, with a one-line reason for the operator (``str(err)``)."""


class Fatal(Exception):  # noqa: N818 (reads as "fatal: <message>", as operators see it)
    """A problem reported by the CLI as ``fatal: <message>``, exit code 1, no traceback."""
