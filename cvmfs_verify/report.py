"""What a verification found: problems with their precise location, and what was covered."""

from __future__ import annotations

from dataclasses import dataclass, field

from cvmfs_verify.hashes import ContentHash


@dataclass(frozen=True)
class Problem:
    """One violation of the specification: where (file, catalog + path, object) and what."""

    where: str
    what: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}"


@dataclass(frozen=True)
class ObjectRef:
    """A reference to a content-addressed object, and who made it."""

    hash: ContentHash
    suffix: str
    compressed: bool
    size: int | None
    where: str
    loaded: bool = False  # already fetched and hash-checked by whoever referenced it
    current: bool = True  # referenced by the current revision (not only by older tags)

    @property
    def path(self) -> str:
        """The object's path below the repository base."""
        return self.hash.object_path(self.suffix)


@dataclass
class Report:
    """The outcome of verifying one repository."""

    location: str
    name: str | None = None
    revision: int | None = None
    problems: list[Problem] = field(default_factory=list)
    catalogs: int = 0
    entries: int = 0
    objects: int = 0
    stored_bytes: int = 0
    unreferenced: int | None = None
    other_compression: int = 0  # objects only older tagged revisions use, not as CVMFS stores them

    def add(self, where: str, what: str) -> None:
        """Record a problem."""
        self.problems.append(Problem(where, what))

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems

    def summary(self) -> str:
        """One line describing what was verified."""
        text = (f"{self.location}: repository {self.name} revision {self.revision}: "
                f"{self.catalogs} catalogs, {self.entries} entries, {self.objects} objects verified "
                f"({self.stored_bytes} bytes of file content)")
        if self.unreferenced:
            text += (f"; {self.unreferenced} stored objects unreachable from this revision and "
                     "its tags (garbage)")
        if self.other_compression:
            text += (f"; {self.other_compression} objects only older tagged revisions use are not "
                     "stored as CernVM-FS re-compresses them (kept for their readers until "
                     "garbage collection retires those revisions)")
        if self.problems:
            text += f"; {len(self.problems)} problems"
        return text
