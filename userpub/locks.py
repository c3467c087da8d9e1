"""Where the repository locks live (a light module: the janitor imports it too).

``<state>/locks/<repo>.lock`` is held by the repository's publisher for its whole life;
``<state>/locks/<repo>.txn.lock`` is taken around every change of the repository (each publish
transaction and each cleanup). Lock files are never deleted: a held lock is an open descriptor
with a flock, not the file's existence.
"""

from __future__ import annotations

from pathlib import Path

from userpub.config import Config


def lock_path(config: Config, repo: str) -> Path:
    """The lifetime lock of ``repo``'s publisher."""
    return config.lock_dir / f"{repo}.lock"


def transaction_lock_path(config: Config, repo: str) -> Path:
    """The lock taken around every change of ``repo`` (publisher and janitor)."""
    return config.lock_dir / f"{repo}.txn.lock"
