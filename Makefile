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

.PHONY: demo test app bench bench-collapse bench-levers clean-venv

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first and pinned, so the CPU build is used rather than a multi-GB CUDA build
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps -e .
	touch $(STAMP)

$(DEVSTAMP): $(STAMP) requirements-dev.txt
	$(PIP) install -q -r requirements-dev.txt
	touch $(DEVSTAMP)

demo: $(STAMP)
	$(VENV)/bin/locphylax demo

test: $(DEVSTAMP)
	$(PY) -m pytest -q tests

app: $(STAMP)
	@test -f app/Home.py || { echo "The Streamlit app is not built yet (see app/README.md)."; exit 1; }
	$(VENV)/bin/streamlit run app/Home.py --server.port $(PORT) --server.headless true

bench: $(STAMP)
	$(PY) bench/pipeline_bench.py --presets sst2 demo --seeds 0 1 2

# the collapse benchmark (docs/results.md): report triggers x 3 seeds on demo and sst2
bench-collapse: $(STAMP)
	$(PY) bench/collapse.py report

# the lever study on the tune triggers (chooses the defaults; docs/results.md, "Levers")
bench-levers: $(STAMP)
	$(PY) bench/collapse.py levers

clean-venv:
	rm -rf $(VENV)
