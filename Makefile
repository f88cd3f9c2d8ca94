# Entry points (see README): `make demo` runs the main job, `make test` runs the lint
# (ruff, configured in pyproject.toml) and the tests.
# Both install the pinned OpenMMLab stack into .venv first; the install is idempotent and
# reuses pip's wheel cache, so mmcv's 23-minute source build happens once per machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.rest_mm_installed
PYTEST_ARGS ?=

.PHONY: install lint test test-fast demo clean-venv

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml tools/install_stack.sh
	PYTHON=$(PYTHON) VENV=$(VENV) bash tools/install_stack.sh
	touch $(STAMP)

lint: install
	$(PY) -m ruff check .

test: lint
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

test-fast: install
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS) tests

demo: install
	$(PY) tools/main_job.py

clean-venv:
	rm -rf $(VENV)
