# `make train` runs the demo job; `make test` runs the test suite. Both set up .venv on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
APT_PKGS := libturbojpeg0-dev libopencv-dev pkg-config
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
CONFIG ?= configs/demo.yaml
DATA ?=
ARGS ?=
# Test processes: one per core, at most 4 (each test file runs whole in one of them).
TEST_JOBS ?= $(shell n=$$(nproc); echo $$(( n < 4 ? n : 4 )))

.PHONY: setup train test bench clean

$(STAMP): pyproject.toml constraints.txt
	@missing=$$(for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "apt: installing$$(echo ' '$$missing)"; \
	  { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; } \
	    > /tmp/salmix-apt.log 2>&1 || { tail -20 /tmp/salmix-apt.log; exit 1; }; \
	fi
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch and numpy first: FFCV's setup.py builds against them.
	$(PY) -m pip install -q -c constraints.txt torch torchvision numpy setuptools wheel
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,timm]'
	touch $@

setup: $(STAMP)

train: $(STAMP)
	$(PY) train_imagenet.py --config $(CONFIG) $(if $(DATA),--data $(DATA)) $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -n $(TEST_JOBS) --dist loadfile $(ARGS)

bench: $(STAMP)
	$(PY) benchmarks/mixing.py
	$(PY) benchmarks/loaders.py
	$(PY) benchmarks/train_step.py

clean:
	rm -rf $(VENV) runs build *.egg-info
