# Two commands do all set-up on a fresh machine with only Python 3.10-3.12:
#   make demo   - virtualenv + CPU install (PaddleNLP), then score the bundled checkpoint
#   make test   - both test suites: the main one in .venv (PaddleNLP 3.0.0b4) and tests/formers in
#                 .venv-formers (PaddleFormers 1.2.0). The two libraries cannot share a virtualenv
#                 (conflicting aistudio-sdk, tokenizers and huggingface-hub pins), so each gets its own.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
SCORER := $(VENV)/bin/paddle-scorer
FORMERS_VENV ?= .venv-formers
FPY    := $(FORMERS_VENV)/bin/python
FPIP   := $(FPY) -m pip --disable-pip-version-check -q
CHECK_PYTHON := $(PYTHON) -c 'import sys; v = sys.version_info[:2]; sys.exit(0 if (3, 10) <= v <= (3, 12) else "paddle-scorer needs Python 3.10-3.12 (paddlepaddle 3.3.1 wheels); found %d.%d: run make PYTHON=python3.11 ..." % v)'

.PHONY: demo test test-suites test-nlp test-formers venv venv-formers clean checkpoints bench browser

$(VENV)/.ok-python:
	@$(CHECK_PYTHON)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade "pip>=23"
	@touch $@

$(VENV)/.ok-cpu: $(VENV)/.ok-python pyproject.toml
	$(PIP) install -e '.[cpu,nlp]'
	@touch $@

$(VENV)/.ok-test: $(VENV)/.ok-cpu
	$(PIP) install -e '.[cpu,nlp,test,test-serve,test-ref-nlp]'
	@touch $@

venv: $(VENV)/.ok-cpu

# The PaddleFormers virtualenv (~2 GB: paddleformers pulls HF transformers 5.x, modelscope, librosa, numba).
$(FORMERS_VENV)/.ok-python:
	@$(CHECK_PYTHON)
	$(PYTHON) -m venv $(FORMERS_VENV)
	$(FPIP) install --upgrade "pip>=23"
	@touch $@

$(FORMERS_VENV)/.ok-test: $(FORMERS_VENV)/.ok-python pyproject.toml
	$(FPIP) install -e '.[cpu,formers,test,test-ref-formers]'
	@touch $@

venv-formers: $(FORMERS_VENV)/.ok-test

demo: $(VENV)/.ok-cpu
	$(SCORER) inspect checkpoints/demo-lora
	$(SCORER) classify --model checkpoints/demo-base --lora checkpoints/demo-lora \
		--input checkpoints/demo-queries.jsonl --output out/demo-scores.jsonl --overwrite --show 5

# The report test renders the HTML page in headless chromium: found, or installed with apt-get when
# this user may (root or password-less sudo); otherwise one line says so and that test fails.
browser:
	@.ci/ensure-chromium

# Both suites always run (one failing suite does not hide the other's results); the last lines say how
# each ended, and make fails if either failed.
test: $(VENV)/.ok-test browser $(FORMERS_VENV)/.ok-test
	@$(MAKE) --no-print-directory test-suites

test-suites:
	@nlp=0; formers=0; \
	$(PY) -m pytest -q || nlp=$$?; \
	$(FPY) -m pytest -q tests/formers || formers=$$?; \
	echo "make test: PaddleNLP suite (.venv) exit $$nlp, PaddleFormers suite (.venv-formers) exit $$formers"; \
	if [ $$nlp -ne 0 ] || [ $$formers -ne 0 ]; then echo "make test: FAILED"; exit 1; fi

test-nlp: $(VENV)/.ok-test browser
	$(PY) -m pytest -q

# tests/formers only (the rest of the suite needs paddlenlp); tiny models built by PaddleFormers itself.
test-formers: $(FORMERS_VENV)/.ok-test
	$(FPY) -m pytest -q tests/formers

$(VENV)/.ok-bench: $(VENV)/.ok-cpu
	$(PIP) install -e '.[cpu,nlp,bench,test-serve]'
	@touch $@

# Benchmarks (PyTorch for comparison only; lm-eval for serve): writes benchmarks/RESULTS.md. ~75 min on
# 2 cores, ~18 GB of generated checkpoints in benchmarks/.cache; it first waits (up to 20 min) for the
# load average to drop below 1.0. `make bench BENCH_ARGS=--quick` checks the scripts in a few minutes
# (numbers are noise); BENCH_ARGS="--skip-7b --no-serve" leaves out the 7B row and serve.
bench: $(VENV)/.ok-bench
	$(PY) benchmarks/run.py $(BENCH_ARGS)

# Rebuild the bundled demo checkpoints (deterministic, CPU, a few minutes).
checkpoints: $(VENV)/.ok-cpu
	$(PY) checkpoints/build_demo.py

clean:
	rm -rf $(VENV) $(FORMERS_VENV) out .pytest_cache
