# `make demo` and `make test` create .venv/ on first use and install into it; later calls
# reuse it (the stamp file is rebuilt only when the requirements change).
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# pytest arguments, e.g. `make test PYTEST_ARGS="-m slow"`
PYTEST_ARGS ?=

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-nodeps.txt setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	# xtuner without its pins: see requirements-nodeps.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mllm demo

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf work_dirs data/synthetic
