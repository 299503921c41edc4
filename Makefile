# Two entry points: `make demo` and `make test`. Both create .venv when missing and install qdeep.
# `make test-fast` leaves out the slow tier (Ray Train/Tune/DeepCluster runs); `make gpu-check`
# runs the GPU tier and prints GPU figures on a machine with an NVIDIA GPU.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.qdeep-installed
GPU_STAMP := $(VENV)/.qdeep-gpu-installed
DEMO   := demo

.PHONY: install demo test test-fast gpu-check bench clean

install: $(STAMP)

# torch/torchvision are pinned first: these exact wheels sit on the build machines' disk,
# any other version would download gigabytes.
define BASE_INSTALL
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
endef

# faiss comes as one of two wheels that must never sit side by side: the CPU one here, the GPU
# one for gpu-check. Each install removes the other wheel and the other stamp.
$(STAMP): pyproject.toml
	$(BASE_INSTALL)
	$(BIN)/pip uninstall -q -y faiss-gpu
	$(BIN)/pip install -q -e ".[cpu,test]"
	rm -f $(GPU_STAMP)
	touch $(STAMP)

$(GPU_STAMP): pyproject.toml
	@nvidia-smi -L >/dev/null 2>&1 || { echo "make gpu-check: no NVIDIA GPU here (nvidia-smi -L fails); run it on a GPU machine" >&2; exit 1; }
	$(BASE_INSTALL)
	$(BIN)/pip uninstall -q -y faiss-cpu
	$(BIN)/pip install -q -e ".[gpu,test]"
	rm -f $(STAMP)
	touch $(GPU_STAMP)

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

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not gpu"

# On one CUDA GPU, with the GPU faiss: the `gpu` tests (tests/test_gpu.py), then k-means and
# ResNet-50 training figures (scripts/gpu_check.py). About 6 minutes after the install.
gpu-check: $(GPU_STAMP)
	$(BIN)/python -m pytest -m gpu -q
	$(BIN)/python scripts/gpu_check.py

bench: $(STAMP)
	$(BIN)/python scripts/bench_baseline.py
	$(BIN)/python scripts/bench_train.py
	$(BIN)/python scripts/bench_features.py
	$(BIN)/python scripts/bench_kmeans.py
	$(BIN)/python scripts/bench_store.py

clean:
	rm -rf $(DEMO) mlruns mlartifacts mlflow.db
