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

# Debian packages the tests use (decompressors, nginx and prometheus as references/peers;
# fuse3 for mounting repositories with the genuine CernVM-FS client).
system-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

deps: system-deps install

# Start the whole service of this host with the example site under ./var/ (written by
# `userpub init` the first time: development CA, proxy, token, two local repositories).
run: $(STAMP)
	@test -f $(CONFIG) || $(VENV)/bin/userpub init $(dir $(CONFIG)) >/dev/null
	@cat $(dir $(CONFIG))QUICKSTART.txt
	exec $(VENV)/bin/userpub --config $(CONFIG) run

test: deps
	$(PY) -m pytest -q -ra

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
