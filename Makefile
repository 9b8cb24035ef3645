# teachreg: the main command is `make book` (environment, data, HTML book); `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Tests and CI read data from the offline mirror beside the repository when there is one.
export TEACHREG_DATA_MIRROR ?= $(wildcard $(abspath ../shared/data))

.PHONY: help course test widgets7 lint bench generalisation clean execute book data lab student

help:  ## list the targets
	@grep -E '^[a-z0-9]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z0-9]+):.*## /  make \1\t/' | expand -t 24

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev,book]"
	touch $(STAMP)

course: $(STAMP)  ## create .venv, install teachreg, run the registration demo
	$(PY) -m teachreg.demo

test: $(STAMP)  ## the whole test suite (pytest exit 5, "no tests collected", counts as a failure)
	@$(PY) -m pytest; code=$$?; \
	if [ $$code -eq 5 ]; then echo "pytest collected no tests: the suite is broken" >&2; fi; exit $$code

# Colab ships ipywidgets 7.7.1; the extras install 8. The widget tests run with both.
WIDGETS7 := .venv-widgets7
widgets7: $(STAMP)  ## the widget tests again with Colab's ipywidgets 7.7.1 (CI runs it)
	@[ -f $(WIDGETS7)/.installed ] || { $(PY) -m pip install --quiet --no-deps --target $(WIDGETS7) \
	  ipywidgets==7.7.1 ipython_genutils==0.2.0 && touch $(WIDGETS7)/.installed; }
	PYTHONPATH=$(WIDGETS7) TEACHREG_EXPECT_IPYWIDGETS=7.7.1 $(PY) -m pytest -q -p no:cacheprovider tests/test_widgets.py

lint: $(STAMP)  ## ruff: the package, tests, benchmarks and book tools (CI runs it)
	$(VENV)/bin/ruff check src tests benchmarks book/tools book/_ext

# DeepReg's resample, the peer of the warp benchmark: deepreg pins TensorFlow 2.3, so it is
# installed without its dependencies, beside the environment.
DEEPREG := .venv-deepreg
bench: $(STAMP)  ## speed figures as JSON, side by side with elastix, SimpleITK, scipy and DeepReg
	@[ -f $(DEEPREG)/.installed ] || { $(PY) -m pip install --quiet --no-deps --target $(DEEPREG) \
	  deepreg==0.1.2 && touch $(DEEPREG)/.installed; }
	PYTHONPATH=$(DEEPREG) $(PY) benchmarks/bench.py

generalisation: $(STAMP)  ## the lung network on CTs and motions crossed between its splits (about half an hour)
	$(PY) benchmarks/generalisation.py

clean:
	rm -rf $(VENV) $(WIDGETS7) $(DEEPREG) book/_build .pytest_cache

# --- the book -----------------------------------------------------------------------------------
CHAPTERS := $(sort $(wildcard book/ch*.ipynb))

execute: $(STAMP)  ## re-execute every chapter in place (fresh kernel each), so the book shows current outputs
	@for nb in $(CHAPTERS); do \
	  echo "executing $$nb"; start=$$(date +%s); \
	  $(VENV)/bin/jupyter nbconvert --to notebook --execute --inplace \
	    --ExecutePreprocessor.kernel_name=python3 --ExecutePreprocessor.timeout=900 "$$nb" || exit 1; \
	  echo "  $$(( $$(date +%s) - start )) s"; \
	done


data: $(STAMP)  ## fetch the datasets the chapters load into the cache, checked by SHA-256 (mirror first when TEACHREG_DATA_MIRROR is set)
	@names="$$($(PY) book/tools/chapter_data.py)" || exit 1; \
	if [ -n "$$names" ]; then $(VENV)/bin/teachreg data fetch $$names; fi

book: $(STAMP) data  ## create .venv, fetch the data, build the HTML book from the stored outputs (no execution, offline); warnings fail it
	$(VENV)/bin/jupyter-book build book/ -W --keep-going
	@echo "The book: $(CURDIR)/book/_build/html/index.html (\`make lab\` runs the chapters)"

lab: $(STAMP)  ## open the chapters in JupyterLab from .venv (widgets included; the chapters fetch their data on first use)
	$(VENV)/bin/jupyter lab --ServerApp.root_dir=book $$([ "$$(id -u)" = 0 ] && echo --allow-root)

student: $(STAMP)  ## student copies of the chapters in student/: no solutions, no outputs (for a workshop)
	$(PY) book/tools/student.py --out student
