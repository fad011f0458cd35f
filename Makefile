# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
EXTRAS ?= cpu,torch,tf,ray,serve,llm,dev
OUT ?= runs/digits

.PHONY: install demo test bench clean grpc-proto

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

# the gRPC code under onnxpipe/serve/grpc_proto is generated from its .proto files and committed;
# after editing them: make grpc-proto (grpcio-tools is a dev tool only, the server needs grpcio + protobuf)
grpc-proto:
	$(PIP) install -q 'grpcio-tools>=1.85,<1.86'
	$(PYTHON) -m grpc_tools.protoc -I . --python_out=. onnxpipe/serve/grpc_proto/oip.proto
	$(PYTHON) -m grpc_tools.protoc -I . --grpc_python_out=. onnxpipe/serve/grpc_proto/grpc_service.proto
