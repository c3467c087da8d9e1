"""The one ``userpub`` command: the only place that wires the stages together."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from userpub import __version__
from userpub.config import Config, ConfigError, load_config, resolve_config_path
from userpub.daemon import Waker, install_signal_handlers, run_daemon
from userpub.errors import Fatal, ServiceError
from userpub_client.cid import InvalidCid, normalize_cid

log = logging.getLogger("userpub")


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), stream=sys.stderr,
                        format="%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s")


def _config(args: argparse.Namespace) -> Config:
    return load_config(resolve_config_path(args.config))


# -- commands --------------------------------------------------------------------------------


def cmd_publisher(args: argparse.Namespace) -> int:
    """Run the publisher of one repository hosted here."""
    from metrics import (
        PublisherMetrics,
        SpoolCollector,
        daemon_registry,
        serve_metrics,
        write_textfile,
    )
    from publisher.daemon import Publisher
    from publisher.repositories import open_repository
    from publisher.repositories.catalog import Catalog
    from spool import Spool

    config = _config(args)
    hosted = config.hosted
    if args.repo is None:
        if len(hosted) != 1:
            names = ", ".join(r.name for r in hosted) or "none"
            raise Fatal(f"--repo is required: this host ({config.server.name}) publishes {names}")
        repo = hosted[0]
    else:
        try:
            repo = config.repository(args.repo)
        except KeyError:
            raise Fatal(f"repository {args.repo!r} is not configured") from None
        if not repo.is_hosted_on(config.server.name):
            raise Fatal(f"repository {repo.name} is published by {repo.host}, "
                        f"not by this server ({config.server.name})")
    registry = daemon_registry()
    metrics = PublisherMetrics(registry)
    spool = Spool(config.server.spool)
    registry.register(SpoolCollector(spool.depth, config.server.name))
    waker = Waker()
    install_signal_handlers(waker)
    daemon = Publisher(config, repo, open_repository(config, repo), spool,
                       Catalog.from_config(config), metrics, waker)
    server = None
    address = _publisher_metrics_address(config, repo.name)
    if address and not args.once:
        try:
            server = serve_metrics(registry, address)
        except OSError as err:
            raise Fatal(f"cannot serve metrics on {address}: {err.strerror}") from None
    try:
        run_daemon(daemon, waker, once=args.once)
    finally:
        if server is not None:
            server.close()
        if args.metrics_textfile:
            write_textfile(registry, Path(args.metrics_textfile))
    return 0


def _publisher_metrics_address(config: Config, repo: str) -> str | None:
    from userpub.config import split_address

    host, port = split_address(config.metrics.publisher_listen)
    if port == 0:
        return None
    index = [r.name for r in config.hosted].index(repo)
    return f"{host}:{port + index}"


def cmd_janitor(args: argparse.Namespace) -> int:
    """Run the cleanup rota, or one cleanup now (``--now``), or show what would go."""
    from janitor.daemon import Janitor, parse_time, run_dry, run_now
    from metrics import JanitorMetrics, daemon_registry, serve_metrics, write_textfile
    from userpub.config import split_address

    config = _config(args)
    as_of = parse_time(args.as_of) if args.as_of else None
    if args.dry_run:
        return run_dry(config, args.repo, as_of, sys.stdout)
    if not args.now and (args.repo or as_of is not None):
        raise Fatal("--repo and --as-of need --now or --dry-run")
    registry = daemon_registry()
    metrics = JanitorMetrics(registry)
    waker = Waker()
    install_signal_handlers(waker)
    server = None
    try:
        if args.now:
            return run_now(config, args.repo, as_of, metrics, waker)
        if split_address(config.metrics.janitor_listen)[1] and not args.once:
            try:
                server = serve_metrics(registry, config.metrics.janitor_listen)
            except OSError as err:
                raise Fatal(f"cannot serve metrics on {config.metrics.janitor_listen}: "
                            f"{err.strerror}") from None
        run_daemon(Janitor(config, metrics, waker), waker, once=args.once)
        return 0
    finally:
        if server is not None:
            server.close()
        if args.metrics_textfile:
            write_textfile(registry, Path(args.metrics_textfile))


def cmd_replicator(args: argparse.Namespace) -> int:
    """Keep this host's replicas fresh: pull each from its origin every replica_interval."""
    from prometheus_client import CollectorRegistry

    from metrics import ReplicaCollector, ReplicatorMetrics, serve_metrics, write_textfile
    from publisher.replicator import Replicator, freshness_records
    from userpub.config import split_address

    config = _config(args)
    registry = CollectorRegistry()
    metrics = ReplicatorMetrics(registry)
    registry.register(ReplicaCollector(lambda: freshness_records(config)))
    waker = Waker()
    install_signal_handlers(waker)
    daemon = Replicator(config, metrics, waker, only=args.repo, threads=args.threads)
    server = None
    address = config.metrics.replicator_listen
    if split_address(address)[1] and not args.once:
        try:
            server = serve_metrics(registry, address)
        except OSError as err:
            raise Fatal(f"cannot serve metrics on {address}: {err.strerror}") from None
    try:
        run_daemon(daemon, waker, once=args.once)
    finally:
        if server is not None:
            server.close()
        if args.metrics_textfile:
            write_textfile(registry, Path(args.metrics_textfile))
    return 1 if args.once and daemon.failed else 0


def cmd_restore(args: argparse.Namespace) -> int:
    """Rebuild a lost cvmfs-native repository hosted here from the companion's replica."""
    from publisher.repositories.cvmfs_native.restore import restore_repository

    config = _config(args)
    try:
        repo = config.repository(args.repo)
    except KeyError:
        raise Fatal(f"repository {args.repo!r} is not configured") from None
    source = args.source
    if "://" not in source:  # a peer's name: its stratum0 serves its replicas
        try:
            source = config.peer(source).stratum0
        except KeyError:
            raise Fatal(f"--from {source!r} is neither a URL nor a [[peer]] name") from None
        if not source:
            raise Fatal(f"peer {args.source} has no stratum0 URL to restore from")
    print(restore_repository(config, repo, source, threads=args.threads).describe())
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    """Serve the HTTPS publication API (and the plain-HTTP ping/config/metrics listener)."""
    from ingest.server import run_ingest
    from metrics import SpoolCollector, daemon_registry
    from spool import Spool

    config = _config(args)
    if config.ingest is None:
        raise Fatal(f"{config.path} has no [ingest] section: this server takes no uploads")
    registry = daemon_registry()
    registry.register(SpoolCollector(Spool(config.server.spool).depth, config.server.name))
    waker = Waker()
    install_signal_handlers(waker)
    run_ingest(config, waker, registry,
               ready_file=Path(args.ready_file) if args.ready_file else None)
    return 0


def cmd_drop(args: argparse.Namespace) -> int:
    """Copy a tarball into the spool atomically; print the CID."""
    from spool import CidMismatch, DropResult, Spool

    config = _config(args)
    wanted = normalize_cid(args.cid) if args.cid is not None else None
    source = Path(args.tarball)
    if not source.is_file():
        raise Fatal(f"{source}: not a file")
    spool = Spool(config.server.spool)
    problems = spool.layout_problems(create=True)
    if problems:
        raise Fatal(*problems)
    who = f"{os.environ.get('USER', 'operator')} (uid {os.getuid()}, userpub drop)"
    try:
        cid, result = spool.drop_file(source, wanted, who)
    except CidMismatch as err:
        raise Fatal(f"{source}: {err}") from None
    print(cid if result is DropResult.QUEUED else f"{cid} (already queued)")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Print where a CID stands: PRESENT:<path>, QUEUED, PUBLISHING, FAILED:<reason>, MISSING;
    exit with the client's codes (3 MISSING, 6 FAILED). Without a CID: one line per
    repository (role, revision, replica freshness)."""
    from publisher.repositories.catalog import Catalog
    from spool import Spool, State
    from userpub_client.cli import Exit

    config = _config(args)
    if args.cid is None:
        from publisher.repositories.overview import repository_lines

        print("\n".join(repository_lines(config)))
        return Exit.OK
    cid = normalize_cid(args.cid)
    status = Spool(config.server.spool).status(cid)
    if status.state is State.QUEUED:
        print("QUEUED")
    elif status.state is State.PUBLISHING:
        print("PUBLISHING")
    elif (location := Catalog.from_config(config).locate(cid)) is not None:
        print(f"PRESENT:{location.path}")
    elif status.state is State.FAILED:
        print(f"FAILED:{status.reason}")
        return Exit.FAILED
    else:
        print("MISSING")
        return Exit.MISSING
    return Exit.OK


def cmd_check_config(args: argparse.Namespace) -> int:
    """Validate the configuration and run every startup check of this host's daemons, as
    they run them, without changing anything; every problem is one ``fatal:`` line."""
    from ingest.server import startup_problems as ingest_problems
    from janitor.daemon import startup_problems as janitor_problems
    from publisher.daemon import startup_problems as publisher_problems
    from userpub.checks import bind_problem, in_use, listeners

    config = _config(args)
    problems: list[str] = []
    if config.ingest is not None:
        problems += ingest_problems(config, create=False, bind=False)
    for repo in config.hosted:
        problems += publisher_problems(config, repo, create=False)
    if config.hosted:
        problems += janitor_problems(config, create=False)
    notes = []
    for what, address in listeners(config):
        problem = bind_problem(address, what)
        if in_use(problem):  # by this very service, maybe: not a problem of the configuration
            notes.append(f"note: {address} ({what}) is in use right now")
        elif problem is not None:
            problems.append(problem)
    if problems:
        raise Fatal(*dict.fromkeys(problems))  # each once (a shared port is every daemon's)
    for note in notes:
        print(note, file=sys.stderr)
    print(f"configuration {config.path} is valid; server {config.server.name}, "
          f"hosting {', '.join(r.name for r in config.hosted) or 'no repository'}")
    return 0


def cmd_metrics_targets(args: argparse.Namespace) -> int:
    """Print this host's Prometheus scrape targets."""
    from metrics.targets import file_sd_json, scrape_targets

    targets = scrape_targets(_config(args))
    if args.json:
        print(file_sd_json(targets))
    else:
        for target in targets:
            print(target.address)
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    """Write an example site for this host; print what a client needs as export lines."""
    from devsite.site import write_example_site

    print("\n".join(write_example_site(Path(args.directory).resolve())))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Start every daemon of this host and keep them running."""
    from userpub.supervisor import Supervisor, plan_children

    config = _config(args)
    waker = Waker()
    install_signal_handlers(waker)
    supervisor = Supervisor(plan_children(config, sys.executable), waker)
    return supervisor.run()


def cmd_client(args: argparse.Namespace) -> int:
    """Talk to the ingest servers as a grid user (publish, exists, update, status, config)."""
    from userpub_client.cli import run_client

    return run_client(args)


def cmd_cid(args: argparse.Namespace) -> int:
    """Print the CID of a tarball."""
    from userpub_client.cli import run_cid

    return run_cid(args)


def cmd_tar(args: argparse.Namespace) -> int:
    """Make a reproducible tarball of a directory."""
    from userpub_client.cli import run_tar

    return run_tar(args)


def cmd_wait(args: argparse.Namespace) -> int:
    """Wait on a worker node until a CID is visible under /cvmfs."""
    from userpub_client.cli import run_wait

    return run_wait(args)


def cmd_verify(args: argparse.Namespace) -> int:
    """Verify a CVMFS repository (URL or directory) against the storage-format specification."""
    from cvmfs_verify.commands import CommandError, run_verify

    try:
        return run_verify(args)
    except CommandError as err:
        raise Fatal(str(err)) from None


def cmd_ls(args: argparse.Namespace) -> int:
    """List a directory of a CVMFS repository, read as a client does."""
    from cvmfs_verify.commands import CommandError, run_ls

    try:
        return run_ls(args)
    except CommandError as err:
        raise Fatal(str(err)) from None


def cmd_cat(args: argparse.Namespace) -> int:
    """Print a file of a CVMFS repository, read as a client does."""
    from cvmfs_verify.commands import CommandError, run_cat

    try:
        return run_cat(args)
    except CommandError as err:
        raise Fatal(str(err)) from None


def cmd_initrepos(args: argparse.Namespace) -> int:
    """Create this host's cvmfs-server repositories and replicas (what is missing)."""
    import logging as logging_module
    import shutil

    from publisher.repositories.cvmfs_server.setup import init_repositories
    from publisher.repositories.cvmfs_server.subprocess_log import run_command

    config = _config(args)
    program = shutil.which("cvmfs_server")
    if program is None:
        raise Fatal("cvmfs_server not found on PATH (install cvmfs-server)")
    logger = logging_module.getLogger("userpub.repository.cvmfs_server")

    def run(argv: Sequence[str]) -> Any:
        return run_command([program, *argv], timeout=args.timeout, log=logger)

    for line in init_repositories(config, run, etc=Path(args.etc), srv=Path(args.srv),
                                  owner=args.owner, keys=Path(args.keys)):
        print(line)
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    """Create the master key, repository key and certificate of a cvmfs-native repository."""
    from publisher.repositories.cvmfs_native import KeysError, init_keys, key_files

    config = _config(args)
    try:
        repo = config.repository(args.repo)
    except KeyError:
        raise Fatal(f"repository {args.repo!r} is not configured") from None
    if repo.backend != "cvmfs-native":
        raise Fatal(f"repository {repo.name} uses the {repo.backend} backend, not cvmfs-native")
    files = key_files(config, repo)
    try:
        init_keys(files.directory, repo.name)
    except (KeysError, OSError) as err:
        raise Fatal(str(err)) from None
    for path in files.all():
        print(path)
    print(f"clients trust {files.master_public}: install it as /etc/cvmfs/keys/<domain>/"
          f"{repo.name}.pub (CVMFS_KEYS_DIR)")
    return 0


def cmd_recompress(args: argparse.Namespace) -> int:
    """Rewrite a cvmfs-native repository into the compression genuine CernVM-FS tools expect."""
    import sqlite3
    import zlib

    from publisher.repositories.base import RepositoryError
    from publisher.repositories.cvmfs_native import KeysError, open_native
    from publisher.repositories.cvmfs_native.migrate import recompress

    config = _config(args)
    try:
        repo = config.repository(args.repo)
    except KeyError:
        raise Fatal(f"repository {args.repo!r} is not configured") from None
    if repo.backend != "cvmfs-native" or not repo.is_hosted_on(config.server.name):
        raise Fatal(f"repository {repo.name} is not a cvmfs-native repository hosted here")
    try:
        result = recompress(open_native(config, repo), max(0, args.processes))
    except (RepositoryError, KeysError, OSError, sqlite3.Error, zlib.error) as err:
        raise Fatal(f"{repo.name}: recompress failed: {err}") from None
    print(result.summary(repo.name))
    return 0


# -- parser ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``userpub``."""
    parser = argparse.ArgumentParser(prog="userpub", description=__doc__)
    parser.add_argument("--config", help="configuration file (default: $USERPUB_CONFIG, "
                                         "else /etc/userpub/userpub.toml)")
    parser.add_argument("--log-level", default=os.environ.get("USERPUB_LOG_LEVEL", "info"))
    parser.add_argument("--version", action="version", version=f"userpub {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], int], text: str
            ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=text, description=text)
        p.set_defaults(func=func)
        return p

    p = add("publisher", cmd_publisher, "publish spool entries into one repository hosted here")
    p.add_argument("--repo", help="repository name (optional when this host publishes one)")
    p.add_argument("--once", action="store_true", help="one pass, then exit")
    p.add_argument("--metrics-textfile", help="write metrics to this file on exit")
    p = add("janitor", cmd_janitor, "remove unused code: the hourly rota, or one cleanup now")
    p.add_argument("--now", action="store_true", help="clean now (--repo, or every hosted one)")
    p.add_argument("--repo", help="repository to clean or inspect (with --now or --dry-run)")
    p.add_argument("--dry-run", action="store_true", help="print what would go and why; no change")
    p.add_argument("--as-of", help="judge ages as if it were this ISO 8601 time")
    p.add_argument("--once", action="store_true", help="run what the rota has due, then exit")
    p.add_argument("--metrics-textfile", help="write metrics to this file on exit")
    p = add("replicator", cmd_replicator, "keep this host's replicas fresh (stratum-1 pulls)")
    p.add_argument("--repo", help="pull only this replica")
    p.add_argument("--once", action="store_true", help="pull each replica once, then exit")
    p.add_argument("--threads", type=int, default=4, help="parallel fetches (default 4)")
    p.add_argument("--metrics-textfile", help="write metrics to this file on exit")
    p = add("restore", cmd_restore, "rebuild a lost repository from the companion's replica")
    p.add_argument("--from", dest="source", required=True, metavar="PEER|URL",
                   help="a [[peer]] name, or the replica's URL "
                        "http://<companion>:<port>/cvmfs[/<repo>]")
    p.add_argument("--threads", type=int, default=4, help="parallel fetches (default 4)")
    p.add_argument("repo", help="repository name (published by this server)")
    p = add("ingest", cmd_ingest, "serve the HTTPS publication API")
    p.add_argument("--ready-file", help="write the bound addresses here (JSON) once serving")
    p = add("drop", cmd_drop, "queue a tarball for publication (atomic)")
    p.add_argument("tarball")
    p.add_argument("--cid", help="content ID (default: the tarball's sha256)")
    p = add("status", cmd_status, "where a CID stands (without one: every repository)")
    p.add_argument("cid", nargs="?")
    add("check-config", cmd_check_config,
        "validate the configuration and run every daemon's startup checks (changes nothing)")
    add("run", cmd_run, "start all daemons of this host under one supervisor")
    p = add("metrics-targets", cmd_metrics_targets, "print this host's Prometheus scrape targets")
    p.add_argument("--json", action="store_true", help="file-based service discovery JSON")
    p = add("init", cmd_init, "write an example configuration (for trying things out)")
    p.add_argument("directory")
    from userpub_client import cli as client_cli

    client_cli.add_client_parser(add("client", cmd_client, "grid user's client of the servers"))
    client_cli.add_cid_parser(add("cid", cmd_cid, "print a tarball's CID (GROUP/<sha256>)"))
    client_cli.add_tar_parser(add("tar", cmd_tar, "make a reproducible tarball of a directory"))
    client_cli.add_wait_parser(add("wait", cmd_wait, "wait until a CID is visible under /cvmfs"))
    from cvmfs_verify import commands as cvmfs_commands

    cvmfs_commands.add_verify_arguments(add("verify", cmd_verify, "verify a CVMFS repository"))
    cvmfs_commands.add_ls_arguments(add("ls", cmd_ls, "list a directory of a CVMFS repository"))
    cvmfs_commands.add_cat_arguments(add("cat", cmd_cat, "print a file of a CVMFS repository"))
    p = add("initrepos", cmd_initrepos,
            "create this host's cvmfs-server repositories and replicas (what is missing)")
    p.add_argument("--owner", default="root", help="the user owning the repositories")
    p.add_argument("--etc", default="/etc/cvmfs", help="cvmfs_server's configuration directory")
    p.add_argument("--srv", default="/srv/cvmfs", help="where cvmfs_server stores repositories")
    p.add_argument("--keys", default="/etc/cvmfs/keys", help="the peers' master public keys")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per command")
    p = add("keys", cmd_keys, "keys of a cvmfs-native repository (init: create them)")
    p.add_argument("action", choices=["init"])
    p.add_argument("repo", help="repository name")
    p = add("recompress", cmd_recompress, "store a cvmfs-native repository as CernVM-FS "
            "compresses (one new revision; for repositories written before issue 20)")
    p.add_argument("repo", help="repository name")
    p.add_argument("--processes", type=int, default=os.cpu_count() or 2,
                   help="worker processes re-compressing objects (0: none)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse, run, and turn startup problems into one ``fatal:`` line each."""
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    try:
        result: int = args.func(args)
    except ConfigError as err:
        for problem in err.problems:
            print(f"fatal: {problem}", file=sys.stderr)
        return 1
    except ServiceError as err:  # Fatal too
        for problem in err.problems:
            print(f"fatal: {problem}", file=sys.stderr)
        return 1
    except InvalidCid as err:
        print(f"fatal: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return result


if __name__ == "__main__":
    sys.exit(main())
