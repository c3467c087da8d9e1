"""The durable on-disk queue between ingest (or operators) and the publishers."""

from spool.queue import (
    BadEntry,
    CidStatus,
    Depth,
    DropResult,
    Entry,
    EntryWriter,
    Kind,
    Spool,
    State,
    entry_name,
    parse_name,
)

__all__ = ["BadEntry", "CidStatus", "Depth", "DropResult", "Entry", "EntryWriter", "Kind",
           "Spool", "State", "entry_name", "parse_name"]
