"""Each small pass on hand-built models: simplify, opset, fp16, fix-shapes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import conv_gemm_model
from onnx import helper, numpy_helper

from onnxpipe.core.errors import InputError
from onnxpipe.core.session import run_model
from onnxpipe.passes import available, get_pass
from onnxpipe.passes.base import PassContext
from onnxpipe.passes.simplify import Simplify, count_nodes, repair
from onnxpipe.pipeline.stages import generated_inputs

REDUNDANT = """
<ir_version: 8, opset_import: ["" : 17]>
redundant (float[N, 4] x) => (float[N, 4] y) {
    shape = Shape(x)
    one = Constant<value = float {1.0}>()
    zero = Constant<value = float {0.0}>()
    a = Mul(x, one)
    b = Add(a, zero)
    c = Identity(b)
    d = Reshape(c, shape)
    e = Relu(d)
    f = Identity(e)
    y = Relu(f)
}
"""


def _ctx(model):
    return PassContext(check_inputs=generated_inputs(model))


def test_listing_passes_imports_none_of_them():
    import subprocess
    import sys

    code = ("import sys, onnxpipe.passes as p; names = p.available(); "
            "print(names, [m for m in sys.modules if m.startswith('onnxpipe.passes.')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "simplify" in out and out.strip().endswith("[]")


def test_simplify_removes_redundant_nodes_and_keeps_outputs():
    model = onnx.parser.parse_model(REDUNDANT)
    result = Simplify().apply(model, _ctx(model))
    assert count_nodes(result.model) < count_nodes(model)
    assert count_nodes(result.model) <= min(result.model_nodes for result.model_nodes in
                                            [result.notes["nodes_by_candidate"][k] for k in ("onnxsim", "onnxslim")])
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    np.testing.assert_allclose(run_model(result.model, {"x": x})["y"], np.maximum(x, 0), rtol=1e-6)


def test_simplify_is_never_worse_than_either_library_alone():
    model = conv_gemm_model()
    result = Simplify().apply(model, _ctx(model))
    sizes = result.notes["nodes_by_candidate"]
    assert count_nodes(result.model) == min(sizes.values())


def test_simplify_backends_can_be_skipped():
    model = onnx.parser.parse_model(REDUNDANT)
    result = Simplify({"skip": ["onnxsim", "ort"]}).apply(model, _ctx(model))
    assert set(result.notes["nodes_by_candidate"]) <= {"onnxslim", "chain", "unchanged"}
    with pytest.raises(InputError, match="skip"):
        Simplify({"skip": ["tvm"]})


def test_simplify_rejects_a_candidate_that_changes_outputs():
    model = onnx.parser.parse_model(REDUNDANT)

    class WrongSlim(Simplify):  # a backend is a public method: override one
        def onnxslim(self, m):
            out = onnx.ModelProto()
            out.CopyFrom(m)
            del out.graph.node[:]  # the smallest candidate, and a wrong one: y = -x
            out.graph.node.append(helper.make_node("Neg", ["x"], ["y"]))
            return out

    result = WrongSlim({"skip": ["onnxsim", "ort"]}).apply(model, PassContext(check_inputs=[
        {"x": np.full((2, 4), -1.0, np.float32)}]))
    assert "onnxslim" in result.notes["rejected"] and result.notes["chosen"] is None
    assert result.model is model and not result.modified


def test_repair_drops_dangling_inputs_and_raises_ir_version():
    model = conv_gemm_model()
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    broken.graph.input.append(helper.make_tensor_value_info("gone", onnx.TensorProto.FLOAT, [4]))
    broken.ir_version = 3
    original = onnx.ModelProto()
    original.CopyFrom(model)
    original.ir_version = 3
    original.graph.initializer.append(numpy_helper.from_array(np.zeros(4, np.float32), "gone"))
    fixed = repair(broken, original)
    assert [i.name for i in fixed.graph.input] == ["x"]
    assert fixed.ir_version >= 4
    onnx.checker.check_model(fixed)


def test_opset_pass():
    model = conv_gemm_model()
    result = get_pass("opset")({"version": 19}).apply(model, _ctx(model))
    assert [o.version for o in result.model.opset_import if o.domain == ""] == [19]
    with pytest.raises(InputError, match="version"):
        get_pass("opset")({"version": 999})


def test_fp16_keeps_io_float32_and_sensitive_ops_in_float32():
    model = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 8] x) => (float[N, 8] y) {
        w = Constant<value = float[8, 8] {""" + ",".join(["0.1"] * 64) + """}>()
        h = MatMul(x, w)
        y = Softmax<axis = -1>(h)
    }
    """)
    result = get_pass("fp16")({}).apply(model, _ctx(model))
    m = result.model
    assert m.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert m.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    onnx.checker.check_model(m)
    x = np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)
    np.testing.assert_allclose(run_model(m, {"x": x})["y"], run_model(model, {"x": x})["y"], atol=1e-3)
    softmax_in = next(n for n in m.graph.node if n.op_type == "Softmax").input[0]
    inferred = onnx.shape_inference.infer_shapes(m)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    assert types.get(softmax_in) == onnx.TensorProto.FLOAT  # kept in float32


def test_fix_shapes_by_dim_name_and_by_input():
    model = conv_gemm_model()
    by_name = get_pass("fix-shapes")({"dims": {"N": 1}}).apply(model, _ctx(model)).model
    assert by_name.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    assert by_name.graph.output[0].type.tensor_type.shape.dim[0].dim_value == 1
    by_input = get_pass("fix-shapes")({"inputs": {"x": [4, 3, 8, 8]}}).apply(model, _ctx(model)).model
    assert by_input.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 4
    with pytest.raises(InputError, match="not an input"):
        get_pass("fix-shapes")({"inputs": {"nope": [1]}}).apply(model, _ctx(model))
    with pytest.raises(InputError, match="static dim"):
        get_pass("fix-shapes")({"inputs": {"x": [1, 5, 8, 8]}}).apply(model, _ctx(model))


def test_every_registered_pass_imports_and_validates_its_options():
    for name in available():
        cls = get_pass(name)
        assert cls.name == name
        with pytest.raises(InputError, match="no_such_option: unknown option"):
            cls({"no_such_option": 1})
