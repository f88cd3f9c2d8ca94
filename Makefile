# Entry points (see README): `make demo` runs the main job, `make test` runs the lint
# (ruff, configured in pyproject.toml) and the tests.
# `make install` puts the pinned OpenMMLab stack into .venv; the install is idempotent and
# reuses pip's wheel cache, so mmcv's source build happens once per machine.
# `make test` also runs the library's tests on the oldest and the newest torch of the
# supported range, each in a library-only environment (torch, mmengine, mmcv-lite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.rest_mm_installed
PYTEST_ARGS ?=
# The supported torch range (setup.cfg states the same): the floor is the newest torch that
# mmcv 2.1.0 ships CUDA wheels for, the ceiling the newest torch that installs here.
TORCH_FLOOR := 2.1.2
TORCH_NEWEST := 2.14.1
VENV_FLOOR := .venv-torch$(basename $(TORCH_FLOOR))
VENV_NEWEST := .venv-torch$(basename $(TORCH_NEWEST))

.PHONY: install install-all install-library-envs lint test test-stack test-floor test-newest test-fast \
	demo docs clean-venv

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml tools/install_stack.sh
	PYTHON=$(PYTHON) VENV=$(VENV) bash tools/install_stack.sh
	touch $(STAMP)

$(VENV_FLOOR)/.rest_mm_installed: setup.cfg tools/install_library_env.sh
	PYTHON=$(PYTHON) VENV=$(VENV_FLOOR) TORCH=$(TORCH_FLOOR) bash tools/install_library_env.sh
	touch $@

$(VENV_NEWEST)/.rest_mm_installed: setup.cfg tools/install_library_env.sh
	PYTHON=$(PYTHON) VENV=$(VENV_NEWEST) TORCH=$(TORCH_NEWEST) bash tools/install_library_env.sh
	touch $@

install-library-envs: $(VENV_FLOOR)/.rest_mm_installed $(VENV_NEWEST)/.rest_mm_installed

lint: install
	$(PY) -m ruff check .

# The environments install side by side: on a fresh machine the library environments'
# downloads (network) overlap mmcv's source build (CPU).
install-all:
	$(MAKE) -j3 --output-sync=target install install-library-envs

test: install-all
	$(MAKE) lint test-stack test-floor test-newest

# the whole suite, slow end-to-end runs included, on the pinned stack
test-stack: install
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

# the library's tests on one torch; those needing mmdet, mmseg or mmcv's ops skip, saying why
test-floor: $(VENV_FLOOR)/.rest_mm_installed
	$(VENV_FLOOR)/bin/python -m pytest -q $(PYTEST_ARGS) tests

test-newest: $(VENV_NEWEST)/.rest_mm_installed
	$(VENV_NEWEST)/bin/python -m pytest -q $(PYTEST_ARGS) tests

test-fast: install
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS) tests

demo: install
	$(PY) tools/main_job.py

# the generated tables of README.md and docs/ from their sources (configs/recipes.yml, the
# model index); tests/test_tool_make_docs.py fails when a committed page is stale
docs: install
	$(PY) tools/make_docs.py

clean-venv:
	rm -rf $(VENV) $(VENV_FLOOR) $(VENV_NEWEST)
