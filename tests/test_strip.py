"""The strip pass: short internal names, nothing numeric changes, the map back to the old names."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import conv_gemm_model, ort_fused_ops

from onnxpipe.core.errors import InputError
from onnxpipe.core.graph import all_graphs, rename_values
from onnxpipe.core.session import run_model
from onnxpipe.passes import get_pass
from onnxpipe.passes.base import PassContext
from onnxpipe.pipeline import optimize

# two inputs, three outputs, an If whose branches read outer-scope tensors, an initializer,
# a node without a name, intermediate shapes, and a graph input that is already called "t0"
BRANCHY = """
<ir_version: 8, opset_import: ["" : 17]>
branchy (float[N, 4] input_features, bool flag, float[4] t0) => (float[N, 4] y, float[N, 4] z, int64[N] k)
    <float[4, 4] weight_matrix = {1,0,0,0, 0,2,0,0, 0,0,3,0, 0,0,0,4}> {
    projected_features = MatMul(input_features, weight_matrix)
    shifted_features = Add(projected_features, t0)
    y = If(flag) <then_branch = then_graph () => (float[N, 4] then_out) {
                     then_out = Relu(shifted_features)
                 },
                 else_branch = else_graph () => (float[N, 4] else_out) {
                     negated_inside = Neg(shifted_features)
                     else_out = Sigmoid(negated_inside)
                 }>
    z = Mul(y, projected_features)
    k = ArgMax<axis = 1, keepdims = 0>(z)
}
"""


def branchy() -> onnx.ModelProto:
    model = onnx.parser.parse_model(BRANCHY)
    for i, node in enumerate(model.graph.node):
        if i != 1:  # node 1 stays without a name
            node.name = f"/model/layers.{i}/{node.op_type}_with_a_long_exporter_name"
        node.doc_string = "File \"model.py\", line 12, in forward"
        node.metadata_props.add(key="pkg.torch.onnx.stack_trace", value="model.py:12")
    return onnx.shape_inference.infer_shapes(model)


def feeds(flag: bool, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"input_features": rng.standard_normal((3, 4)).astype(np.float32), "flag": np.array(flag),
            "t0": rng.standard_normal(4).astype(np.float32)}


def names(model: onnx.ModelProto) -> tuple[set[str], set[str]]:
    tensors, nodes = set(), set()
    for g in all_graphs(model.graph):
        tensors |= {v.name for v in [*g.input, *g.output, *g.value_info, *g.initializer]}
        tensors |= {n for node in g.node for n in [*node.input, *node.output] if n}
        nodes |= {node.name for node in g.node}
    return tensors, nodes


def test_strip_renames_everything_internal_and_computes_the_same():
    model = branchy()
    assert len(model.graph.value_info) > 0
    result = get_pass("strip")({}).apply(model, PassContext())
    out = result.model
    onnx.checker.check_model(out, full_check=True)
    assert [v.name for v in out.graph.input] == ["input_features", "flag", "t0"]
    assert [v.name for v in out.graph.output] == ["y", "z", "k"]
    tensors, nodes = names(out)
    internal = tensors - {"input_features", "flag", "t0", "y", "z", "k"}
    assert internal and all(t.startswith("t") and t[1:].isdigit() for t in internal) and "t0" not in result.notes[
        "names"]["tensors"]  # the input called t0 is not handed out again
    assert all(n.startswith("n") and n[1:].isdigit() for n in nodes) and len(nodes) == 8  # 5 + 1 + 2 in the branches
    assert not out.graph.value_info  # every stored shape here is one inference derives again
    assert not any(n.doc_string or n.metadata_props for g in all_graphs(out.graph) for n in g.node)
    assert result.notes["bytes_saved"] == model.ByteSize() - out.ByteSize() > 0
    assert result.notes["name_bytes"]["after"] < result.notes["name_bytes"]["before"] / 3
    for flag in (True, False):
        ref, got = run_model(model, feeds(flag)), run_model(out, feeds(flag))
        for key in ("y", "z", "k"):
            np.testing.assert_array_equal(got[key], ref[key])


def test_the_map_in_the_notes_gives_every_old_name_back():
    model = branchy()
    result = get_pass("strip")({"keep_debug": True}).apply(model, PassContext())
    restored = onnx.ModelProto()
    restored.CopyFrom(result.model)
    rename_values(restored.graph, result.notes["names"]["tensors"])
    node_map = result.notes["names"]["nodes"]
    for g in all_graphs(restored.graph):
        for node in g.node:
            old = node_map[node.name]
            node.name = old
            if not old:  # a node that had no name gets none back
                node.ClearField("name")
    del model.graph.value_info[:]  # derivable: dropped (next test)
    assert restored.SerializeToString() == model.SerializeToString()


def test_only_shapes_that_inference_derives_again_are_dropped():
    # the Reshape's target shape is computed at run time: ONNX cannot know "r" is [N, 8],
    # only the exporter (or symbolic inference) did; the Relu's output it derives itself
    model = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 2, 4] x) => (float[N, 8] y) {
        relu_output = Relu(x)
        dims = Constant<value = int64[2] {0, -1}>()
        shape = Identity(dims)
        r = Reshape(relu_output, shape)
        y = Neg(r)
    }""")
    model.graph.value_info.extend([onnx.helper.make_tensor_value_info("relu_output", onnx.TensorProto.FLOAT, ["N", 2, 4]),
                                   onnx.helper.make_tensor_value_info("r", onnx.TensorProto.FLOAT, ["N", 8])])
    result = get_pass("strip")({}).apply(model, PassContext())
    kept = {result.notes["names"]["tensors"][v.name] for v in result.model.graph.value_info}
    assert kept == {"r"} and result.notes["derivable_shapes_dropped"] == 1


def test_keep_leaves_named_tensors_and_nodes_alone():
    model = branchy()
    node = "/model/layers.0/MatMul_with_a_long_exporter_name"
    out = get_pass("strip")({"keep": ["shifted_features", node]}).apply(model, PassContext()).model
    tensors, nodes = names(out)
    assert "shifted_features" in tensors and "projected_features" not in tensors
    assert node in nodes and len(nodes) == 8
    with pytest.raises(InputError, match=r"keep: no tensor or node named 'shifted_feature'.*did you mean shifted_features"):
        get_pass("strip")({"keep": ["shifted_feature"]}).apply(model, PassContext())


def test_strip_in_the_pipeline_is_checked_exactly_and_keeps_int8_kernels(tmp_path):
    rng = np.random.default_rng(0)
    data = [{"x": rng.standard_normal((8, 3, 8, 8)).astype(np.float32)} for _ in range(3)]
    result = optimize(conv_gemm_model(), [{"quantize": {"mode": "static"}}, "strip"], calibration=lambda: iter(data),
                      check_inputs=data[:1], measure_latency=False)
    quantized, stripped = result.stages[1], result.stages[2]
    assert quantized.kept and stripped.kept, stripped.reason
    assert stripped.atol == 0 and stripped.rtol == 0
    assert stripped.size_bytes < quantized.size_bytes

    before = optimize(conv_gemm_model(), [{"quantize": {"mode": "static"}}], calibration=lambda: iter(data),
                      check_inputs=data[:1], measure_latency=False).model
    assert ort_fused_ops(result.model, tmp_path) == ort_fused_ops(before, tmp_path)
    assert ort_fused_ops(before, tmp_path)["QLinearConv"] == 1
