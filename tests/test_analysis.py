"""Tests for onnxpipe.core.analysis: parameters, op histogram and hand-checked MAC/FLOP counts."""

from __future__ import annotations

import io
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from rich.console import Console

from onnxpipe.core.analysis import summarize
from onnxpipe.core.errors import InputError


def _model(nodes, inputs, outputs, inits=(), opset=17, **kw) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], **kw)


def _f32(name, *shape) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ones(shape, np.float32), name)


def _vi(name, shape, dtype=TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def conv_gemm_model() -> onnx.ModelProto:
    return _model(
        [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
         helper.make_node("Relu", ["c"], ["r"]),
         helper.make_node("Flatten", ["r"], ["f"]),
         helper.make_node("Gemm", ["f", "gw", "gb"], ["y"], transB=1)],
        [_vi("x", ["N", 3, 8, 8])], [_vi("y", ["N", 10])],
        [_f32("w", 4, 3, 3, 3), _f32("b", 4), _f32("gw", 10, 256), _f32("gb", 10)])


def test_conv_gemm_hand_counted():
    s = summarize(conv_gemm_model())
    # Conv: N*Cout*H*W*(Cin/group)*k*k = 1*4*8*8*3*3*3 = 6912 MACs; FLOPs 2*6912 + 256 bias = 14080
    # Relu: 1*4*8*8 = 256 FLOPs; Flatten: 0
    # Gemm: M*N*K = 1*10*256 = 2560 MACs; FLOPs 2*2560 + 10 bias = 5130
    assert s.cost_by_op["Conv"].macs == 6912 and s.cost_by_op["Conv"].flops == 14080
    assert s.cost_by_op["Relu"].flops == 256
    assert s.cost_by_op["Flatten"].flops == 0
    assert s.cost_by_op["Gemm"].macs == 2560 and s.cost_by_op["Gemm"].flops == 5130
    assert s.macs == 6912 + 2560 == 9472
    assert s.flops == 14080 + 256 + 5130 == 19466
    assert s.uncounted == []
    assert s.input_shapes == {"x": (1, 3, 8, 8)}
    s4 = summarize(conv_gemm_model(), batch=4)
    assert (s4.macs, s4.flops) == (4 * 9472, 4 * 19466)
    assert s4.input_shapes == {"x": (4, 3, 8, 8)}
    # parameters: 4*3*3*3 + 4 + 10*256 + 10 = 2682 floats
    assert s.params == 2682 and s.param_bytes == 4 * 2682


@pytest.mark.parametrize("group,cin_per_group,expected", [
    (8, 1, 8 * 16 * 16 * 1 * 9),  # depthwise: 18432
    (2, 4, 8 * 16 * 16 * 4 * 9),  # two groups of 4 input channels: 73728
])
def test_grouped_conv(group, cin_per_group, expected):
    m = _model([helper.make_node("Conv", ["x", "w"], ["y"], group=group, pads=[1, 1, 1, 1])],
               [_vi("x", [1, 8, 16, 16])], [_vi("y", None)], [_f32("w", 8, cin_per_group, 3, 3)])
    s = summarize(m)
    assert s.macs == expected and s.flops == 2 * expected  # no bias


@pytest.mark.parametrize("a,b,expected", [
    ([2, 4, 16, 8], [2, 4, 8, 16], 2 * 4 * 16 * 16 * 8),  # Q @ K^T style: 16384
    ([2, 1, 16, 8], [1, 4, 8, 16], 2 * 4 * 16 * 16 * 8),  # batch dims broadcast to (2, 4)
    ([8], [2, 8, 3], 2 * 1 * 8 * 3),                      # 1-D left operand is [1, 8]
    ([5, 8], [8], 5 * 8 * 1),                             # 1-D right operand is [8, 1]
])
def test_matmul_between_activations(a, b, expected):
    m = _model([helper.make_node("MatMul", ["a", "b"], ["y"])], [_vi("a", a), _vi("b", b)], [_vi("y", None)])
    s = summarize(m)
    assert s.cost_by_op["MatMul"].macs == expected and s.flops == 2 * expected


def test_attention_chain():
    # scores = Q @ K^T (2x4x16x8 @ 2x4x8x16), softmax, P @ V (2x4x16x16 @ 2x4x16x8)
    m = _model([helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
                helper.make_node("MatMul", ["q", "kt"], ["s"]),
                helper.make_node("Softmax", ["s"], ["p"], axis=-1),
                helper.make_node("MatMul", ["p", "v"], ["y"])],
               [_vi("q", [2, 4, 16, 8]), _vi("k", [2, 4, 16, 8]), _vi("v", [2, 4, 16, 8])], [_vi("y", None)])
    s = summarize(m)
    assert s.cost_by_op["MatMul"].macs == 2 * (2 * 4 * 16 * 16 * 8)
    assert s.cost_by_op["Softmax"].flops == 5 * 2 * 4 * 16 * 16
    assert s.op_counts["MatMul"] == 2


def test_conv_transpose():
    m = _model([helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"], strides=[2, 2])],
               [_vi("x", [1, 4, 5, 5])], [_vi("y", None)], [_f32("w", 4, 2, 3, 3), _f32("b", 2)])
    s = summarize(m)
    # N*Cin*H*W*(Cout/group)*k*k = 1*4*5*5*2*3*3 = 1800; output 1x2x11x11 = 242 bias adds
    assert s.macs == 1800 and s.flops == 2 * 1800 + 242


def test_einsum():
    m = _model([helper.make_node("Einsum", ["a", "b"], ["y"], equation="bij,bjk->bik"),
                helper.make_node("Einsum", ["y", "c"], ["z"], equation="...ik,...kl->...il")],
               [_vi("a", [2, 3, 4]), _vi("b", [2, 4, 5]), _vi("c", [5, 6])], [_vi("z", None)], opset=12)
    s = summarize(m)
    assert s.cost_by_op["Einsum"].macs == 2 * 3 * 4 * 5 + 2 * 3 * 5 * 6


def test_parameters_histogram_opsets_and_symbolic_dims():
    half = numpy_helper.from_array(np.ones(10, np.float16), "h")
    const = helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.arange(3, dtype=np.int64)))
    m = _model([const,
                helper.make_node("Add", ["x", "w"], ["a"]),
                helper.make_node("Add", ["a", "w"], ["b"]),
                helper.make_node("Add", ["b", "w"], ["y"]),
                helper.make_node("Relu", ["y"], ["z"])],
               [_vi("x", ["batch", "seq", 4])], [_vi("z", ["batch", "seq", 4])], [_f32("w", 4), half],
               producer_name="unit", producer_version="0.1")
    m.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    s = summarize(m, batch=2, dims={"seq": 10})
    assert s.params == 4 + 10 + 3
    assert s.param_bytes == 4 * 4 + 2 * 10 + 8 * 3
    assert list(s.op_counts.items()) == [("Add", 3), ("Constant", 1), ("Relu", 1)]
    assert s.opsets == {"": 17, "com.microsoft": 1}
    assert (s.producer_name, s.producer_version, s.ir_version) == ("unit", "0.1", m.ir_version)
    assert s.inputs[0].shape == ["batch", "seq", 4]
    assert s.input_shapes == {"x": (2, 10, 4)}
    assert s.flops == 4 * 2 * 10 * 4  # three Adds and a Relu, one FLOP per output element
    assert summarize(m, input_shapes={"x": [3, 5, 4]}).flops == 4 * 3 * 5 * 4


def test_initializers_listed_as_inputs_ir3():
    m = _model([helper.make_node("MatMul", ["x", "w"], ["y"])],
               [_vi("x", ["N", 4]), _vi("w", [4, 3])], [_vi("y", None)], [_f32("w", 4, 3)],
               opset=8, ir_version=3)
    s = summarize(m, batch=2)
    assert [i.name for i in s.inputs] == ["x"]
    assert s.params == 12 and s.macs == 2 * 4 * 3


def test_runtime_shape_fallback_counts_data_dependent_ops():
    # NonZero of a constant mask: shape inference leaves its length unknown, ORT knows it is 3
    mask = helper.make_node("Constant", [], ["mask"],
                            value=numpy_helper.from_array(np.array([1, 0, 1, 0, 1], np.float32)))
    m = _model([mask,
                helper.make_node("NonZero", ["mask"], ["idx"]),
                helper.make_node("Gather", ["x", "idx"], ["g"], axis=1),  # [4, 1, 3]
                helper.make_node("Relu", ["g"], ["r"]),
                helper.make_node("MatMul", ["r", "w"], ["y"])],  # [4, 1, 3] @ [3, 2]
               [_vi("x", [4, 5])], [_vi("y", None)], [_f32("w", 3, 2)])
    s = summarize(m)
    assert s.uncounted == []
    assert s.cost_by_op["Relu"].flops == 4 * 1 * 3
    assert s.cost_by_op["MatMul"].macs == 4 * 1 * 3 * 2
    assert any("ONNX Runtime" in n for n in s.notes)


def test_unknown_ops_are_reported_not_zero():
    # ORT cannot run a custom-domain op, so the Relu after it stays unsized and is listed
    m = _model([helper.make_node("Mystery", ["x"], ["m"], domain="acme"),
                helper.make_node("Relu", ["m"], ["y"])],
               [_vi("x", [2, 3])], [_vi("y", None)])
    m.opset_import.append(helper.make_opsetid("acme", 1))
    s = summarize(m)
    assert {(u.op_type, u.reason) for u in s.uncounted} == {
        ("acme.Mystery", "no cost rule for this op"), ("Relu", "shapes unknown")}
    assert s.flops == 0
    assert any("could not run" in n for n in s.notes)


def test_if_counts_costlier_branch_and_loop_body_once():
    then_g = helper.make_graph([helper.make_node("MatMul", ["x", "x"], ["t"])], "then", [], [_vi("t", [4, 4])])
    else_g = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [], [_vi("e", [4, 4])])
    body = helper.make_graph([helper.make_node("Identity", ["cond_in"], ["cond_out"]),
                              helper.make_node("Add", ["acc_in", "acc_in"], ["acc_out"])], "body",
                             [_vi("i", [], TensorProto.INT64), _vi("cond_in", [], TensorProto.BOOL), _vi("acc_in", [4, 4])],
                             [_vi("cond_out", [], TensorProto.BOOL), _vi("acc_out", [4, 4])])
    m = _model([helper.make_node("If", ["c"], ["z"], then_branch=then_g, else_branch=else_g),
                helper.make_node("Loop", ["n", "c", "z"], ["y"], body=body)],
               [_vi("x", [4, 4]), _vi("c", [], TensorProto.BOOL), _vi("n", [], TensorProto.INT64)],
               [_vi("y", None)])
    s = summarize(m)
    assert s.cost_by_op["MatMul"].macs == 4 * 4 * 4
    assert s.cost_by_op["Add"].flops == 16
    assert s.uncounted == []
    assert any("Loop" in n and "once" in n for n in s.notes)


def test_as_dict_is_json_and_render_prints_tables():
    s = summarize(conv_gemm_model(), batch=2)
    d = json.loads(json.dumps(s.as_dict()))
    assert d["cost"]["macs"] == 2 * 9472 and d["inputs"][0]["shape"] == ["N", 3, 8, 8]
    assert d["parameters"]["count"] == 2682 and abs(sum(v["share"] for v in d["cost"]["by_op"].values()) - 1) < 1e-9
    out = io.StringIO()
    s.render(Console(file=out, width=120))
    text = out.getvalue()
    assert "Conv" in text and "38.9 KFLOPs" in text and "2.68 K parameters" in text


def test_unknown_input_shape_name_is_an_error():
    with pytest.raises(InputError, match="unknown input"):
        summarize(conv_gemm_model(), input_shapes={"nope": [1]})
