# Two entry points: `make demo` and `make test`. Both create .venv when missing and install qdeep.
# The tests come in tiers (pytest markers, tests/conftest.py): `make test-fast` runs the `unit` tier
# (no Ray; about a minute), `make test-ray` the `ray` and `multinode` tiers, `make gpu-check` the `gpu`
# tier and GPU figures on a machine with an NVIDIA GPU; `make test` runs everything, as CI does.
# `make lint` checks the import layers (.importlinter).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.qdeep-installed
GPU_STAMP := $(VENV)/.qdeep-gpu-installed
DEMO   := demo

.PHONY: install demo test test-fast test-ray lint gpu-check bench clean

install: $(STAMP)

# torch/torchvision first, at constraints.txt's pins (docker/Dockerfile reads the same file): these
# exact wheels sit on the build machines' disk, any other version would download gigabytes.
PIP    := $(BIN)/pip install -q -c constraints.txt
define BASE_INSTALL
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(PIP) torch torchvision
endef

# faiss comes as one of two wheels that must never sit side by side: the CPU one here, the GPU
# one for gpu-check. Each install removes the other wheel and the other stamp.
$(STAMP): pyproject.toml constraints.txt
	$(BASE_INSTALL)
	$(BIN)/pip uninstall -q -y faiss-gpu
	$(PIP) -e ".[cpu,test]"
	rm -f $(GPU_STAMP)
	touch $(STAMP)

$(GPU_STAMP): pyproject.toml constraints.txt
	@nvidia-smi -L >/dev/null 2>&1 || { echo "make gpu-check: no NVIDIA GPU here (nvidia-smi -L fails); run it on a GPU machine" >&2; exit 1; }
	$(BASE_INSTALL)
	$(BIN)/pip uninstall -q -y faiss-cpu
	$(PIP) -e ".[gpu,test]"
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
	@echo; echo "Ladder report: $(CURDIR)/$(DEMO)/ladder/report.html"
	@echo "MLflow runs: $(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/$(DEMO)/mlflow.db"
	@echo "DeepCluster report (every group's members, palette, texture, saliency; open it in a browser):"
	@echo "$(CURDIR)/$(DEMO)/deepcluster/report.html"

# Every tier (the gpu tests skip, with the reason, where torch sees no GPU): what CI runs.
test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=30

# The unit tier: no Ray anywhere, about a minute on 2 cores.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m unit

# Ray Train, Tune, Data and DeepCluster on a local Ray, and the multi-node clusters: most of the time.
test-ray: $(STAMP)
	$(BIN)/python -m pytest -q -m "ray or multinode"

# The layers point one way (.importlinter): cli -> workflows -> distributed -> library, no Ray below.
lint: $(STAMP)
	$(BIN)/lint-imports

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
	$(BIN)/python scripts/bench_ingest.py
	$(BIN)/python scripts/bench_startup.py

clean:
	rm -rf $(DEMO) mlruns mlartifacts mlflow.db
