"""``userpub verify``: check a whole repository revision against the specification.

Every problem is collected with its location; nothing stops at the first one. Sections of
``docs/cvmfs-format.md``:

- manifest fields (§3), signature with the certificate object ``X`` (§3, §4);
- whitelist: signature by a master key, expiry, repository name, certificate fingerprint (§5);
- every catalog reachable from the root (§6-§8, §10; see :mod:`tree`);
- every referenced object present and re-hashed against its name (§2): catalogs, file contents,
  chunks, history, certificate, meta-info; inflated size equal to the catalog's size; and
  re-compressed as genuine stratum 1s and ``cvmfs_fsck`` do (``docs/cvmfs-format.md``): a
  difference is a problem in the current revision, and counted for objects only older tagged
  revisions use (those were published before and are kept for their readers);
- history database: schema, name, a tag for the current revision, branches (§9, §10);
- reflog: plain-file hash ``Y``, and it lists this revision's root catalog, certificate, history
  and meta-info with their types (§9, as ``swissknife check`` does);
- revisions: manifest ``S`` = root catalog ``revision`` = the current tag's revision (§6, §9).
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import rsa

from cvmfs_verify.catalog import Catalog, DatabaseError, open_database, properties
from cvmfs_verify.fetch import (
    BadObjectError,
    FetchError,
    NotFoundError,
    Source,
    check_object,
    fetch_object,
    fetch_recompressed,
    read,
    recompression_problem,
)
from cvmfs_verify.hashes import (
    SUFFIX_CATALOG,
    SUFFIX_CERTIFICATE,
    SUFFIX_HISTORY,
    SUFFIX_METAINFO,
    ContentHash,
    HashError,
    digest,
)
from cvmfs_verify.letters import Manifest
from cvmfs_verify.report import ObjectRef, Report
from cvmfs_verify.tree import CatalogWalker, RootInfo
from cvmfs_verify.trust import MANIFEST, check_chain

REFLOG = ".cvmfsreflog"
REFLOG_TYPES = {0: "catalog", 1: "certificate", 2: "history", 3: "metainfo"}
LOAD_ERRORS = (NotFoundError, BadObjectError, FetchError, DatabaseError)


@dataclass(frozen=True)
class Options:
    """What to verify against."""

    keys: tuple[rsa.RSAPublicKey, ...]
    repo: str | None = None
    now: float | None = None
    workers: int = 4
    tags: bool = True  # also walk every tagged revision (what garbage collection must keep)
    recompress: bool = True  # re-compress objects as stratum 1s and cvmfs_fsck do


def verify_repository(source: Source, options: Options) -> Report:
    """Verify the current revision of the repository at ``source``."""
    return _Verifier(source, options).run()


class _Verifier:
    def __init__(self, source: Source, options: Options) -> None:
        self.source = source
        self.options = options
        self.report = Report(source.location)
        self.objects: dict[str, list[ObjectRef]] = {}
        self.tags: list[tuple[str, ContentHash, int, int]] = []
        self._current = True  # walking the current revision (False: older tagged ones)

    def add_object(self, ref: ObjectRef) -> None:
        if not self._current:
            ref = dataclasses.replace(ref, current=False)
        self.objects.setdefault(ref.path, []).append(ref)

    def _compression(self, where: str, name: str, expected: ContentHash,
                     recompressed: str | None, current: bool) -> None:
        """Report an object the genuine tools would re-compress differently."""
        problem = recompression_problem(name, expected, recompressed)
        if problem is None:
            return
        if current:
            self.report.add(where, problem)
        else:
            self.report.other_compression += 1

    def run(self) -> Report:
        manifest = self._manifest()
        if manifest is None:
            return self.report
        self.report.name = manifest.name
        self.report.revision = manifest.number("S")
        walker = CatalogWalker(self.report, self._load_catalog, self.add_object)
        root = manifest.hash("C")
        if root is not None:
            self._revisions(manifest, walker.walk(root, manifest.number("B"), "manifest B"))
        self._history(manifest)
        self._metainfo(manifest)
        if self.options.tags:
            self._current = False
            self._tagged_revisions(walker, root)
            self._current = True
        self._reflog(manifest)
        self._alternative_paths(manifest)
        self._check_objects()
        names = self.source.object_names()
        if names is not None and self.options.tags:  # garbage: reachable from no kept revision
            self.report.unreferenced = len(set(names) - set(self.objects))
        return self.report

    # -- letters -----------------------------------------------------------------------------

    def _manifest(self) -> Manifest | None:
        chain = check_chain(self.source, list(self.options.keys), repo=self.options.repo,
                            now=self.options.now, add=self.report.add)
        cert = chain.manifest.hash("X") if chain.manifest is not None else None
        if cert is not None:  # loaded by the chain of trust; checked again to re-compress it
            self.add_object(ObjectRef(cert, SUFFIX_CERTIFICATE, True, None, "manifest X",
                                      loaded=not self.options.recompress))
        return chain.manifest

    # -- databases ---------------------------------------------------------------------------

    def _load(self, found: ContentHash, suffix: str, where: str) -> bytes:
        """Fetch, hash-check and inflate an object (and re-compress it, unless told not to)."""
        if not self.options.recompress:
            return fetch_object(self.source, found, suffix)
        fetched = fetch_recompressed(self.source, found, suffix)
        self._compression(where, found.object_path(suffix), found, fetched.recompressed,
                          self._current)
        return fetched.content

    def _load_catalog(self, catalog_hash: ContentHash) -> Catalog:
        where = f"catalog {catalog_hash.object_path(SUFFIX_CATALOG)}"
        return Catalog(self._load(catalog_hash, SUFFIX_CATALOG, where))

    def _revisions(self, manifest: Manifest, root: RootInfo | None) -> None:
        where = f"manifest {MANIFEST}"
        if root is None:
            return
        revision = manifest.number("S")
        if root.revision is not None and revision is not None and root.revision != revision:
            self.report.add(where, f"revision S is {revision}, the root catalog's revision "
                                   f"property is {root.revision}")
        ttl = manifest.number("D")
        if root.ttl is not None and ttl is not None and root.ttl != ttl:
            self.report.add(where, f"TTL D is {ttl}, the root catalog's TTL property is "
                                   f"{root.ttl}")

    def _tagged_revisions(self, walker: CatalogWalker, current: ContentHash | None) -> None:
        """Every tagged revision must still be complete (spec §9, §14: what gc must keep)."""
        for name, root, revision, size in self.tags:
            if root == current:
                continue
            info = walker.walk(root, size, f"tag {name!r} size")
            if info is not None and info.revision != revision:
                self.report.add(f"history tag {name!r}", f"tags revision {revision}, but its root "
                                f"catalog {root} has revision property {info.revision}")

    def _database(self, manifest: Manifest, letter: str, suffix: str, kind: str
                  ) -> tuple[str, bytes] | None:
        found = manifest.hash(letter)
        if found is None:
            return None
        where = f"{kind} {found.object_path(suffix)}"
        self.add_object(ObjectRef(found, suffix, True, None, f"manifest {letter}", loaded=True))
        try:
            return where, self._load(found, suffix, where)
        except LOAD_ERRORS as err:
            self.report.add(where, f"cannot load: {err}")
            return None

    def _history(self, manifest: Manifest) -> None:
        loaded = self._database(manifest, "H", SUFFIX_HISTORY, "history")
        if loaded is None:
            return
        where, data = loaded
        try:
            db = open_database(data)
        except DatabaseError as err:
            self.report.add(where, str(err))
            return
        try:
            props = properties(db)
            tags = [(_str(n), _str(h), _int(r), _int(s), _str(b)) for n, h, r, s, b in db.execute(
                "SELECT name, hash, revision, size, branch FROM tags").fetchall()]
            branches = {_str(b): _int(r) for b, r in db.execute(
                "SELECT branch, initial_revision FROM branches").fetchall()}
        except (DatabaseError, sqlite3.Error) as err:
            self.report.add(where, f"unreadable tag database ({err})")
            return
        finally:
            db.close()
        self._check_history(props, tags, branches, manifest, where)

    def _check_history(self, props: dict[str, str], tags: list[tuple[str, str, int, int, str]],
                       branches: dict[str, int], manifest: Manifest, where: str) -> None:
        if props.get("fqrn") != manifest.name:
            self.report.add(where, f"property fqrn is {props.get('fqrn')!r}, "
                                   f"expected {manifest.name!r}")
        if props.get("schema") not in ("1.0", "1"):
            self.report.add(where, f"property schema is {props.get('schema')!r}, expected 1.0")
        revision, root, size = manifest.number("S"), manifest.hash("C"), manifest.number("B")
        current = False
        for name, tag_hash, tag_revision, tag_size, branch in tags:
            at = f"{where} tag {name!r}"
            if branch not in branches:
                self.report.add(at, f"branch {branch!r} does not exist")
            elif tag_revision < branches[branch]:
                self.report.add(at, f"revision {tag_revision} below its branch's initial revision")
            try:
                tagged = ContentHash.parse(tag_hash)
            except HashError as err:
                self.report.add(at, str(err))
                continue
            if tag_revision == revision:
                current = current or tagged == root
                if tagged != root:
                    self.report.add(at, f"tags revision {revision} with root catalog {tagged}, "
                                        f"but manifest C is {root}")
                if tag_size != size:
                    self.report.add(at, f"size {tag_size}, but manifest B is {size}")
            elif revision is not None and tag_revision > revision:
                self.report.add(at, f"revision {tag_revision} is newer than the manifest's S "
                                    f"{revision}")
            self.tags.append((name, tagged, tag_revision, tag_size))
        if not current:
            self.report.add(where, f"no tag for the current revision {revision} "
                                   f"(root catalog {root})")
        unused = set(branches) - {tag[4] for tag in tags}
        if unused:
            self.report.add(where, f"unused, dangling branches {sorted(unused)}")

    def _metainfo(self, manifest: Manifest) -> None:
        loaded = self._database(manifest, "M", SUFFIX_METAINFO, "meta-info")
        if loaded is None:
            return
        where, data = loaded
        try:
            if not isinstance(json.loads(data), dict):
                self.report.add(where, "meta-info is not a JSON object")
        except ValueError as err:
            self.report.add(where, f"meta-info is not JSON ({err})")

    def _reflog(self, manifest: Manifest) -> None:
        where = f"reflog {REFLOG}"
        expected = manifest.hash("Y")
        try:
            data = read(self.source, REFLOG)
        except NotFoundError:
            if expected is not None:
                self.report.add(where, f"missing, but the manifest's Y is {expected}")
            return
        except FetchError as err:
            self.report.add(where, f"cannot read: {err}")
            return
        if expected is None:
            self.report.add(where, "present, but the manifest has no Y")
            return
        try:
            actual = digest(data, expected.algorithm)
        except HashError as err:
            self.report.add(where, str(err))
            return
        if actual != expected:
            self.report.add(where, f"content hash is {actual}, the manifest's Y is {expected}")
        try:
            db = open_database(data)
        except DatabaseError as err:
            self.report.add(where, str(err))
            return
        try:
            props = properties(db)
            refs = {(_str(h), _int(t)) for h, t in db.execute(
                "SELECT hash, type FROM refs").fetchall()}
        except (DatabaseError, sqlite3.Error) as err:
            self.report.add(where, f"unreadable reflog ({err})")
            return
        finally:
            db.close()
        if props.get("fqrn") != manifest.name:
            self.report.add(where, f"property fqrn is {props.get('fqrn')!r}, "
                                   f"expected {manifest.name!r}")
        for letter, kind in (("C", 0), ("X", 1), ("H", 2), ("M", 3)):
            wanted = manifest.hash(letter)
            if wanted is not None and (str(wanted), kind) not in refs:
                self.report.add(where, f"does not list the {REFLOG_TYPES[kind]} {wanted} "
                                       f"(manifest {letter}) with type {kind}")

    def _alternative_paths(self, manifest: Manifest) -> None:
        if manifest.fields.get("A") != "yes":
            return
        for letter, suffix in (("C", SUFFIX_CATALOG), ("X", SUFFIX_CERTIFICATE)):
            found = manifest.hash(letter)
            name = f".cvmfsalt-{found}{suffix}"
            if found is not None:
                try:
                    read(self.source, name)
                except (NotFoundError, FetchError) as err:
                    self.report.add(f"manifest {MANIFEST}", f"A=yes but {name} unreadable: {err}")

    # -- objects -----------------------------------------------------------------------------

    def _check_objects(self) -> None:
        def check(refs: list[ObjectRef]) -> tuple[list[ObjectRef], int, int, str | None,
                                                  str | None]:
            first = refs[0]
            if any(ref.loaded for ref in refs):
                return refs, 0, 0, None, None
            try:
                info = check_object(self.source, first.hash, first.suffix,
                                    compressed=first.compressed,
                                    recompress=self.options.recompress)
            except LOAD_ERRORS as err:
                text = f"object {first.path} missing" if isinstance(err, NotFoundError) else \
                    f"object {err}"
                return refs, 0, 0, text, None
            return refs, info.stored_size, info.size, None, info.recompressed

        pending = [refs for refs in self.objects.values()]
        with ThreadPoolExecutor(max_workers=max(1, self.options.workers)) as pool:
            for refs, stored, size, error, recompressed in pool.map(check, pending):
                self.report.objects += 1
                self.report.stored_bytes += stored
                if error is not None:
                    self.report.add(refs[0].where, error + _also(refs))
                    continue
                current = [ref for ref in refs if ref.current]
                self._compression((current or refs)[0].where, refs[0].path, refs[0].hash,
                                  recompressed, bool(current))
                for ref in refs:
                    if ref.size is not None and ref.size != size:
                        self.report.add(ref.where, f"object {ref.path} inflates to {size} bytes, "
                                                   f"expected {ref.size}")


def _also(refs: list[ObjectRef]) -> str:
    return f" (and {len(refs) - 1} more references)" if len(refs) > 1 else ""


def _str(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    return "" if value is None else str(value)


def _int(value: object) -> int:
    return value if isinstance(value, int) else -1
