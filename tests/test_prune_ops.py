"""More couplings of the prune pass: Split, squeeze-excitation gates, spatial ops, embeddings, tokens.

Same check as test_prune_groups: the pruned model equals the unpruned one with every weight
that reads a removed channel zeroed, and channel counts are exact.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from test_prune_groups import assert_same, build, conv, prune, rand, removed, row_of, run, weight, zeroed


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(2)


@pytest.mark.parametrize("sizes", [[3, 5], None])
def test_split_along_channels(rng, sizes):
    extra = {"sizes": np.array(sizes, dtype=np.int64)} if sizes else {}
    split = helper.make_node("Split", ["r"] + (["sizes"] if sizes else []), ["p", "q"], axis=1)
    half = (sizes or [4, 4])
    nodes = [conv("a", "x", "wa", "ba", "c"), helper.make_node("Relu", ["c"], ["r"]), split,
             conv("bp", "p", "wp", None, "yp", k=1), conv("bq", "q", "wq", None, "yq", k=1)]
    inits = {"wa": rand(rng, 8, 3, 3, 3), "ba": rand(rng, 8), "wp": rand(rng, 2, half[0], 1, 1),
             "wq": rand(rng, 2, half[1], 1, 1), **extra}
    model = build(nodes, {"x": ["N", 3, 4, 4]}, {"yp": ["N", 2, 4, 4], "yq": ["N", 2, 4, 4]}, inits)
    x = {"x": rand(rng, 2, 3, 4, 4, scale=1.0)}
    result = prune(model, x, ratio=0.5)
    gone = removed(result, "c")
    assert len(gone) == 4
    low = [c for c in gone if c < half[0]]
    high = [c - half[0] for c in gone if c >= half[0]]
    if sizes is None:
        assert len(low) == len(high) == 2  # an even split stays even
    else:
        split_node = next(n for n in result.model.graph.node if n.op_type == "Split")
        new_sizes = numpy_helper.to_array(next(i for i in result.model.graph.initializer if i.name == split_node.input[1]))
        assert new_sizes.tolist() == [3 - len(low), 5 - len(high)]
    assert weight(result.model, "bp").shape[1] == half[0] - len(low)
    assert_same(result.model, zeroed(model, [("bp", 1, 1, low), ("bq", 1, 1, high)]), x)


def test_squeeze_excitation_gate_joins_the_gated_channels(rng):
    nodes = [conv("a", "x", "wa", "ba", "c"), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["g"]), conv("s1", "g", "w1", "b1", "h", k=1),
             helper.make_node("Relu", ["h"], ["hr"]), conv("s2", "hr", "w2", "b2", "e", k=1),
             helper.make_node("Sigmoid", ["e"], ["gate"]), helper.make_node("Mul", ["r", "gate"], ["m"]),
             conv("out", "m", "wo", None, "y", k=1)]
    inits = {"wa": rand(rng, 8, 3, 3, 3), "ba": rand(rng, 8), "w1": rand(rng, 4, 8, 1, 1), "b1": rand(rng, 4),
             "w2": rand(rng, 8, 4, 1, 1), "b2": rand(rng, 8), "wo": rand(rng, 3, 8, 1, 1)}
    model = build(nodes, {"x": ["N", 3, 5, 5]}, {"y": ["N", 3, 5, 5]}, inits)
    x = {"x": rand(rng, 2, 3, 5, 5, scale=1.0)}
    result = prune(model, x, ratio=0.5)
    row = row_of(result, "a")
    assert sorted(row["sources"]) == ["a", "s2"] and row["removed"]["c"] == row["removed"]["e"]
    gone, squeeze = row["removed"]["c"], removed(result, "h")
    assert len(gone) == 4 and len(squeeze) == 2
    assert weight(result.model, "s1").shape == (2, 4, 1, 1) and weight(result.model, "s2").shape == (4, 2, 1, 1)
    ref = zeroed(model, [("s1", 1, 1, gone), ("out", 1, 1, gone), ("s2", 1, 1, squeeze)])
    assert_same(result.model, ref, x)


def test_spatial_ops_pass_channels_through(rng):
    nodes = [conv("a", "x", "wa", "ba", "c"), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Pad", ["p", "pads"], ["pd"], mode="reflect"),
             helper.make_node("Resize", ["pd", "", "scales"], ["u"], mode="nearest"),
             helper.make_node("Transpose", ["u"], ["t"], perm=[0, 2, 3, 1]),
             helper.make_node("Transpose", ["t"], ["tt"], perm=[0, 3, 1, 2]),
             helper.make_node("ReduceMean", ["tt", "axes"], ["mean"], keepdims=0),
             helper.make_node("Gemm", ["mean", "fw"], ["y"], name="fc", transB=1)]
    inits = {"wa": rand(rng, 8, 3, 3, 3), "ba": rand(rng, 8), "pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64),
             "scales": np.array([1, 1, 2, 2], np.float32), "axes": np.array([2, 3], np.int64), "fw": rand(rng, 4, 8)}
    model = build(nodes, {"x": ["N", 3, 4, 4]}, {"y": ["N", 4]}, inits, opset=18)
    x = {"x": rand(rng, 2, 3, 4, 4, scale=1.0)}
    result = prune(model, x, ratio=0.25)
    gone = removed(result, "c")
    assert len(gone) == 2 and weight(result.model, "fc").shape == (4, 6)
    assert_same(result.model, zeroed(model, [("fc", 1, 1, gone)]), x)


def test_embedding_columns_and_token_concat(rng):
    """Gather from a table is a source; a class token concatenated along the sequence joins it."""
    nodes = [helper.make_node("Gather", ["table", "tokens"], ["emb"], name="embed"),
             helper.make_node("Concat", ["cls", "emb"], ["seq"], axis=1),
             helper.make_node("Relu", ["seq"], ["r"]),
             helper.make_node("MatMul", ["r", "w"], ["y"], name="proj")]
    inits = {"table": rand(rng, 11, 8), "cls": rand(rng, 1, 1, 8), "w": rand(rng, 8, 3)}
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("tokens", onnx.TensorProto.INT64, [1, 5])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 6, 3])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    x = {"tokens": rng.integers(0, 11, size=(1, 5)).astype(np.int64)}
    result = prune(model, x, ratio=0.5)
    gone = removed(result, "emb")
    assert len(gone) == 4 and weight(result.model, "embed", 0).shape == (11, 4)
    cls = next(i for i in result.model.graph.initializer if "cls" in i.name)
    assert tuple(cls.dims) == (1, 1, 4)  # the constant joined along the sequence is sliced too
    assert_same(result.model, zeroed(model, [("proj", 1, 0, gone)]), x)
    assert run(result.model, x)["y"].shape == (1, 6, 3)
