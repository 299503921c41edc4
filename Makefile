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

TRACK  := --tracking-uri sqlite:///$(CURDIR)/$(DEMO)/mlflow.db
CNN    := --data $(DEMO)/data --arch efficientnet_lite0 --workers 2 --epochs 3 --image-size 96 $(TRACK)

# The seed platform's comparison on synthetic Planet tiles: histogram forest vs a pretrained
# EfficientNet-Lite0 (offline weights) with a frozen backbone, then with its last 2 blocks tuned.
demo: $(STAMP)
	rm -rf $(DEMO)
	$(BIN)/qdeep synth --out $(DEMO)/data --n 1000 --size 64 --seed 0
	$(BIN)/qdeep baseline --data $(DEMO)/data --folds 5 --out $(DEMO)/baseline $(TRACK)
	$(BIN)/qdeep train $(CNN) --weights bundled --freeze head --lr 3e-3 --out $(DEMO)/frozen
	$(BIN)/qdeep train $(CNN) --weights $(DEMO)/frozen/model/model.pt --freeze last:2 --lr 1e-3 \
		--out $(DEMO)/finetune
	@echo; $(BIN)/qdeep compare $(DEMO)/baseline $(DEMO)/frozen $(DEMO)/finetune
	@echo; echo "baseline: 5-fold out-of-fold F2; CNNs: F2 on a held-out 20% split (thresholds cross-fitted)"
	@echo "MLflow runs: $(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/$(DEMO)/mlflow.db"

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python scripts/bench_baseline.py
	$(BIN)/python scripts/bench_train.py

clean:
	rm -rf $(DEMO) mlruns mlartifacts mlflow.db
