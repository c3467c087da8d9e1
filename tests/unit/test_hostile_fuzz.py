"""The coverage-guided fuzz target of the tar unpacker (``tests/fuzz/fuzz_unpack.py``), run by
``make test`` for a fixed, short time: it fails if the unpacker raised anything but
UnpackError, wrote outside its destination, or left an unsafe tree, for any input found.

``USERPUB_FUZZ_SECONDS`` changes the time (default 40 s); findings are kept in
``$USERPUB_FUZZ_ARTIFACTS`` (default: the test's temporary directory) and printed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT

pytest.importorskip("atheris", reason="the fuzz test needs atheris (pip install atheris)")


@pytest.mark.slow
def test_fuzzing_the_unpacker_finds_nothing(tmp_path: Path) -> None:
    seconds = int(os.environ.get("USERPUB_FUZZ_SECONDS", "40"))
    artifacts = os.environ.get("USERPUB_FUZZ_ARTIFACTS", str(tmp_path / "findings"))
    proc = subprocess.run(
        [sys.executable, "-m", "tests.fuzz.fuzz_unpack", "--seconds", str(seconds),
         "--artifacts", artifacts], cwd=REPO_ROOT, capture_output=True, text=True,
        timeout=seconds + 120, check=False)
    out = proc.stdout + proc.stderr
    findings = sorted(os.listdir(artifacts)) if os.path.isdir(artifacts) else []
    assert proc.returncode == 0 and not findings, (
        f"the fuzzer found an input ({findings} in {artifacts}):\n{out[-6000:]}")
    runs = re.search(r"Done (\d+) runs", out)
    assert runs is not None, out[-3000:]
    assert int(runs.group(1)) >= 20 * seconds, f"only {runs.group(1)} inputs were tried"


def test_the_fuzz_oracle_catches_what_it_must(


        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The checks of each input fail on an unpacker that escapes or crashes."""
    from tests.fuzz import fuzz_unpack
    from tests.hostile import compress, reg, tar_bytes

    sandbox = fuzz_unpack.Sandbox(tmp_path / "root")
    good = b"\0" + compress(tar_bytes([reg("a/b.txt", b"fine")]), "gzip")
    sandbox.run(good)  # a valid tarball: no complaint, and dest is gone again
    assert not sandbox.dest.exists()
    assert fuzz_unpack.shape(b"\1" + bytes(600))[:600] == bytes(600)[:600]

    def escaping(source: Path, dest: Path, limits: object) -> None:
        dest.mkdir()
        (dest.parent / "evil").write_text("x")

    def crashing(source: Path, dest: Path, limits: object) -> None:
        raise ValueError("not an UnpackError")

    def writing_through_a_symlink(source: Path, dest: Path, limits: object) -> None:
        dest.mkdir()
        os.symlink("../sentinel", dest / "link")  # kept: symlinks may point anywhere ...
        (dest / "link" / "pwned").write_text("x")  # ... but nothing goes through one

    def special_file(source: Path, dest: Path, limits: object) -> None:
        dest.mkdir()
        os.mkfifo(dest / "pipe")

    for bad, error in ((escaping, AssertionError), (crashing, ValueError),
                       (writing_through_a_symlink, AssertionError),
                       (special_file, AssertionError)):
        monkeypatch.setattr(fuzz_unpack, "unpack", bad)
        with pytest.raises(error):
            sandbox.run(good)
        (sandbox.parent / "evil").unlink(missing_ok=True)
        (sandbox.parent / "sentinel" / "pwned").unlink(missing_ok=True)
        shutil.rmtree(sandbox.dest, ignore_errors=True)
    (sandbox.secret).write_bytes(b"changed")
    monkeypatch.setattr(fuzz_unpack, "unpack", lambda s, d, lim: None)
    with pytest.raises(AssertionError, match="sentinel"):
        sandbox.run(good)
