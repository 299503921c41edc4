# Two entry points: `make demo` and `make test`. Both create .venv when missing and install qdeep.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.qdeep-installed
DEMO   := demo

.PHONY: install demo test bench clean

install: $(STAMP)

# torch/torchvision are pinned first: these exact wheels sit on the build machines' disk,
# any other version would download gigabytes.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e ".[cpu,test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/qdeep synth --out $(DEMO)/data --n 1000 --size 64 --seed 0
	$(BIN)/qdeep baseline --data $(DEMO)/data --folds 5 --out $(DEMO)/baseline \
		--tracking-uri sqlite:///$(CURDIR)/$(DEMO)/mlflow.db
	@echo "MLflow runs: $(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/$(DEMO)/mlflow.db"

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python scripts/bench_baseline.py

clean:
	rm -rf $(DEMO) mlruns mlartifacts mlflow.db
