# The two set-up commands the README names; each works first on a fresh machine.
#   make demo   set up .venv, then roll out the shipped world model (truth | dense | accelerated) into out/
#               (demos/world_model_rollout.py on its embedded defaults: short on a CPU, longer on a GPU)
#   make test   set up .venv, then run the CPU test lane (Triton kernels under TRITON_INTERPRET=1)
# Extra pytest arguments: make test PYTEST_ARGS="-k metrics -x"
# Not part of CI:
#   make test-latest   the newest versions pyproject.toml allows, in .venv-latest, then the same CPU lane
#                      (drift in a dependency shows here before users see it)
#   make constraints   regenerate constraints.txt (the tested set) with uv

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Stamp of a finished install; pyproject.toml changes (new dependencies) trigger a reinstall.
STAMP := $(VENV)/.vidaccel-installed
PYTEST_ARGS ?=

.PHONY: demo demo-tiny test test-latest constraints
.DEFAULT_GOAL := demo

demo: $(STAMP)
	$(PY) demos/world_model_rollout.py --out out

# The earlier main demo: a tiny random Wan pipeline, stock diffusers vs vidaccel (plumbing and fidelity).
demo-tiny: $(STAMP)
	$(PY) demos/tiny_wan_demo.py --out out/tiny

# TRITON_INTERPRET must be set before anything imports triton. pytest exits 5 when it collected no
# test (e.g. a -k filter that matches nothing): say so plainly instead of failing without a message.
# The lane prints its wall time last.
test: export TRITON_INTERPRET := 1
test: $(STAMP)
	@start=$$(date +%s); rc=0; $(PY) -m pytest -m "not gpu" $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no test to run (exit 5)"; rc=0; fi; \
	echo "make test: wall time $$(( $$(date +%s) - start )) s (exit $$rc)"; \
	exit $$rc

# The tested set: torch is pinned and installed first (pip takes the CPU build of 2.13.0 from local
# disk, whereas an unpinned torch pulled in by the project's dependencies would be a multi-GB CUDA
# download); everything else, build tools included (tests build a wheel without isolation), comes at
# the versions of constraints.txt. Editing pyproject.toml or constraints.txt triggers a reinstall.
$(STAMP): pyproject.toml constraints.txt | $(PY)
	$(PY) -m pip install -c constraints.txt pip setuptools wheel
	$(PY) -m pip install -c constraints.txt "torch==2.13.0"
	$(PY) -m pip install -c constraints.txt -e ".[dev,faiss,video,demo]"
	touch $@

$(PY):
	$(PYTHON) -m venv $(VENV)

# The newest versions pyproject.toml allows (no constraints), reinstalled on every run, then the CPU lane.
LATEST := .venv-latest
test-latest: export TRITON_INTERPRET := 1
test-latest:
	test -x $(LATEST)/bin/python || $(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install --upgrade pip setuptools wheel
	$(LATEST)/bin/python -m pip install "torch==2.13.0"
	$(LATEST)/bin/python -m pip install --upgrade --upgrade-strategy eager -e ".[dev,faiss,video,demo]"
	$(LATEST)/bin/python -m pip list --format=freeze > $(LATEST)/versions.txt
	@start=$$(date +%s); rc=0; $(LATEST)/bin/python -m pytest -m "not gpu" $(PYTEST_ARGS) || rc=$$?; \
	echo "make test-latest: wall time $$(( $$(date +%s) - start )) s (exit $$rc); versions in $(LATEST)/versions.txt"; \
	exit $$rc

# constraints.txt: every package the extras pull in, for Python 3.11 on Linux x86-64, torch excluded
# (resolved against torch 2.13.0's CPU build, found in /opt/wheels on our machines or on the PyTorch CPU
# index, so that its dependencies, not CUDA's, are listed). uv writes the command in the file's header.
constraints: | $(PY)
	$(PY) -m pip install -q uv
	$(VENV)/bin/uv pip compile pyproject.toml constraints.in --extra dev --extra faiss --extra video \
		--extra demo --python-version 3.11 --python-platform x86_64-manylinux_2_28 --no-emit-package torch \
		$(if $(wildcard /opt/wheels),--find-links /opt/wheels,--index https://download.pytorch.org/whl/cpu --index https://pypi.org/simple) \
		-o constraints.txt
