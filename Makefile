# GPTSAN — two-command quickstart: `make demo`, `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat setup.py | cksum | cut -d' ' -f1)
export TF_CPP_MIN_LOG_LEVEL := 2
export PYTHONHASHSEED := 0

.PHONY: demo test vocab bench install clean

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py

test: $(STAMP)
	$(PY) -m pytest -q tests

vocab: $(STAMP)
	$(PY) -m pip install --quiet -e '.[vocab]'
	$(PY) scripts/build_vocab.py --size 36000 --vocab_file ja-swe36k.txt --emoji_file emoji.json --force

bench: $(STAMP)
	$(PY) scripts/bench_tokenizer.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
