# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
EXTRAS ?= cpu,torch,tf,ray,dev
OUT ?= runs/digits

.PHONY: install demo test bench clean

install:
	$(PIP) install -q -c constraints.txt -e '.[$(EXTRAS)]'

demo: install
	$(PYTHON) -m onnxpipe convert models/digits_cnn/model.py:build -o $(OUT)/digits_cnn.onnx
	$(PYTHON) -m onnxpipe inspect $(OUT)/digits_cnn.onnx

test: install
	$(PYTHON) -m pytest -q

clean:
	rm -rf runs .pytest_cache build *.egg-info
