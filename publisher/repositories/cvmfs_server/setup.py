"""``userpub initrepos``: create this host's cvmfs-server repositories and replicas, as the
original's ``initrepos`` did, and refresh the replicas (``cvmfs_server snapshot``).

For each cvmfs-server repository of the configuration that ``cvmfs_server list`` does not know:

* hosted here: ``cvmfs_server mkfs -o <owner> -z <repo>``, the settings a user-code
  repository needs appended to its ``server.conf`` (:data:`SETTINGS`: a 15 s TTL, garbage
  collection without automatic runs, tags kept a day, enforced limits, autocatalogs), a
  ``.cvmfsdirtab`` giving every ``/<prefix>/*`` and ``/<stamps>/*`` directory its own catalog
  (written in a transaction and published), and ``.cvmfs_master_replica``, so that the peers'
  stratum 1s may replicate it;
* hosted by a peer: ``cvmfs_server add-replica -o <owner> <peer stratum0>/<repo> <key>`` then
  a first ``cvmfs_server snapshot <repo>``.

Nothing that exists is touched: running it again does only what is missing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from publisher.repositories.base import RepositoryError
from publisher.repositories.cvmfs_server.subprocess_log import CommandResult
from publisher.repositories.replicas import replica_origin
from userpub.config import Config, RepositoryConfig

__all__ = ["SETTINGS", "init_repositories", "snapshot"]

log = logging.getLogger("userpub.repository.cvmfs_server")

#: Appended to a new repository's server.conf (the original's initrepos, and a 15 s TTL).
SETTINGS = (
    "CVMFS_GARBAGE_COLLECTION=true",
    'CVMFS_AUTO_TAG_TIMESPAN="1 day ago"',
    "CVMFS_IGNORE_XDIR_HARDLINKS=true",
    "CVMFS_GENERATE_LEGACY_BULK_CHUNKS=false",
    "CVMFS_AUTOCATALOGS=true",
    "CVMFS_ENFORCE_LIMITS=true",
    "CVMFS_FORCE_REMOUNT_WARNING=false",
    "CVMFS_AUTO_GC=false",
    "CVMFS_REPOSITORY_TTL=15",
    "CVMFS_PRINT_STATISTICS=true",
)

Run = Callable[[Sequence[str]], CommandResult]


def _required(run: Run, *args: str) -> CommandResult:
    result = run(args)
    if not result.ok:
        raise RepositoryError(result.describe())
    return result


def _known(run: Run) -> set[str]:
    """The repositories and replicas ``cvmfs_server list`` knows."""
    result = _required(run, "list")
    return {line.split()[0] for line in result.stdout_tail if line.strip()}


def _origin(config: Config, repo: RepositoryConfig) -> str:
    origin = replica_origin(config, repo)
    if origin is None:
        raise RepositoryError(f"repository {repo.name}: neither its origin nor the stratum0 "
                              f"of its peer {repo.host} says where to replicate it from")
    return origin


def _create(config: Config, repo: RepositoryConfig, run: Run, etc: Path, srv: Path,
            owner: str) -> None:
    _required(run, "mkfs", "-o", owner, "-z", repo.name)
    conf = etc / "repositories.d" / repo.name / "server.conf"
    present = set(conf.read_text().splitlines()) if conf.exists() else set()
    with conf.open("a") as f:
        for line in SETTINGS:
            if line not in present:
                f.write(line + "\n")
    _required(run, "transaction", repo.name)
    try:
        dirtab = Path(repo.mount) / ".cvmfsdirtab"
        dirtab.write_text(f"/*\n/{config.server.prefix}/*\n/{config.server.stamps}/*\n")
    except OSError as err:
        run(("abort", "-f", repo.name))
        raise RepositoryError(f"repository {repo.name}: cannot write {dirtab}: {err}") from err
    _required(run, "publish", repo.name)
    (srv / repo.name).mkdir(parents=True, exist_ok=True)
    (srv / repo.name / ".cvmfs_master_replica").write_text(
        "This file marks the repository as replicatable to stratum 1 servers\n")


def init_repositories(config: Config, run: Run, *, etc: Path = Path("/etc/cvmfs"),
                      srv: Path = Path("/srv/cvmfs"), owner: str = "root",
                      keys: Path = Path("/etc/cvmfs/keys")) -> list[str]:
    """Create what is missing (see the module docstring); one line per thing done."""
    done: list[str] = []
    known = _known(run)
    for repo in config.repositories:
        if repo.backend != "cvmfs-server" or repo.name in known:
            continue
        if repo.is_hosted_on(config.server.name):
            _create(config, repo, run, etc, srv, owner)
            done.append(f"created {repo.name} (settings: {', '.join(SETTINGS)})")
            continue
        key = keys / f"{repo.name}.pub"
        if not key.is_file():
            raise RepositoryError(f"repository {repo.name}: its master public key {key} is "
                                  f"missing (copy it from {repo.host})")
        origin = _origin(config, repo)
        _required(run, "add-replica", "-o", owner, origin, str(key))
        _required(run, "snapshot", repo.name)
        done.append(f"replica of {repo.name} from {origin}")
    return done


def snapshot(repo: RepositoryConfig, run: Run) -> CommandResult:
    """Refresh the stratum-1 replica of a peer's repository (``cvmfs_server snapshot``)."""
    return run(("snapshot", repo.name))
