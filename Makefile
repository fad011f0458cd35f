# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
EXTRAS ?= cpu,torch,tf,ray,serve,dev
OUT ?= runs/digits

.PHONY: install demo test bench clean

install:
	$(PIP) install -q -c constraints.txt -e '.[$(EXTRAS)]'

demo: install
	$(PYTHON) -m onnxpipe run models/digits_cnn/pipeline.yaml -o $(OUT)
	$(PYTHON) -m onnxpipe inspect $(OUT)/model.onnx

test: install
	$(PYTHON) -m pytest -q

bench: install
	for b in benchmarks/*.py; do $(PYTHON) $$b || exit 1; done

clean:
	rm -rf runs .pytest_cache build *.egg-info
