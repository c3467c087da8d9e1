"""The whole service as a new site meets it: `userpub init`, `userpub run`, the client, wait."""

from __future__ import annotations

import os
import random
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

from spool import Spool
from tests.helpers import REPO_ROOT, make_tarball, wait_for
from userpub.config import load_config

REPOS = ("user1.example.org", "user2.example.org")


def userpub(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "userpub", *args], capture_output=True,
                          text=True, env=env, cwd=cwd or REPO_ROOT, timeout=timeout, check=False)


def exports(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        m = re.fullmatch(r"export (\w+)=(.*)", line)
        assert m, line
        out[m.group(1)] = shlex.split(m.group(2))[0]
    return out


def test_init_run_publish_wait_restart_and_graceful_stop(tmp_path):
    site = tmp_path / "site"
    init = userpub("init", str(site))
    assert init.returncode == 0, init.stderr
    client_env = exports(init.stdout)
    assert set(client_env) >= {"X509_USER_PROXY", "BEARER_TOKEN_FILE", "USERPUB_SERVERS",
                               "X509_CERT_DIR", "USERPUB_CA_BUNDLE"}
    # a second init keeps the site and prints the same lines
    assert userpub("init", str(site)).stdout == init.stdout
    config = load_config(site / "userpub.toml")
    env = {**os.environ, **client_env}
    env.pop("BEARER_TOKEN", None)

    log_path = tmp_path / "run.log"
    with log_path.open("wb") as log:
        # started from inside the site directory, whose spool/ must not shadow our packages
        run = subprocess.Popen([sys.executable, "-m", "userpub", "--config",
                                str(site / "userpub.toml"), "run"], cwd=site, stdout=log,
                               stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    logged = lambda: log_path.read_text(errors="replace")  # noqa: E731
    try:
        wait_for(lambda: "listening on https://" in logged(), 60, logged)
        wait_for(lambda: logged().count("publisher ready") == 2, 60, logged)

        # 1. publish with the proxy, then another tarball with the token
        a = make_tarball(tmp_path / "a.tar.gz", {"bin/a.sh": b"echo a\n"})
        b = make_tarball(tmp_path / "b.tar.bz2", {"lib/b.py": b"print('b')\n"}, mode="w:bz2")
        with_proxy = userpub("client", "publish", str(a), "--group", "e2e", "--proxy",
                             client_env["X509_USER_PROXY"], env=env)
        assert with_proxy.returncode == 0, with_proxy.stderr + logged()
        assert "using X.509 proxy" in with_proxy.stderr
        with_token = userpub("client", "publish", str(b), "--group", "e2e", "--token-file",
                             client_env["BEARER_TOKEN_FILE"], env=env)
        assert with_token.returncode == 0, with_token.stderr + logged()
        assert "using bearer token" in with_token.stderr
        paths = []
        for result, tarball in ((with_proxy, a), (with_token, b)):
            cid = userpub("cid", str(tarball), "--group", "e2e").stdout.strip()
            found = userpub("wait", cid, "--repos", ",".join(REPOS), "--mount-root",
                            str(site / "repos"), "--timeout", "30", "--interval", "0.2", env=env)
            assert found.returncode == 0, found.stderr
            assert found.stdout.strip() == result.stdout.strip()
            paths.append(Path(found.stdout.strip()))
        assert (paths[0] / "bin/a.sh").read_bytes() == b"echo a\n"
        assert (paths[1] / "lib/b.py").read_bytes() == b"print('b')\n"
        assert "identity=\"/DC=org/DC=example/OU=People/CN=Jane Doe 12345\"" in logged()
        assert "identity=\"janedoe@https://localhost/userpub-dev-issuer\"" in logged()

        # 2. kill -9 a publisher: the supervisor restarts it and the queue drains
        victim = int(re.search(r"started publisher:user1\.example\.org \(pid (\d+)\)",
                               logged()).group(1))
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: f"publisher:user1.example.org (pid {victim}) killed by signal 9"
                 in logged(), 30, logged)
        spool = Spool(config.server.spool)
        for i in range(10):
            spool.drop_file(make_tarball(tmp_path / f"q{i}.tar.gz", {"f": str(i).encode()}),
                            f"e2e/q{i}", "operator")
        wait_for(lambda: len(re.findall(r"started publisher:user1\.example\.org", logged())) == 2,
                 60, logged)
        wait_for(lambda: all(any((site / "repos" / r / "sw" / "e2e" / f"q{i}").is_dir()
                                 for r in REPOS) for i in range(10)), 60, logged)
        assert spool.depth().incoming == 0

        # 3. SIGTERM during a publish: the publish completes, the supervisor exits 0
        rng = random.Random(1)
        big = {f"d{i % 40}/f{i:05d}": rng.randbytes(8000) for i in range(4000)}
        big_tar = make_tarball(tmp_path / "big.tar", big, mode="w")
        spool.drop_file(big_tar, "e2e/big", "operator")
        staging = [site / "repos" / r / ".userpub" / "staging" for r in REPOS]
        wait_for(lambda: any(any(s.glob("*/0/d*/*")) for s in staging), 60, logged)
        run.send_signal(signal.SIGTERM)
        assert run.wait(120) == 0, logged()
        published = [site / "repos" / r / "sw" / "e2e" / "big" for r in REPOS]
        done = [p for p in published if p.is_dir()]
        assert len(done) == 1, logged()
        files = {str(p.relative_to(done[0])) for p in done[0].rglob("*") if p.is_file()}
        assert files == set(big) | {".cvmfscatalog", ".publisher"}
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
        subprocess.run(["pkill", "-9", "-f", str(site / "userpub.toml")], check=False)
