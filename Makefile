# `make demo`: set up .venv and run the whole toy experiment on CPU.
# `make test`: set up .venv and run the test suite.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# torchreid 0.2.5 (an unmaintained repackaging whose package __init__ needs cv2, gdown, ...) is
# kept outside the environment and used only by the test that checks evaluate_rank against its
# rank.py; without it that test skips.
TRREF  := $(VENV)/torchreid-ref

.PHONY: setup demo test test-all clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch + torchvision are pinned as a pair; the constraints keep them while the rest installs.
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	-$(PY) -m pip install -q --no-deps --target $(TRREF) torchreid==0.2.5
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/reid-aug demo --out demo

test: $(STAMP)
	PYTHONPATH=$(TRREF) $(PY) -m pytest -q -m "not slow and not gpu"

test-all: $(STAMP)
	PYTHONPATH=$(TRREF) $(PY) -m pytest -q

clean:
	rm -rf $(VENV) demo
