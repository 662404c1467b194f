# Two commands do all set-up on a fresh machine with only Python 3.10-3.12:
#   make demo   - virtualenv + CPU install, then score the bundled checkpoint
#   make test   - the same set-up plus the test extra, then the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
SCORER := $(VENV)/bin/paddle-scorer

.PHONY: demo test venv clean checkpoints bench browser

$(VENV)/.ok-python:
	@$(PYTHON) -c 'import sys; v = sys.version_info[:2]; sys.exit(0 if (3, 10) <= v <= (3, 12) else "paddle-scorer needs Python 3.10-3.12 (paddlepaddle 3.3.1 wheels); found %d.%d: run make PYTHON=python3.11 ..." % v)'
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade "pip>=23"
	@touch $@

$(VENV)/.ok-cpu: $(VENV)/.ok-python pyproject.toml
	$(PIP) install -e '.[cpu]'
	@touch $@

$(VENV)/.ok-test: $(VENV)/.ok-cpu
	$(PIP) install -e '.[cpu,test]'
	@touch $@

venv: $(VENV)/.ok-cpu

demo: $(VENV)/.ok-cpu
	$(SCORER) inspect checkpoints/demo-lora
	$(SCORER) classify --model checkpoints/demo-base --lora checkpoints/demo-lora \
		--input checkpoints/demo-queries.jsonl --output out/demo-scores.jsonl --overwrite --show 5

# The report test renders the HTML page in headless chromium: found, or installed with apt-get when
# this user may (root or password-less sudo); otherwise one line says so and that test fails.
browser:
	@.ci/ensure-chromium

test: $(VENV)/.ok-test browser
	$(PY) -m pytest -q

$(VENV)/.ok-bench: $(VENV)/.ok-cpu
	$(PIP) install -e '.[cpu,bench]'
	@touch $@

# Benchmarks (PyTorch for comparison only): writes benchmarks/RESULTS.md. ~30-35 min on 2 cores; it
# first waits (up to 20 min) for the load average to drop below 1.0. `make bench BENCH_ARGS=--quick`
# checks the scripts in a few minutes (numbers are noise).
bench: $(VENV)/.ok-bench
	$(PY) benchmarks/run.py $(BENCH_ARGS)

# Rebuild the bundled demo checkpoints (deterministic, CPU, a few minutes).
checkpoints: $(VENV)/.ok-cpu
	$(PY) checkpoints/build_demo.py

clean:
	rm -rf $(VENV) out .pytest_cache
