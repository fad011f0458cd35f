"""Liveness analysis: peak activation bytes, where the peak is, and ``inspect --memory``."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx.parser
import pytest
from conftest import run_cli

from onnxpipe.core.errors import InputError
from onnxpipe.partition.memory import live_bytes, memory_report
from onnxpipe.partition.profile import profile_graph


def skip_model() -> onnx.ModelProto:
    """x[N,8] -> a -> b, c = a + b (a is kept alive across b: a skip), y = c * w."""
    model = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    skip (float[N, 8] x) => (float[N, 8] y) {
        a = Relu (x)
        b = Sigmoid (a)
        c = Add (a, b)
        y = Mul (c, w)
    }
    """)
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.ones(8, np.float32), "w"))
    onnx.checker.check_model(model, full_check=True)
    return model


def test_liveness_counts_the_skip_tensor_until_its_last_reader():
    row = 8 * 4  # one sample of any tensor here
    live = live_bytes(profile_graph(skip_model(), batch=2))
    # step 0: x, a · step 1: a, b · step 2: a, b, c (the peak) · step 3: c, y
    assert live == [2 * 2 * row, 2 * 2 * row, 3 * 2 * row, 2 * 2 * row]


@pytest.mark.parametrize("batch", [1, 4])
def test_report_names_the_peak_node_and_scales_with_batch(batch):
    r = memory_report(skip_model(), batch=batch)
    assert (r.peak_bytes, r.peak_node, r.peak_op, r.peak_step) == (3 * 32 * batch, "c", "Add", 2)
    assert r.weight_bytes == 32 and r.input_bytes == r.output_bytes == 32 * batch
    assert {t for t, _ in r.at_peak} == {"a", "b", "c"}


def test_if_branches_add_their_inner_tensors_at_the_if_step():
    model = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    cond (float[4, 16] x, bool flag) => (float[4, 16] y) {
        t = Relu (x)
        y = If (flag) <
            then_branch = g1 () => (float[4, 16] o1) { h = Neg (t)  o1 = Abs (h) },
            else_branch = g2 () => (float[4, 16] o2) { o2 = Neg (t) }
        >
    }
    """)
    size = 4 * 16 * 4
    live = live_bytes(profile_graph(model))
    # x, t and the 1-byte flag; then t, flag and y, plus h and o1 inside the costlier branch
    assert live == [2 * size + 1, 2 * size + 1 + 2 * size]


def test_bad_batch_is_a_clear_error():
    with pytest.raises(InputError, match="batch must be >= 1"):
        memory_report(skip_model(), batch=0)


def test_inspect_memory_cli(tmp_path):
    path = tmp_path / "skip.onnx"
    onnx.save(skip_model(), path)
    proc = run_cli("inspect", str(path), "--memory", "-b", "4", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["peak_activation_bytes"] == 384 and doc["peak_node"] == "c" and doc["weight_bytes"] == 32
    proc = run_cli("inspect", str(path), "--memory")
    assert proc.returncode == 0 and "peak activations" in proc.stdout and "at node c (Add)" in proc.stdout
