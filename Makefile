# The README's entry points: `make run` (train, then test), `make test`, `make evaluate` (test the
# shipped reference weights, no training) and `make benchmark`.
PYTHON ?= python3
VENV ?= .venv
# The CIFAR-10 copy beside the checkout when there is one, else ./data (downloaded by torchvision).
DATA_DIR ?= $(if $(wildcard ../shared/cifar10/train.npz),../shared/cifar10,data)
CONFIG ?= configs/default.yaml
ARGS ?=

.PHONY: run test evaluate benchmark

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -e ".[test]"
	touch $@

run: $(VENV)/.installed
	$(VENV)/bin/cifar-lightning fit --config $(CONFIG) --data.data_dir $(DATA_DIR) --data.download true $(ARGS)
	$(VENV)/bin/cifar-lightning test --config $(CONFIG) --data.data_dir $(DATA_DIR) \
		--ckpt_path "$$(ls -td lightning_logs/version_*/ | head -n 1)checkpoints/best.ckpt" $(ARGS)

evaluate: $(VENV)/.installed
	$(VENV)/bin/cifar-lightning test --config $(CONFIG) --data.data_dir $(DATA_DIR) --data.download true \
		--ckpt_path weights/improvedcnn_cifar10.ckpt $(ARGS)

test: $(VENV)/.installed
	$(VENV)/bin/pytest

benchmark: $(VENV)/.installed
	$(VENV)/bin/python benchmarks/train_throughput.py --data_dir $(DATA_DIR) --steps 30 --repeats 5
	$(VENV)/bin/python benchmarks/train_throughput.py --data_dir $(DATA_DIR) --steps 30 --repeats 5 --recipe fast
	$(VENV)/bin/python benchmarks/evaluation_stages.py --data_dir $(DATA_DIR) --images 1000
	$(VENV)/bin/python benchmarks/model_passes.py --data_dir $(DATA_DIR) --images 1280 --repeats 5
	$(VENV)/bin/python benchmarks/attack_throughput.py --data_dir $(DATA_DIR) --images 512 --steps 10 --repeats 5
	$(VENV)/bin/python benchmarks/adversarial_step.py --data_dir $(DATA_DIR) --steps 20 --repeats 3
