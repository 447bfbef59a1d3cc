# GPTSAN — two-command quickstart: `make demo`, `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat setup.py | cksum | cut -d' ' -f1)
export TF_CPP_MIN_LOG_LEVEL := 2
export PYTHONHASHSEED := 0

.PHONY: demo test vocab vocab-data bench install clean

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py

# Needs no root: tests that read Debian data (`make vocab-data`) skip and print why (-rs);
# .ci/run installs the data and sets GPTSAN_REQUIRE_SYSTEM_DATA=1 so they cannot skip there.
test: $(STAMP)
	$(PY) -m pytest -q -rs tests

# Data: wordfreq (PyPI) + Debian's unicode-data and the Japanese man pages (manpages-ja,
# manpages-ja-dev; linked into build/vocab-corpus so other packages' pages don't change the input).
VOCAB_DEBS := unicode-data manpages-ja manpages-ja-dev
vocab-data:
	dpkg -s $(VOCAB_DEBS) >/dev/null 2>&1 || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(VOCAB_DEBS))

vocab: $(STAMP) vocab-data
	rm -rf build/vocab-corpus && mkdir -p build/vocab-corpus
	dpkg -L manpages-ja manpages-ja-dev | grep '^/usr/share/man/ja/.*\.gz$$' | sort | \
		xargs -I{} ln -s {} build/vocab-corpus/
	$(PY) scripts/build_vocab.py --size 36000 --vocab_file ja-swe36k.txt --emoji_file emoji.json \
		--corpus build/vocab-corpus --force

# The bundled demo model models/demo, rebuilt from scratch (vocabulary -> TFRecords -> training
# -> export; ~25 min on a 2-core CPU). Needs wordfreq (test extras) and Debian's unicode-data.
.PHONY: demo-model
demo-model: $(STAMP) vocab-data
	$(PY) scripts/make_demo_model.py --force

bench: $(STAMP)
	$(PY) scripts/bench_tokenizer.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
