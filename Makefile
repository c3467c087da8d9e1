# cvmfs-userpub: the two commands that matter are `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= var/userpub.toml
APT_PACKAGES := curl lbzip2 pigz isal nginx prometheus squid strace fuse3 libfuse3-3 haproxy
STAMP := $(VENV)/.installed

.PHONY: run test test-fast bench lint type check install deps system-deps clean client-wheel

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Debian packages some tests use (decompressors; nginx, squid and prometheus as references and
# peers, run by the tests on 127.0.0.1; strace for the crash tests; curl; fuse3 for mounting
# repositories with the genuine CernVM-FS client). Explicit: `make test` never installs them
# (the tests that need one skip, saying which); as root this says what it installs and keeps
# their services from starting; as any other user it says what to run.
system-deps:
	@sh scripts/system-deps.sh $(APT_PACKAGES)

deps: system-deps install

# Start the whole service of this host with the example site under ./var/ (written by
# `userpub init` the first time: development CA, proxy, token, two local repositories).
run: $(STAMP)
	@test -f $(CONFIG) || $(VENV)/bin/userpub init $(dir $(CONFIG)) >/dev/null
	@cat $(dir $(CONFIG))QUICKSTART.txt
	exec $(VENV)/bin/userpub --config $(CONFIG) run

# The whole suite, as any user: a test whose system tool is missing skips with the reason
# (`make system-deps` installs them). CI sets USERPUB_REQUIRE_ALL=1: every such skip fails.
test: install
	$(PY) -m pytest -q -ra

# The same without the tests marked slow (crash tests, the 4 GiB upload, fuzzing).
test-fast: install
	$(PY) -m pytest -q -ra -m 'not slow'

bench: deps
	$(PY) -m tests.bench

lint: install
	$(VENV)/bin/ruff check .
	$(PY) scripts/import_rules.py   # the house's import rules (docs/architecture.md)

type: install
	$(VENV)/bin/mypy

check: lint type test

# The grid user's client alone (standard library only, Python >= 3.9): dist/cvmfs_userpub_client-*.whl
client-wheel: install
	$(PY) -m pip wheel -q --no-deps -w dist ./userpub_client

clean:
	rm -rf $(VENV) var dist .pytest_cache .mypy_cache .ruff_cache userpub_client/build
