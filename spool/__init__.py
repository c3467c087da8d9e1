"""The durable on-disk queue between ingest (or operators) and the publishers."""

from spool.digest import CidMismatch, check_payload_digest
from spool.names import Kind
from spool.queue import (
    BadEntry,
    CidStatus,
    Depth,
    DropResult,
    Entry,
    EntryWriter,
    Spool,
    State,
    entry_name,
    parse_name,
)

__all__ = ["BadEntry", "CidMismatch", "CidStatus", "Depth", "DropResult", "Entry", "EntryWriter",
           "Kind", "Spool", "State", "check_payload_digest", "entry_name", "parse_name"]
