"""The two kinds of error an operator sees as one ``fatal: <message>`` line.

* :class:`ServiceError` is what library code raises when it cannot do its job with this setup
  (an unreadable certificate, a port in use, a repository that cannot recover). Every room
  raises its own subclass (``IngestError``, ``PublisherError``, ``JanitorError``,
  ``RepositoryError``, ...), so a caller can tell them apart.
* :class:`Fatal` is raised by the front door alone (``userpub.cli``): a command-line problem,
  or a library's error turned into a message for the operator.

The CLI prints either as ``fatal: <message>`` and exits 1, without a traceback. A startup
check that finds several problems raises one error carrying them all (``problems``): the CLI
prints one ``fatal:`` line for each.
"""

from __future__ import annotations

__all__ = ["Fatal", "ServiceError"]


class ServiceError(Exception):
    """A library's refusal, with a one-line reason for the operator (``str(err)``).

    ``ServiceError(problem, ...)``: each argument is one problem, one line (``problems``).
    """

    def __init__(self, *problems: str) -> None:
        super().__init__(*problems)
        self.problems: tuple[str, ...] = problems

    def __str__(self) -> str:
        return "; ".join(self.problems)


class Fatal(ServiceError):  # noqa: N818 (reads as "fatal: <message>", as operators see it)
    """A problem reported by the CLI as ``fatal: <message>``, exit code 1, no traceback
    (raised by the front door only; a ServiceError, so that it carries ``problems`` too)."""
