"""``userpub restore``: rebuild a lost cvmfs-native repository from a replica of it.

The companion server keeps a stratum-1 replica of every repository this server publishes. To
restore, the replica is pulled into the repository's (empty) root exactly as a replica is
pulled (chain of trust checked with this host's master public key, every object hash-checked,
the manifest installed last), then the writer's own state is built around it: the manifest and
reflog move into the first generation ``.userpub/gen/<revision>/`` behind the fixed links, as
:class:`~.layout.Layout` keeps them. The data, stamps (``/<stamps>``), history and revision
numbering are the replica's, so the next publication is revision + 1.

It refuses to run while the repository's publisher holds its lock, when the root still holds a
published repository, or without this host's repository keys (and, when the replica's
whitelist does not list this host's certificate, without the master key to re-sign it). An
interrupted restore can be run again: it goes on with what it already has.
"""

from __future__ import annotations

import datetime
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from publisher.repositories.cvmfs_native import key_files, open_native
from publisher.repositories.cvmfs_native.fetch import Fetcher, FetchError
from publisher.repositories.cvmfs_native.history import Reflog
from publisher.repositories.cvmfs_native.keys import Keys, KeysError, load_keys
from publisher.repositories.cvmfs_native.layout import (
    REFLOG,
    STATUS,
    WHITELIST,
    Layout,
    write_atomic,
)
from publisher.repositories.cvmfs_native.manifest import (
    LetterError,
    Whitelist,
    fingerprint,
    verify_whitelist,
)
from publisher.repositories.cvmfs_native.objects import ObjectStore
from publisher.repositories.cvmfs_native.replica import (
    LAST_SNAPSHOT,
    Origin,
    ReplicaPuller,
    read_local_manifest,
)
from publisher.repositories.cvmfs_native.replica_gc import reachable_names
from publisher.repositories.cvmfs_native.replica_objects import opened, tagged_roots
from publisher.repositories.cvmfs_native.replica_trust import ReplicaError, load_master_key
from userpub.config import Config, RepositoryConfig
from userpub.errors import ServiceError
from userpub.locks import lock_path, transaction_lock_path


class RestoreError(ServiceError):
    """The repository cannot be restored as asked; ``str()`` says why in one line."""


@dataclass(frozen=True)
class RestoreResult:
    """What a restore did."""

    repository: str
    revision: int
    source: str
    objects: int
    bytes: int
    seconds: float
    whitelist_signed: bool

    def describe(self) -> str:
        """One line for the operator."""
        signed = "; whitelist re-signed with this host's keys" if self.whitelist_signed else ""
        return (f"restored {self.repository} at revision {self.revision} from {self.source}: "
                f"{self.objects} objects, {self.bytes} bytes in {self.seconds:.1f} s{signed}; "
                f"the next publication is revision {self.revision + 1}")


def source_url(source: str, name: str) -> str:
    """``--from`` as the replica's URL: ``http://host:port/cvmfs`` gets ``/<name>`` appended."""
    url = source.rstrip("/")
    return url if url.endswith(f"/{name}") else f"{url}/{name}"


def restore_repository(config: Config, repo: RepositoryConfig, source: str, *,
                       threads: int = 4, timeout: float = 30.0) -> RestoreResult:
    """Rebuild ``repo`` (hosted here) from the replica at ``source``; see the module docstring."""
    started = time.monotonic()
    if repo.backend != "cvmfs-native" or repo.root is None:
        raise RestoreError(f"{repo.name} uses the {repo.backend} backend: restore rebuilds "
                           "cvmfs-native repositories")
    if not repo.is_hosted_on(config.server.name):
        raise RestoreError(f"{repo.name} is published by {repo.host}, not by this server "
                           f"({config.server.name}): restore only rebuilds its own repositories")
    files = key_files(config, repo)
    try:
        keys = load_keys(files)
    except KeysError as err:
        raise RestoreError(f"cannot restore {repo.name} without this host's repository keys: "
                           f"{err}") from None
    if not files.master_public.exists():
        raise RestoreError(f"cannot restore {repo.name} without its master public key "
                           f"{files.master_public} (it checks the replica's signatures)")
    root = repo.root
    url = source_url(source, repo.name)
    config.lock_dir.mkdir(parents=True, exist_ok=True)
    life = FileLock(lock_path(config, repo.name))
    try:
        life.acquire(timeout=1.0)
    except Timeout:
        raise RestoreError(f"the publisher of {repo.name} is running (it holds "
                           f"{life.lock_file}): stop it before restoring") from None
    try:
        txn = FileLock(transaction_lock_path(config, repo.name))
        try:
            held = txn.acquire(timeout=60.0)
        except Timeout:
            raise RestoreError(f"{repo.name} is being changed (the janitor holds "
                               f"{txn.lock_file}): try again later") from None
        with held:  # released at the end of the block
            existing = read_local_manifest(root)
            if existing is not None:
                raise RestoreError(f"{repo.name} still exists at {root} (revision "
                                   f"{existing[1].revision}): restore rebuilds a lost "
                                   "repository and never overwrites one (move the directory "
                                   "away first)")
            _check_whitelist(url, repo.name, files.master_public, keys, timeout)
            state = config.server.state / "replicas" / f".restore-{repo.name}.json"
            puller = ReplicaPuller(Origin(url, repo.name, files.master_public), root, state,
                                   threads=threads, timeout=timeout,
                                   durable=config.publisher.durable, require_marker=False)
            try:
                pulled = puller.pull()
            except ReplicaError as err:
                raise RestoreError(f"pulling {repo.name} from {url} failed: {err} (run restore "
                                   "again to go on)") from None
            finally:
                state.unlink(missing_ok=True)
            _check_complete(root)
            _adopt(root, repo.name, durable=config.publisher.durable)
            whitelist = (root / WHITELIST).read_bytes()
            repository = open_native(config, repo)
            repository.recover()  # re-signs the whitelist for this host's certificate if needed
            signed = (root / WHITELIST).read_bytes() != whitelist
            manifest = repository.manifest()
            if manifest is None or manifest.revision != pulled.revision:
                raise RestoreError(f"{repo.name}: the restored repository does not serve "
                                   f"revision {pulled.revision}")
    finally:
        life.release()
    return RestoreResult(repo.name, pulled.revision, url, pulled.objects, pulled.bytes,
                         time.monotonic() - started, signed)


def _check_whitelist(url: str, name: str, master_public: Path, keys: Keys,
                     timeout: float) -> None:
    """Refuse early when the next publication could not be signed acceptably."""
    if keys.master_key is not None:
        return  # the whitelist is re-signed for this host's certificate if needed
    fetcher = Fetcher(url, timeout=timeout)
    try:
        data = fetcher.get(WHITELIST)
        listed = Whitelist.parse(verify_whitelist(data, load_master_key(master_public)))
    except (FetchError, ReplicaError, LetterError) as err:
        raise RestoreError(f"cannot read the replica's whitelist: {err}") from None
    finally:
        fetcher.close()
    ours = fingerprint(keys.certificate_pem).upper()
    if ours not in (f.upper() for f in listed.fingerprints):
        raise RestoreError(f"the replica's whitelist does not list this host's certificate of "
                           f"{name} and its master key is not here to re-sign it")
    if listed.expires <= datetime.datetime.now(datetime.UTC):
        raise RestoreError(f"the replica's whitelist of {name} has expired and the master key "
                           "is not here to re-sign it")


def _check_complete(root: Path) -> None:
    """Every object the restored revision and its tags reach is there (leftovers in the root
    from before the loss could otherwise stand for a complete subtree)."""
    local = read_local_manifest(root)
    assert local is not None
    manifest = local[1]
    store = ObjectStore(root)
    roots = {manifest.root_catalog}
    if manifest.history:
        with opened(store.path(manifest.history, "H"), store.temp_path("restore.db"),
                    "history") as conn:
            roots.update(tagged_roots(conn))
    try:
        names = reachable_names(store, roots)
    except ReplicaError as err:
        raise RestoreError(f"{root}: {err}; move the directory away and restore again"
                           ) from None
    missing = [n for n in names if not store.path(n[:40], n[40:]).exists()]
    if missing:
        raise RestoreError(f"{root}: {len(missing)} objects are missing (e.g. {missing[0]}) "
                           "though the catalogs naming them are there: leftovers of an older "
                           "copy? Move the directory away and restore again")


def _adopt(root: Path, name: str, *, durable: bool) -> None:
    """Turn the pulled stratum 1 into the writer's layout (generation, links, markers)."""
    local = read_local_manifest(root)
    assert local is not None
    raw, manifest = local
    layout = Layout(root)
    store = ObjectStore(root)
    layout.generations.mkdir(parents=True, exist_ok=True)
    reflog = store.temp_path("reflog")
    if (root / REFLOG).exists():
        shutil.copyfile(root / REFLOG, reflog)
    else:
        Reflog(reflog, name, create=True).finish()
    layout.install(manifest.revision, raw, reflog, durable=durable)
    layout.ensure()  # the plain files become the links into .userpub/current/
    (root / LAST_SNAPSHOT).unlink(missing_ok=True)
    write_atomic(root / STATUS, b"{}\n", durable=False)
