# The two set-up commands the README names; each works first on a fresh machine.
#   make demo   set up .venv, then roll out the shipped world model (truth | dense | accelerated) into out/
#               (demos/world_model_rollout.py on its embedded defaults: short on a CPU, longer on a GPU)
#   make test   set up .venv, then run the CPU test lane (Triton kernels under TRITON_INTERPRET=1)
# Extra pytest arguments: make test PYTEST_ARGS="-k metrics -x"

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Stamp of a finished install; pyproject.toml changes (new dependencies) trigger a reinstall.
STAMP := $(VENV)/.vidaccel-installed
PYTEST_ARGS ?=

.PHONY: demo demo-tiny test
.DEFAULT_GOAL := demo

demo: $(STAMP)
	$(PY) demos/world_model_rollout.py --out out

# The earlier main demo: a tiny random Wan pipeline, stock diffusers vs vidaccel (plumbing and fidelity).
demo-tiny: $(STAMP)
	$(PY) demos/tiny_wan_demo.py --out out/tiny

# TRITON_INTERPRET must be set before anything imports triton. pytest exits 5 when it collected no
# test (e.g. a -k filter that matches nothing): say so plainly instead of failing without a message.
test: export TRITON_INTERPRET := 1
test: $(STAMP)
	@rc=0; $(PY) -m pytest -m "not gpu" $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no test to run (exit 5)"; rc=0; fi; \
	exit $$rc

# torch is pinned and installed first: pip takes the CPU build of 2.13.0 from local disk, whereas an
# unpinned torch pulled in by the project's dependencies would be a multi-GB CUDA download.
# setuptools and wheel are the build backend's requirements (tests build a wheel without isolation).
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --upgrade pip "setuptools>=69" wheel
	$(PY) -m pip install "torch==2.13.0"
	$(PY) -m pip install -e ".[dev,faiss,video,demo]"
	touch $@

$(PY):
	$(PYTHON) -m venv $(VENV)
