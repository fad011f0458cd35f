"""Existing .onnx models: checked, shape-inferred, opset-converted, large ones with external data."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import conv_gemm_model, run_cli

from onnxpipe.converter import convert
from onnxpipe.core.errors import InputError
from onnxpipe.core.graph import default_opset
from onnxpipe.core.modelio import load_model, save_model
from onnxpipe.core.session import run_model


def test_onnx_source_is_checked_and_shape_inferred(conv_gemm_path, tmp_path):
    out = tmp_path / "out.onnx"
    result = convert(conv_gemm_path, out)
    assert result.framework == "onnx" and result.check.ok
    model = onnx.load(out)
    assert {v.name for v in model.graph.value_info} >= {"c", "r", "f"}  # shapes inferred
    # the check ran a second batch size through the symbolic first axis
    assert {r.batch for r in result.check.runs} == {1, 3}


def test_onnx_opset_conversion_keeps_outputs(conv_gemm_path, tmp_path):
    result = convert(conv_gemm_path, tmp_path / "o19.onnx", opset=19)
    assert default_opset(onnx.load(tmp_path / "o19.onnx")) == 19
    assert result.check.ok
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run_model(tmp_path / "o19.onnx", {"x": x})["y"],
                               run_model(conv_gemm_path, {"x": x})["y"], rtol=1e-5, atol=1e-5)


def test_external_data_is_written_and_loads_again(tmp_path):
    model = conv_gemm_model()
    path = save_model(model, tmp_path / "big.onnx", threshold=1024)  # pretend 1 KiB is protobuf's limit
    assert (tmp_path / "big.onnx.data").exists()
    assert path.stat().st_size < 2048  # the weights are no longer inside the .onnx
    loaded = load_model(path)
    x = np.ones((1, 3, 8, 8), np.float32)
    np.testing.assert_allclose(run_model(loaded, {"x": x})["y"], run_model(model, {"x": x})["y"], rtol=1e-6)
    result = convert(path, tmp_path / "again.onnx", external_data_threshold=1024)
    assert result.check.ok and (tmp_path / "again.onnx.data").exists()


def test_save_leaves_no_temp_files(tmp_path):
    save_model(conv_gemm_model(), tmp_path / "m.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_input_spec_for_unknown_name_is_an_error(conv_gemm_path, tmp_path):
    with pytest.raises(InputError, match="not inputs of the model"):
        convert(conv_gemm_path, tmp_path / "o.onnx", inputs=["nope:1x3x8x8"])


def test_cli_convert_onnx_json(conv_gemm_path, tmp_path):
    proc = run_cli("convert", str(conv_gemm_path), "-o", str(tmp_path / "o.onnx"), "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["check"]["ok"] and doc["framework"] == "onnx"
    assert [o["name"] for o in doc["check"]["outputs"]] == ["y"]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_onnx_is_a_clear_error(conv_gemm_path, tmp_path, damage):
    bad = tmp_path / "bad.onnx"
    data = conv_gemm_path.read_bytes()
    bad.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x00\xffnot onnx" * 10, "empty": b""}[damage])
    out = tmp_path / "out.onnx"
    proc = run_cli("convert", str(bad), "-o", str(out))
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx", "conv_gemm.onnx"]  # nothing half-written


def test_static_batch_fixes_a_symbolic_batch(conv_gemm_path, tmp_path):
    result = convert(conv_gemm_path, tmp_path / "s.onnx", dynamic_batch=False, inputs=["x:4x3x8x8"])
    model = onnx.load(tmp_path / "s.onnx")
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 4
    assert result.check.ok and {r.batch for r in result.check.runs} == {4}
