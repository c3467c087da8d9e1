"""The publish workflow and the ``userpub client`` commands against a scripted service.

exists first (PRESENT: update and stop), else upload to the same server and follow ``status``
(QUEUED -> PUBLISHING -> PRESENT, or FAILED with the reason); then the exit codes of the CLI.
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import pytest

from tests.helpers import make_tarball
from tests.requirements import machine_skip
from tests.unit.test_client_fakes import (
    FakeServer,
    Reply,
    Seen,
    make_pki,
    refusing_url,
    server_context,
)
from userpub.cli import main
from userpub_client.api import PubApi, RetryPolicy, parse_server
from userpub_client.cli import Exit, TimedOutError, follow, publish
from userpub_client.credentials import Credentials, make_ssl_context

pytestmark = pytest.mark.timeout(60)
PATH = "/cvmfs/repo1.example.org/sw/"


class Service:
    """A scripted /pubapi: ``exists`` answer, then ``statuses`` in turn after an upload."""

    def __init__(self, *, present: bool = False, statuses: tuple[str, ...] = ("PRESENT",),
                 publish: str = "OK", refuse: Reply | None = None) -> None:
        self.present, self.statuses, self.publish = present, list(statuses), publish
        self.refuse = refuse

    def __call__(self, seen: Seen) -> Reply:
        endpoint = seen.endpoint.rsplit("/", 1)[-1]
        cid = seen.query.get("cid", "")
        if self.refuse is not None:
            return self.refuse
        if endpoint in ("exists", "update"):
            return Reply(body=f"PRESENT:{PATH}{cid}\n" if self.present else "MISSING\n")
        if endpoint == "publish":
            return Reply(body=(f"PRESENT:{PATH}{cid}\n" if self.publish == "PRESENT" else "OK\n"))
        if endpoint == "status":
            state = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
            return Reply(body=f"PRESENT:{PATH}{cid}\n" if state == "PRESENT" else f"{state}\n")
        if endpoint == "config":
            return Reply(body="repos:repo1.example.org,repo2.example.org\n")
        return Reply(body="OK\n")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def tarball(tmp_path) -> Path:
    return make_tarball(tmp_path / "code.tar.gz", {"bin/run.sh": b"echo hi\n"})


class Clock:
    """A fake monotonic clock advanced by the fake sleep."""

    def __init__(self) -> None:
        self.now, self.sleeps = 0.0, []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def make_api(urls, pki, seed=0):
    creds = Credentials(proxy=pki.proxy)
    return PubApi([parse_server(u) for u in urls],
                  make_ssl_context(creds, ca_bundle=str(pki.ca_file)), creds,
                  RetryPolicy(attempts=3, base_delay=0.0), rng=random.Random(seed),
                  sleep=lambda _s: None, timeout=10)


def run_publish(api, tarball, clock, messages, **kw):
    return publish(api, tarball, "g/abc", wait=kw.pop("wait", True), timeout=kw.pop("timeout", 60),
                   say=messages.append, clock=clock, sleep=clock.sleep, **kw)


# -- the workflow ------------------------------------------------------------------------------


def test_already_present_is_updated_not_uploaded(pki, tarball):
    with FakeServer(Service(present=True), server_context(pki)) as srv:
        clock, messages = Clock(), []
        answer = run_publish(make_api([srv.url], pki), tarball, clock, messages)
    assert (answer.state, answer.detail) == ("PRESENT", PATH + "g/abc")
    assert srv.endpoints() == ["exists", "update"]
    assert "already published" in messages[0]


def test_queued_publishing_present_on_one_server(pki, tarball):
    service = Service(statuses=("QUEUED", "QUEUED", "PUBLISHING", "PRESENT"))
    with FakeServer(service, server_context(pki)) as a, \
            FakeServer(service, server_context(pki)) as b:
        clock, messages = Clock(), []
        answer = run_publish(make_api([a.url, b.url], pki), tarball, clock, messages)
    assert (answer.state, answer.detail) == ("PRESENT", PATH + "g/abc")
    used = a if a.requests else b
    assert not (a.requests and b.requests)  # exists, publish and status: one server
    assert used.endpoints() == ["exists", "publish", "status", "status", "status", "status"]
    upload = used.requests[1]
    assert upload.body_sha256 == hashlib.sha256(tarball.read_bytes()).hexdigest()
    assert clock.sleeps == [1.0, 1.5, 2.25]
    assert [m.split(":")[1].split()[0] for m in messages if m.startswith("g/abc:")] == \
        ["queued", "publishing"]


def test_failed_with_reason(pki, tarball):
    service = Service(statuses=("QUEUED", "FAILED:not a tar archive"))
    with FakeServer(service, server_context(pki)) as srv:
        answer = run_publish(make_api([srv.url], pki), tarball, Clock(), [])
    assert (answer.state, answer.detail) == ("FAILED", "not a tar archive")


def test_publish_answered_present(pki, tarball):
    with FakeServer(Service(publish="PRESENT"), server_context(pki)) as srv:
        answer = run_publish(make_api([srv.url], pki), tarball, Clock(), [])
    assert answer.state == "PRESENT"
    assert srv.endpoints() == ["exists", "publish"]


def test_no_wait_stops_after_upload(pki, tarball):
    with FakeServer(Service(), server_context(pki)) as srv:
        answer = run_publish(make_api([srv.url], pki), tarball, Clock(), [], wait=False)
    assert answer.state == "OK"
    assert srv.endpoints() == ["exists", "publish"]


def test_follow_times_out(pki):
    with FakeServer(Service(statuses=("QUEUED",)), server_context(pki)) as srv:
        clock = Clock()
        with pytest.raises(TimedOutError, match="still QUEUED after 30 s"):
            follow(make_api([srv.url], pki), "g/abc", timeout=30, say=lambda _m: None,
                   clock=clock, sleep=clock.sleep)
    assert sum(clock.sleeps) == pytest.approx(30)
    assert max(clock.sleeps) <= 10


# -- the command line --------------------------------------------------------------------------


@pytest.fixture
def cli(pki, monkeypatch, tmp_path):
    """Run ``userpub client ...`` in-process with a clean environment; (rc, out, err)."""
    for name in ("BEARER_TOKEN", "BEARER_TOKEN_FILE", "X509_USER_PROXY", "USERPUB_SERVERS",
                 "JOBSUB_DROPBOX_SERVER_LIST", "JOBSUB_GROUP", "GROUP", "USERPUB_CA_BUNDLE",
                 "X509_CERT_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))

    def run(capsys, *args: str, server: str | None = None) -> tuple[int, str, str]:
        extra = ["--proxy", str(pki.proxy), "--ca-bundle", str(pki.ca_file),
                 "--retry-delay", "0"]
        if server:
            extra += ["--server", server]
        rc = main(["client", args[0], *extra, *args[1:]])
        out, err = capsys.readouterr()
        return rc, out, err
    return run


def test_cli_publish_prints_the_path(cli, capsys, pki, tarball):
    digest = hashlib.sha256(tarball.read_bytes()).hexdigest()
    with FakeServer(Service(), server_context(pki)) as srv:
        rc, out, err = cli(capsys, "publish", str(tarball), "--group", "fermilab", server=srv.url)
    assert rc == 0
    assert out == f"{PATH}fermilab/{digest}\n"
    assert srv.requests[1].query == {"cid": f"fermilab/{digest}"}
    assert "X.509 proxy" in err
    assert "\r[" not in err  # stderr is not a terminal: no progress bar


def test_cli_publish_group_from_environment_and_no_wait(cli, capsys, pki, tarball, monkeypatch):
    monkeypatch.setenv("JOBSUB_GROUP", "dune")
    digest = hashlib.sha256(tarball.read_bytes()).hexdigest()
    with FakeServer(Service(), server_context(pki)) as srv:
        rc, out, _ = cli(capsys, "publish", str(tarball), "--no-wait", server=srv.url)
    assert (rc, out) == (0, f"dune/{digest}\n")
    assert srv.endpoints() == ["exists", "publish"]


def test_cli_publish_failed(cli, capsys, pki, tarball):
    with FakeServer(Service(statuses=("FAILED:unsafe member ../x",)), server_context(pki)) as srv:
        rc, out, err = cli(capsys, "publish", str(tarball), "--cid", "g/x", server=srv.url)
    assert rc == Exit.FAILED == 6
    assert out == ""
    assert "publication of g/x failed: unsafe member ../x" in err


@pytest.mark.parametrize(("args", "expected"), [
    (("publish", "{tarball}"), "give --group"),
    (("publish", "{tmp}/nothing.tgz", "-G", "g"), "cannot read"),
    (("publish", "{tmp}/plain.txt", "-G", "g"), "is not a tar file"),
    (("publish", "{tarball}", "--cid", "../x"), "cid"),
    (("exists", "a/b/c"), "at most one slash allowed in cid"),
])
def test_cli_local_errors(cli, capsys, tarball, tmp_path, args, expected):
    (tmp_path / "plain.txt").write_text("hello")
    args = [a.format(tarball=tarball, tmp=tmp_path) for a in args]
    rc, _out, err = cli(capsys, *args, server="https://127.0.0.1:9")
    assert rc == Exit.ERROR == 1
    assert expected in err


def test_cli_no_server(cli, capsys, tarball):
    rc, _, err = cli(capsys, "exists", "g/x")
    assert rc == 1
    assert "USERPUB_SERVERS" in err


def test_cli_servers_from_environment(cli, capsys, pki, monkeypatch):
    with FakeServer(Service(present=True), server_context(pki)) as srv:
        monkeypatch.setenv("JOBSUB_DROPBOX_SERVER_LIST", srv.url.removeprefix("https://"))
        rc, out, _ = cli(capsys, "exists", "g/x")
    assert (rc, out) == (0, f"{PATH}g/x\n")


@pytest.mark.parametrize(("op", "service", "rc", "out"), [
    ("exists", Service(), 3, ""),
    ("exists", Service(present=True), 0, f"{PATH}g/x\n"),
    ("update", Service(present=True), 0, f"{PATH}g/x\n"),
    ("status", Service(statuses=("QUEUED",)), 0, "QUEUED\n"),
    ("status", Service(statuses=("MISSING",)), 3, "MISSING\n"),
    ("status", Service(statuses=("FAILED:bad tarball",)), 6, "FAILED:bad tarball\n"),
    ("status", Service(), 0, f"PRESENT:{PATH}g/x\n"),
])
def test_cli_queries(cli, capsys, pki, op, service, rc, out):
    with FakeServer(service, server_context(pki)) as srv:
        assert cli(capsys, op, "g/x", server=srv.url)[:2] == (rc, out)


def test_cli_status_wait(cli, capsys, pki):
    with FakeServer(Service(statuses=("PUBLISHING", "PRESENT")), server_context(pki)) as srv:
        rc, out, err = cli(capsys, "status", "g/x", "--wait", server=srv.url)
    assert (rc, out) == (0, f"PRESENT:{PATH}g/x\n")
    assert "publishing" in err


def test_cli_config_and_ping(cli, capsys, pki):
    with FakeServer(Service(), server_context(pki)) as srv:
        assert cli(capsys, "config", server=srv.url)[:2] == (
            0, "repo1.example.org,repo2.example.org\n")
        assert cli(capsys, "ping", server=srv.url)[:2] == (0, "OK\n")


def test_cli_refused(cli, capsys, pki, tarball):
    refusal = Reply(403, "Forbidden: /DC=org/DC=example/CN=x is not in the grid-mapfile\n")
    with FakeServer(Service(refuse=refusal), server_context(pki)) as srv:
        rc, _, err = cli(capsys, "publish", str(tarball), "-G", "g", server=srv.url)
    assert rc == Exit.REFUSED == 4
    assert "403: Forbidden: /DC=org/DC=example/CN=x is not in the grid-mapfile" in err
    assert len(srv.requests) == 1  # exists only: nothing uploaded


def test_cli_unavailable(cli, capsys):
    rc, _, err = cli(capsys, "exists", "g/x", "--retries", "2", server=refusing_url())
    assert rc == Exit.UNAVAILABLE == 5
    assert "after 3 attempts" in err


def test_cli_quiet(cli, capsys, pki):
    with FakeServer(Service(present=True), server_context(pki)) as srv:
        rc, _out, err = cli(capsys, "exists", "g/x", "-q", server=srv.url)
    assert (rc, err) == (0, "")


def test_help_documents_exit_codes(capsys):
    with pytest.raises(SystemExit):
        main(["client", "publish", "--help"])
    out = capsys.readouterr().out
    assert "exit codes:" in out
    assert "6  the publication FAILED" in out


def test_cid_command(capsys, tarball, monkeypatch):
    monkeypatch.delenv("JOBSUB_GROUP", raising=False)
    monkeypatch.delenv("GROUP", raising=False)
    digest = hashlib.sha256(tarball.read_bytes()).hexdigest()
    assert main(["cid", str(tarball), "--group", "fermilab"]) == 0
    assert main(["cid", str(tarball)]) == 0
    assert capsys.readouterr().out == f"fermilab/{digest}\n{digest}\n"
    assert main(["cid", str(tarball.parent / "missing")]) == 1


def test_without_credentials_it_fails_before_contacting_anyone(cli, capsys, pki, tarball,
                                                               tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    for found in (Path(f"/tmp/bt_u{os.getuid()}"), Path(f"/tmp/x509up_u{os.getuid()}")):
        if found.exists():
            machine_skip(f"{found} exists on this machine: credentials would be found")
    with FakeServer(Service(present=True), server_context(pki)) as srv:
        trust = ["--server", srv.url, "--ca-bundle", str(pki.ca_file)]
        for args in (("publish", str(tarball), "-G", "g"), ("exists", "g/x"),
                     ("status", "g/x")):
            rc = main(["client", args[0], *trust, *args[1:]])
            err = capsys.readouterr().err
            assert rc == Exit.ERROR == 1, err
            assert "no credentials" in err
            for place in ("$BEARER_TOKEN (unset)", "$BEARER_TOKEN_FILE (unset)",
                          f"{tmp_path / 'run'}/bt_u{os.getuid()}", f"/tmp/bt_u{os.getuid()}",
                          "$X509_USER_PROXY (unset)", f"/tmp/x509up_u{os.getuid()}",
                          "htgettoken", "voms-proxy-init"):
                assert place in err, (place, err)
        assert srv.requests == []  # nobody was asked
        assert main(["client", "ping", *trust]) == 0  # needs no credentials


def test_an_untrusted_server_is_a_local_problem_not_retried(cli, capsys, tmp_path):
    other = make_pki(tmp_path / "other")
    with FakeServer(Service(present=True), server_context(other)) as srv:
        rc, _, err = cli(capsys, "exists", "g/x", "--retry-delay", "30", server=srv.url)
    assert rc == Exit.ERROR == 1, err
    assert "TLS: self-signed certificate" in err and "not retried" in err
    assert "retrying" not in err


def test_userpub_client_wait_is_userpub_wait(capsys, tmp_path):
    (tmp_path / "repo2.example.org" / "sw" / "g" / "x").mkdir(parents=True)
    args = ["g/x", "--repos", "repo1.example.org,repo2.example.org", "--mount-root",
            str(tmp_path), "--timeout", "5", "--interval", "0.1"]
    assert main(["client", "wait", *args]) == 0
    assert main(["wait", *args]) == 0
    out = capsys.readouterr().out
    assert out == f"{tmp_path}/repo2.example.org/sw/g/x\n" * 2
    assert main(["client", "wait", "g/y", "--repos", "repo1.example.org", "--mount-root",
                 str(tmp_path), "--timeout", "0.2", "--interval", "0.1"]) == Exit.TIMEOUT
