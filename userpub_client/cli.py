"""The grid user's commands: ``userpub-client OPERATION`` alone, or inside the server's command
as ``userpub client OPERATION``, ``userpub cid``, ``userpub tar``, ``userpub wait``.

:func:`main` is the standalone command; the server's ``userpub/cli.py`` registers the same
parsers and calls the ``run_*`` functions. Everything here uses the standard library only,
so the client works wherever Python 3.9 or later does.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Mapping
from enum import IntEnum
from pathlib import Path

from userpub_client import __version__
from userpub_client.api import (
    Answer,
    ApiError,
    ClientError,
    PubApi,
    RefusedError,
    RetryPolicy,
    UnavailableError,
    UnreachableError,
    servers_from,
)
from userpub_client.cid import InvalidCid, normalize_cid
from userpub_client.credentials import (
    CredentialError,
    ca_locations,
    find_credentials,
    make_ssl_context,
)
from userpub_client.progress import Progress
from userpub_client.reproducible_tar import TarballError, check_tarball, make_tarball, tarball_cid
from userpub_client.wait import wait_for

Say = Callable[[str], None]


class Exit(IntEnum):
    """Exit codes of the client commands (see EXIT_CODES)."""

    OK = 0
    ERROR = 1
    USAGE = 2
    MISSING = 3
    REFUSED = 4
    UNAVAILABLE = 5
    FAILED = 6
    TIMEOUT = 7


EXIT_CODES = """exit codes:
  0  done: published, present, found
  1  local problem: tarball, CID, credentials, CA files, server list (also: no server name
     resolves, or no server's certificate is trusted; never retried)
  2  usage error
  3  the CID is MISSING (exists, update, status)
  4  refused by the server (a 4xx answer: bad request, not authorised, too large)
  5  no server gave a usable answer after all retries (connection errors, 5xx, 507)
  6  the publication FAILED (the server's reason is printed)
  7  timed out (waiting for the publication, or for the CID to appear)
"""


class PublishFailedError(Exception):
    """The server reported FAILED:<reason>."""


class TimedOutError(Exception):
    """The publication did not complete within the timeout."""


def _group_default(env: Mapping[str, str]) -> str | None:
    return env.get("JOBSUB_GROUP") or env.get("GROUP") or None


# -- parsers ----------------------------------------------------------------------------------


def _decorate(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EXIT_CODES
    parser.formatter_class = argparse.RawDescriptionHelpFormatter


def add_client_parser(parser: argparse.ArgumentParser) -> None:
    """Sub-commands of ``userpub client`` (parser made by cli.py): the operations on the
    servers, and ``wait`` (the same as ``userpub wait``)."""
    _decorate(parser)
    sub = parser.add_subparsers(dest="client_command", required=True, metavar="OPERATION")
    _add_operations(sub)
    text = "wait until a CID is visible under /cvmfs (on a worker node)"
    wait = sub.add_parser("wait", help=text, description=text)
    add_wait_parser(wait)
    wait.set_defaults(client_command="wait")


def _add_operations(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The operations on the servers (publish, exists, ...) as sub-commands of ``sub``."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--server", action="append", metavar="HOST[:PORT]|URL",
                        help="ingest server (repeatable; default: $USERPUB_SERVERS, else "
                             "$JOBSUB_DROPBOX_SERVER_LIST; HTTPS port 443 unless given)")
    common.add_argument("--proxy", help="X.509 proxy file (default: $X509_USER_PROXY, "
                                        "else /tmp/x509up_u<uid>, if no token is found)")
    common.add_argument("--token-file", help="bearer token file (default: $BEARER_TOKEN, "
                        "$BEARER_TOKEN_FILE, $XDG_RUNTIME_DIR/bt_u<uid>, /tmp/bt_u<uid>)")
    common.add_argument("--ca-bundle", help="CA certificates file (default: $USERPUB_CA_BUNDLE;"
                                            " system CAs and $SSL_CERT_FILE are always used)")
    common.add_argument("--ca-dir", help="CA directory, hashed names (default: $X509_CERT_DIR,"
                                         " else /etc/grid-security/certificates)")
    common.add_argument("--retries", type=int, default=5, help="retries per call (default 5)")
    common.add_argument("--retry-delay", type=float, default=2.0,
                        help="first backoff delay in seconds, doubled each retry (default 2)")
    common.add_argument("--socket-timeout", type=float, default=60.0,
                        help="seconds without progress before a request fails (default 60)")
    common.add_argument("-q", "--quiet", action="store_true", help="only errors on stderr")

    def add(name: str, text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=text, description=text)
        _decorate(p)
        p.set_defaults(client_command=name)
        return p

    p = add("publish", "publish a tarball: exists, upload if missing, wait until published")
    p.add_argument("tarball")
    p.add_argument("--group", "-G", default=_group_default(os.environ),
                   help="the CID is GROUP/<sha256 of the tarball> (default: $JOBSUB_GROUP, "
                        "else $GROUP)")
    p.add_argument("--cid", help="publish under this CID instead")
    p.add_argument("--no-wait", action="store_true",
                   help="stop after the upload (prints the CID, or the path if present)")
    p.add_argument("--timeout", type=float, default=1200.0,
                   help="seconds to wait for the publication after the upload (default 1200)")
    p.add_argument("--progress", choices=("auto", "always", "never"), default="auto",
                   help="upload progress bar on stderr (auto: only on a terminal)")
    add("exists", "is a CID published? prints its path").add_argument("cid")
    add("update", "like exists, and keep the CID from expiring").add_argument("cid")
    p = add("status", "QUEUED, PUBLISHING, PRESENT:<path>, FAILED:<reason> or MISSING")
    p.add_argument("cid")
    p.add_argument("--wait", action="store_true", help="follow until PRESENT or FAILED")
    p.add_argument("--timeout", type=float, default=1200.0, help="with --wait (default 1200)")
    add("config", "the repositories the service publishes to (comma-separated)")
    add("ping", "is the server up?")


def add_cid_parser(parser: argparse.ArgumentParser) -> None:
    """``userpub cid TARBALL [--group G]``."""
    _decorate(parser)
    parser.add_argument("tarball")
    parser.add_argument("--group", "-G", default=_group_default(os.environ),
                        help="prefix GROUP/ (default: $JOBSUB_GROUP, else $GROUP)")


def add_tar_parser(parser: argparse.ArgumentParser) -> None:
    """``userpub tar DIR [-o OUT]``."""
    _decorate(parser)
    parser.add_argument("directory")
    parser.add_argument("-o", "--output", help="output file (default: ./<DIR name>.tar.gz)")
    parser.add_argument("--mtime", type=int, default=0,
                        help="time stamp of every member, seconds since 1970 (default 0)")
    parser.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                        help="leave out names matching this shell pattern (repeatable)")
    parser.add_argument("--group", "-G", default=_group_default(os.environ),
                        help="print the CID as GROUP/<sha256> (default: $JOBSUB_GROUP, $GROUP)")


def add_wait_parser(parser: argparse.ArgumentParser) -> None:
    """``userpub wait CID --repos R1,R2 ...``."""
    _decorate(parser)
    parser.add_argument("cid")
    parser.add_argument("--repos", default=os.environ.get("USERPUB_REPOS"),
                        help="repositories to look in, comma-separated (default: $USERPUB_REPOS;"
                             " `userpub client config` prints them)")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds (default 1200)")
    parser.add_argument("--interval", type=float, default=15.0,
                        help="seconds between rounds (default 15)")
    parser.add_argument("--mount-root", default="/cvmfs", help="default /cvmfs")
    parser.add_argument("--prefix", default="sw", help="directory of the CIDs (default sw)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only errors on stderr")


# -- commands ---------------------------------------------------------------------------------


def _sayer(quiet: bool, prefix: str = "userpub") -> Say:
    def say(message: str) -> None:
        if not quiet:
            print(f"{prefix}: {message}", file=sys.stderr, flush=True)
    return say


def _error(message: str) -> None:
    print(f"userpub: error: {message}", file=sys.stderr, flush=True)


def make_api(args: argparse.Namespace, say: Say, env: Mapping[str, str] = os.environ) -> PubApi:
    """The API session the options describe (credentials, CAs, servers, retries)."""
    credentials = find_credentials(env, proxy=args.proxy, token_file=args.token_file)
    for note in credentials.notes:
        say(note)
    servers = servers_from(args.server or (), env)
    if credentials.missing and args.client_command not in ANONYMOUS:
        raise CredentialError(credentials.why_missing())  # the server would answer 403
    if credentials.token and any(s.scheme == "http" and not s.is_loopback for s in servers):
        say("the bearer token is not sent over plain http:// except to this host")
    if args.client_command not in ("config", "ping"):
        say(f"using {credentials.describe()}")
    bundle, directory = ca_locations(env, args.ca_bundle, args.ca_dir)
    context = make_ssl_context(credentials, ca_bundle=bundle, ca_dir=directory)
    policy = RetryPolicy(attempts=max(0, args.retries) + 1, base_delay=args.retry_delay)
    return PubApi(servers, context, credentials, policy, log=say, timeout=args.socket_timeout)


ANONYMOUS = ("config", "ping")  # the operations a server answers without credentials


def follow(api: PubApi, cid: str, *, timeout: float, say: Say, interval: float = 1.0,
           max_interval: float = 10.0, clock: Callable[[], float] = time.monotonic,
           sleep: Callable[[float], None] = time.sleep) -> Answer:
    """Poll ``status`` until PRESENT or FAILED (returned); TimedOutError after ``timeout``."""
    deadline = clock() + timeout
    last = ""
    while True:
        answer = api.status(cid)
        if answer.state in ("PRESENT", "FAILED"):
            return answer
        if answer.state != last:
            say(f"{cid}: {answer.state.lower()} ({answer.server})")
            last = answer.state
        remaining = deadline - clock()
        if remaining <= 0:
            raise TimedOutError(f"{cid} is still {answer.state} after {timeout:.0f} s; "
                                f"check later with `userpub client status {cid}`")
        sleep(min(interval, remaining))
        interval = min(interval * 1.5, max_interval)


def publish(api: PubApi, tarball: Path, cid: str, *, wait: bool, timeout: float, say: Say,
            progress: Progress | None = None, interval: float = 1.0,
            clock: Callable[[], float] = time.monotonic,
            sleep: Callable[[float], None] = time.sleep) -> Answer:
    """exists -> (update | upload -> follow status); the final answer (PRESENT/OK/FAILED)."""
    answer = api.exists(cid)
    if answer.state == "PRESENT":
        say(f"{cid} is already published ({answer.server})")
        try:
            api.update(cid)
        except ApiError as err:
            say(f"warning: could not refresh the time stamp: {err}")
        return answer
    say(f"uploading {tarball} as {cid} to {api.current}")
    answer = api.publish(tarball, cid, progress)
    if answer.state == "PRESENT" or not wait:
        return answer
    say(f"uploaded to {answer.server}; waiting for the publication")
    return follow(api, cid, timeout=timeout, say=say, interval=interval, clock=clock, sleep=sleep)


def _client(args: argparse.Namespace, say: Say) -> int:
    op = args.client_command
    if op == "publish":
        tarball = Path(args.tarball)
        size = check_tarball(tarball)
        if args.cid is None and not args.group:
            raise ClientError("give --group GROUP (or --cid CID): the CID is GROUP/<sha256>")
        cid = normalize_cid(args.cid or tarball_cid(tarball, args.group))
        api = make_api(args, say)
        progress = Progress(size, sys.stderr, enabled=None if args.progress == "auto"
                            else args.progress == "always")
        answer = publish(api, tarball, cid, wait=not args.no_wait, timeout=args.timeout,
                         say=say, progress=progress)
        if answer.state == "FAILED":
            raise PublishFailedError(f"publication of {cid} failed: {answer.detail}")
        print(answer.detail if answer.state == "PRESENT" else cid)
        return Exit.OK
    if op in ("config", "ping"):
        api = make_api(args, say)
        print(",".join(api.config()) if op == "config" else api.ping())
        return Exit.OK
    cid = normalize_cid(args.cid)
    api = make_api(args, say)
    if op == "status" and args.wait:
        answer = follow(api, cid, timeout=args.timeout, say=say)
    else:
        answer = {"exists": api.exists, "update": api.update, "status": api.status}[op](cid)
    if op == "status":
        print(f"{answer.state}:{answer.detail}" if answer.detail else answer.state)
    elif answer.state == "PRESENT":
        print(answer.detail)
    else:
        say(f"{cid} is MISSING ({answer.server})")
    return {"MISSING": Exit.MISSING, "FAILED": Exit.FAILED}.get(answer.state, Exit.OK)


def run_client(args: argparse.Namespace) -> int:
    """``userpub client OPERATION``: run it and map failures to the documented exit codes."""
    if args.client_command == "wait":
        return run_wait(args)
    say = _sayer(args.quiet)
    try:
        return _client(args, say)
    except (ClientError, CredentialError, TarballError, InvalidCid) as err:
        _error(str(err))
        return Exit.ERROR
    except UnreachableError as err:
        _error(f"{err} (not retried: the same answer would come again)")
        return Exit.ERROR
    except RefusedError as err:
        _error(str(err))
        return Exit.REFUSED
    except UnavailableError as err:
        for line in err.errors[:-1]:
            say(f"  {line}")
        _error(str(err))
        return Exit.UNAVAILABLE
    except ApiError as err:
        _error(str(err))
        return Exit.UNAVAILABLE
    except PublishFailedError as err:
        _error(str(err))
        return Exit.FAILED
    except TimedOutError as err:
        _error(str(err))
        return Exit.TIMEOUT


def run_cid(args: argparse.Namespace) -> int:
    """Print the CID of a tarball."""
    path = Path(args.tarball)
    if not path.is_file():
        _error(f"{path}: not a file")
        return Exit.ERROR
    try:
        print(normalize_cid(tarball_cid(path, args.group)))
    except (TarballError, InvalidCid) as err:
        _error(str(err))
        return Exit.ERROR
    return Exit.OK


def run_tar(args: argparse.Namespace) -> int:
    """Write a reproducible tarball; print its path (and its CID on stderr)."""
    source = Path(args.directory)
    output = Path(args.output or f"{source.resolve().name or 'root'}.tar.gz")
    try:
        summary = make_tarball(source, output, mtime=args.mtime, excludes=args.exclude)
        cid = tarball_cid(summary.path, args.group)
    except TarballError as err:
        _error(str(err))
        return Exit.ERROR
    except OSError as err:
        _error(f"cannot write {output}: {err.strerror or err}")
        return Exit.ERROR
    print(f"userpub: {summary.files} files, {summary.directories} directories, "
          f"{summary.symlinks} symlinks, {summary.size} bytes; cid {cid}", file=sys.stderr)
    print(output)
    return Exit.OK


def run_wait(args: argparse.Namespace) -> int:
    """Wait for a CID to appear under the mount root; print its path."""
    say = _sayer(args.quiet, "userpub wait")
    repos = [r for r in (args.repos or "").replace(",", " ").split() if r]
    if not repos:
        _error("give --repos R1,R2,... (or set USERPUB_REPOS)")
        return Exit.USAGE
    if args.interval <= 0 or args.timeout < 0:
        _error("--interval must be positive and --timeout not negative")
        return Exit.USAGE
    try:
        cid = normalize_cid(args.cid)
    except InvalidCid as err:
        _error(str(err))
        return Exit.ERROR
    reported = [0.0]

    def on_round(rounds: int, elapsed: float) -> None:
        if rounds == 1:
            say(f"waiting up to {args.timeout:g} s for {cid} in {len(repos)} repositories")
        elif elapsed - reported[0] >= 60:
            reported[0] = elapsed
            say(f"still waiting for {cid} ({elapsed:.0f} s)")

    result = wait_for(cid, repos, mount_root=args.mount_root, prefix=args.prefix,
                      timeout=args.timeout, interval=args.interval, on_round=on_round)
    if result.path is None:
        _error(f"timeout: {cid} did not appear within {args.timeout:g} s "
               f"({result.rounds} checks, every {args.interval:g} s) in any of: "
               + ", ".join(map(str, result.candidates)))
        return Exit.TIMEOUT
    print(result.path)
    return Exit.OK


# -- the standalone command -------------------------------------------------------------------


def build_parser(prog: str = "userpub-client") -> argparse.ArgumentParser:
    """The parser of the standalone client: the operations, plus cid, tar and wait."""
    parser = argparse.ArgumentParser(
        prog=prog, description="Publish code tarballs with cvmfs-userpub and find them on "
                               "worker nodes.")
    _decorate(parser)
    parser.add_argument("--version", action="version", version=f"{prog} {__version__}")
    sub = parser.add_subparsers(dest="client_command", required=True, metavar="COMMAND")
    _add_operations(sub)
    for name, adder, run, text in (
            ("cid", add_cid_parser, run_cid, "print a tarball's CID (GROUP/<sha256>)"),
            ("tar", add_tar_parser, run_tar, "make a reproducible tarball of a directory"),
            ("wait", add_wait_parser, run_wait, "wait until a CID is visible under /cvmfs")):
        p = sub.add_parser(name, help=text, description=text)
        adder(p)
        p.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """``userpub-client COMMAND``: run it; the exit code is one of EXIT_CODES."""
    args = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = getattr(args, "run", run_client)
    try:
        return int(run(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
