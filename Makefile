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

# The seed platform's questions on synthetic Planet tiles: the histogram forest (5-fold), then the
# ladder on one held-out split: AlexNet from scratch, EfficientNet-Lite0 from offline ImageNet
# weights with a frozen backbone, then with its last 2 blocks fine-tuned (2 Ray Train workers each).
# Then DeepCluster on synthetic scenes (a folder per class, used only to score the clusters).
demo: $(STAMP)
	rm -rf $(DEMO)
	$(BIN)/qdeep synth --out $(DEMO)/data --n 1000 --size 64 --seed 0
	$(BIN)/qdeep baseline --data $(DEMO)/data --folds 5 --out $(DEMO)/baseline $(TRACK)
	$(BIN)/qdeep ladder --data $(DEMO)/data --out $(DEMO)/ladder --epochs 3 --image-size 96 --lr 2e-3 $(TRACK)
	$(BIN)/qdeep predict --model $(DEMO)/ladder/finetune/model --data $(DEMO)/data --out $(DEMO)/submission.csv
	$(BIN)/qdeep synth --multiclass --out $(DEMO)/scenes --n 100 --size 64 --seed 0
	$(BIN)/qdeep deepcluster --images $(DEMO)/scenes --data $(DEMO)/scenes --k 5 --iterations 3 --final-k 10 \
		--image-size 64 --freeze last:2 --out $(DEMO)/deepcluster $(TRACK)
	@echo; echo "Ladder table: $(DEMO)/ladder/ladder.md, plots: $(DEMO)/ladder/*.png"
	@echo "DeepCluster grids: $(DEMO)/deepcluster/grids/, curves: $(DEMO)/deepcluster/curves.png"
	@echo "MLflow runs: $(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/$(DEMO)/mlflow.db"

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python scripts/bench_baseline.py
	$(BIN)/python scripts/bench_train.py
	$(BIN)/python scripts/bench_features.py
	$(BIN)/python scripts/bench_kmeans.py
	$(BIN)/python scripts/bench_store.py

clean:
	rm -rf $(DEMO) mlruns mlartifacts mlflow.db
