# `make demo` and `make test` work on a fresh machine with nothing but Python:
# the first run creates .venv and installs the package (editable) into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# 8 host devices so that sharding is exercised on a CPU-only machine.
CPU_DEVICES := XLA_FLAGS=--xla_force_host_platform_device_count=8
STAMP := $(VENV)/.meshattn-installed

.PHONY: demo check-layer check-layer-multihost demo-multihost test install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# The whole job: train tiny-lm as 2 processes x 4 CPU devices, checkpoint, serve the
# checkpoint on another 8-device mesh with continuous batching (scripts/demo.py).
demo: $(STAMP)
	$(PY) scripts/demo.py $(ARGS)

# The layer alone: train fwd+bwd and serving on 8 fake CPU devices, checked.
check-layer: $(STAMP)
	$(CPU_DEVICES) $(PY) scripts/check_layer.py $(ARGS)

# The same as 2 processes x 4 CPU devices joined by jax.distributed on loopback.
check-layer-multihost: $(STAMP)
	$(PY) scripts/launch_local.py -n 2 --cpu-devices 4 -- scripts/check_layer.py $(ARGS)

demo-multihost: check-layer-multihost  # its old name

# The suite's shapes are tiny, so its time is XLA's CPU compiles: tests/conftest.py sets
# the XLA flags that make them about a fifth of the default (those this jaxlib knows) and
# the 8 host devices; an XLA_FLAGS of the caller's environment would replace them.
test: $(STAMP)
	env -u XLA_FLAGS $(PY) -m pytest -n 2 -q tests

clean:
	rm -rf $(VENV) build *.egg-info
