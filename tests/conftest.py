"""Shared fixtures: tiny models built in the test run, never downloaded."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.parser
import pytest
from onnx import helper

ROOT = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(config, items):
    """Skip GPU tests cleanly where CUDA is not available to ONNX Runtime."""
    try:
        import onnxruntime as ort

        has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs CUDA and onnxruntime-gpu")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    np.random.seed(0)


@pytest.fixture(scope="session", autouse=True)
def _zoo_cache(tmp_path_factory):
    """Zoo models train into a cache private to this test session unless one is given."""
    if "ONNXPIPE_CACHE_DIR" not in os.environ:
        os.environ["ONNXPIPE_CACHE_DIR"] = str(tmp_path_factory.mktemp("onnxpipe-cache"))
    yield


def write_factory(tmp_path: Path, body: str, name: str = "factory.py") -> Path:
    """Write a Python factory module and return its path."""
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``python -m onnxpipe ARGS`` in a subprocess, as a user would."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-m", "onnxpipe", *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, env=env, timeout=timeout)


def conv_gemm_model(batch: str | int = "N") -> onnx.ModelProto:
    """x[N,3,8,8] -> Conv(3->4,k3,pad1)+bias -> Relu -> Flatten -> Gemm(256->10)+bias -> y."""
    rng = np.random.default_rng(0)
    w = onnx.numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    b = onnx.numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b")
    fw = onnx.numpy_helper.from_array(rng.standard_normal((10, 256)).astype(np.float32) * 0.1, "fw")
    fb = onnx.numpy_helper.from_array(rng.standard_normal(10).astype(np.float32), "fb")
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "fw", "fb"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "conv_gemm",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [batch, 3, 8, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [batch, 10])],
        [w, b, fw, fb],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def with_random_weights(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], seed: int = 0) -> onnx.ModelProto:
    """Add float32 initializers of the given shapes (standard normal x 0.3) and check the model."""
    rng = np.random.default_rng(seed)
    model.graph.initializer.extend(onnx.numpy_helper.from_array((rng.standard_normal(s) * 0.3).astype(np.float32), n)
                                   for n, s in shapes.items())
    onnx.checker.check_model(model, full_check=True)
    return model


def residual_concat_model(batched_side: bool = False) -> onnx.ModelProto:
    """A residual block, then two branches joined by Concat, then a head.

    The side input is read only at the end (a graph input carried past the first stages of a
    split): a scalar ``scale`` multiplied in, or with ``batched_side`` a ``z[N, 3]`` added (one
    per sample, for servers that batch requests). ``feat`` is an output computed mid-graph and
    ``w1`` is shared by the first conv and the second branch (a weight both sides of a cut need).
    """
    side, head = ("float[N, 3] z", "Add (h, z)") if batched_side else ("float scale", "Mul (h, scale)")
    model = onnx.parser.parse_model(f"""
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[N, 8, 8, 8] x, {side}) => (float[N, 3] y, float[N, 8, 8, 8] feat) {{
        a = Conv <pads = [1, 1, 1, 1]> (x, w1)
        r1 = Relu (a)
        b = Conv <pads = [1, 1, 1, 1]> (r1, w2)
        s = Add (r1, b)
        feat = Relu (s)
        c1 = Conv <pads = [1, 1, 1, 1]> (feat, w3)
        c2 = Conv <pads = [1, 1, 1, 1]> (feat, w1)
        cat = Concat <axis = 1> (c1, c2)
        g = GlobalAveragePool (cat)
        f = Flatten (g)
        h = Gemm <transB = 1> (f, fw)
        y = {head}
    }}
    """)
    return with_random_weights(model, {"w1": (8, 8, 3, 3), "w2": (8, 8, 3, 3), "w3": (8, 8, 3, 3), "fw": (3, 16)})


def gather_model() -> onnx.ModelProto:
    """y[N,4] = table[idx[N]]: an index out of range makes ORT fail that batch."""
    table = onnx.numpy_helper.from_array(np.arange(40, dtype=np.float32).reshape(10, 4), "table")
    graph = helper.make_graph([helper.make_node("Gather", ["table", "idx"], ["y"], axis=0)], "gather",
                              [helper.make_tensor_value_info("idx", onnx.TensorProto.INT64, ["N"])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4])], [table])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@contextlib.contextmanager
def serving(repo: Path, devices: str, **options: Any) -> Iterator[tuple[str, Any]]:
    """An inference server on ``repo`` in this process, on a free port: yields ``(url, server)``."""
    from onnxpipe.runtimes.providers import parse_devices
    from onnxpipe.serve.repository import discover
    from onnxpipe.serve.server import BackgroundServer, InferenceServer, ServeOptions

    srv = InferenceServer(discover(repo), parse_devices(devices), ServeOptions(port=0, **options), source=repo)
    bg = BackgroundServer(srv)
    url = bg.start()
    try:
        yield url, srv
    finally:
        bg.stop()


@contextlib.contextmanager
def triton_client(url: str) -> Iterator[Any]:
    """``tritonclient.http`` on ``url``, sixteen requests in flight at most."""
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url.removeprefix("http://"), concurrency=16, network_timeout=60)
    try:
        yield client
    finally:
        client.close()


def ort_fused_ops(model: onnx.ModelProto, workdir: Path) -> Counter:
    """Op types of the graph ONNX Runtime's CPU provider runs, after its fusions (QDQ groups -> QLinearConv, ...)."""
    import onnxruntime as ort

    src, opt = workdir / "fused-in.onnx", workdir / "fused-out.onnx"
    onnx.save(model, src)
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(opt)
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(str(opt)).graph.node)


@pytest.fixture
def conv_gemm_path(tmp_path: Path) -> Path:
    path = tmp_path / "conv_gemm.onnx"
    onnx.save(conv_gemm_model(), path)
    return path
