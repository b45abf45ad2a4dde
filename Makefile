# CYPHONIC — developer entry points.  `make lab` and `make test` work on a fresh machine.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PKG := cyphonic_pkg
APT_PACKAGES := iproute2 nftables iputils-ping dnsutils iperf3 python3-venv procps conntrack isc-dhcp-client dhcpcd-base tshark

.PHONY: setup deps lint unit e2e test lab lab-down bench bench-quick clean

# System packages the test bed needs (root, Debian).  Skipped when all are present.
deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo ">> installing Debian packages: $$missing"; \
	  DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

setup: $(VENV)/.installed

$(VENV)/.installed: constraints.txt $(PKG)/pyproject.toml
	@echo ">> creating $(VENV) and installing cyphonic (pins: constraints.txt)"
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -c constraints.txt -e '$(PKG)[dev]'
	touch $@

lint: setup
	cd $(PKG) && ../$(VENV)/bin/ruff check src tests ../bench
	cd $(PKG) && ../$(VENV)/bin/mypy src

unit: setup
	cd $(PKG) && ../$(VENV)/bin/pytest -q tests/unit

e2e: setup deps
	cd $(PKG) && ../$(VENV)/bin/pytest -q tests/e2e

bench-quick: setup deps
	$(PY) bench/overlay_core.py --quick
	$(PY) bench/interconnect.py --quick
	$(PY) bench/adapter.py --quick

test: lint unit e2e bench-quick

lab: setup deps
	$(PY) -m cyphonic.lab up

lab-down: setup
	$(PY) -m cyphonic.lab down

bench: setup deps
	$(PY) bench/overlay_core.py
	$(PY) bench/interconnect.py
	$(PY) bench/adapter.py

clean: lab-down
	rm -rf $(VENV)
