"""The ``userpub verify``, ``userpub ls`` and ``userpub cat`` commands (wired in ``userpub/cli.py``).

Building the parser imports nothing heavy; the reader is imported when a command runs.
"""

from __future__ import annotations

import argparse
import stat
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import rsa

    from cvmfs_verify.catalog import Entry
    from cvmfs_verify.client import Reader


class CommandError(Exception):
    """A command cannot run as asked (no key, unreadable repository); one line for the user."""


def add_verify_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``userpub verify``."""
    _common(parser)
    parser.add_argument("--workers", type=int, default=4, help="objects checked in parallel")
    parser.add_argument("--current-only", action="store_true",
                        help="only the current revision, not the revisions tagged in the history")
    parser.add_argument("--no-recompress", action="store_true",
                        help="do not re-compress objects as stratum 1s and cvmfs_fsck do (faster; "
                             "misses objects they reject)")


def add_ls_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``userpub ls``."""
    _common(parser, optional_key=True)
    parser.add_argument("path", nargs="?", default="/", help="path inside the repository")
    parser.add_argument("-l", "--long", action="store_true",
                        help="mode, links, owner, size, time; symlinks shown, not followed")


def add_cat_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``userpub cat``."""
    _common(parser, optional_key=True)
    parser.add_argument("path", help="file inside the repository")


def _common(parser: argparse.ArgumentParser, *, optional_key: bool = False) -> None:
    parser.add_argument("location", metavar="URL-or-DIR",
                        help="repository URL (http[s]://host/cvmfs/<fqrn>) or stratum-0 directory")
    parser.add_argument("--key", action="append", default=[], metavar="MASTER.pub",
                        help="master public key (PEM) trusted for the whitelist; repeatable"
                             + ("" if optional_key else "; required"))
    parser.add_argument("--repo", help="expected repository name (manifest N)")
    parser.add_argument("--proxy", help="HTTP proxy, e.g. http://squid:3128")
    if optional_key:
        parser.add_argument("--no-verify", action="store_true",
                            help="skip signature and whitelist checks (objects are still checked "
                                 "against their hashes)")


def _keys(args: argparse.Namespace, hint: str = "") -> list[rsa.RSAPublicKey]:
    from cvmfs_verify.signature import MasterKeyError, load_master_keys

    if not args.key:
        raise CommandError(f"--key MASTER.pub is required{hint}")
    try:
        return load_master_keys([Path(k) for k in args.key])
    except MasterKeyError as err:
        raise CommandError(str(err)) from None


def run_verify(args: argparse.Namespace) -> int:
    """Verify a repository: one line per problem and exit 1, or one summary line and exit 0."""
    from cvmfs_verify.fetch import open_source
    from cvmfs_verify.verify import Options, verify_repository

    keys = _keys(args)
    source = open_source(args.location, proxy=args.proxy, repo=args.repo)
    report = verify_repository(source, Options(tuple(keys), repo=args.repo, workers=args.workers,
                                               tags=not args.current_only,
                                               recompress=not args.no_recompress))
    for problem in report.problems:
        print(problem)
    print(("ok: " if report.ok else "FAILED: ") + report.summary())
    return 0 if report.ok else 1


def _reader(args: argparse.Namespace) -> Reader:
    from cvmfs_verify.client import Reader, ReadError
    from cvmfs_verify.fetch import open_source

    keys = None if args.no_verify else _keys(args, " (or --no-verify)")
    source = open_source(args.location, proxy=args.proxy, repo=args.repo)
    try:
        return Reader.open(source, keys, repo=args.repo)
    except ReadError as err:
        raise CommandError(str(err)) from None


def format_entry(entry: Entry, name: str | None = None) -> str:
    """One ``ls -l`` style line."""
    shown = name if name is not None else entry.name.decode("utf-8", "backslashreplace")
    when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(entry.mtime))
    line = (f"{stat.filemode(entry.mode)} {entry.linkcount:3d} {entry.uid:5d} {entry.gid:5d} "
            f"{entry.size:12d} {when} {shown}")
    if entry.is_link:
        line += " -> " + (entry.symlink or b"").decode("utf-8", "backslashreplace")
    return line


def run_ls(args: argparse.Namespace) -> int:
    """List a directory (or show one entry) of a repository."""
    from cvmfs_verify.client import ReadError

    with _reader(args) as reader:
        try:
            found = reader.resolve(args.path, follow=not args.long)
            if found.entry.is_dir:
                entries = reader.listdir(found.path)
                for entry in entries:
                    print(format_entry(entry) if args.long
                          else entry.name.decode("utf-8", "backslashreplace"))
            else:  # one entry, shown under the name asked for (like ls)
                print(format_entry(found.entry, args.path) if args.long else args.path)
        except ReadError as err:
            raise CommandError(str(err)) from None
    return 0


def run_cat(args: argparse.Namespace) -> int:
    """Write a file of a repository to standard output."""
    from cvmfs_verify.client import ReadError

    with _reader(args) as reader:
        try:
            out = sys.stdout.buffer
            for block in reader.read_file(args.path):
                out.write(block)
            out.flush()
        except ReadError as err:
            raise CommandError(str(err)) from None
        except BrokenPipeError:
            return 1
    return 0
