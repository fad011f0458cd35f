"""Model files that can run code are refused without --trust, and leave no trace: an evil .pt2 whose
pickle would write a marker file, a pickled module, a SavedModel whose graph writes a file."""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import pytest
from conftest import run_cli


class _Payload:
    """Unpickling this writes the marker file: what an attacker's pickle would do (or worse)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def evil_pt2(tmp: Path, marker: Path) -> Path:
    """A real torch.export archive whose bias is stored as a pickle carrying the payload."""
    torch = pytest.importorskip("torch")

    class M(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.lin(x)

    good = tmp / "good.pt2"
    batch = torch.export.Dim("batch", min=1, max=1024)
    torch.export.save(torch.export.export(M(), (torch.randn(2, 4),), dynamic_shapes={"x": {0: batch}}), str(good))
    evil = tmp / "evil.pt2"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(evil, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename.endswith("model_weights_config.json"):
                cfg = json.loads(data)
                cfg["config"]["lin.bias"]["use_pickle"] = True
                data = json.dumps(cfg).encode()
            elif item.filename.endswith("weights/weight_1"):
                data = pickle.dumps(_Payload(str(marker)))
            dst.writestr(item, data)
    return evil


def test_evil_pt2_is_refused_without_trust_and_leaves_no_trace(tmp_path):
    marker = tmp_path / "pwned.txt"
    evil = evil_pt2(tmp_path, marker)
    r = run_cli("convert", str(evil), "-o", str(tmp_path / "out" / "m.onnx"), cwd=tmp_path)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("W")]
    assert r.returncode == 2, r.stderr
    assert lines[-1].startswith("error: ") and "evil.pt2" in lines[-1] and "--trust" in lines[-1], r.stderr
    assert "Traceback" not in r.stderr
    assert not marker.exists(), "the pickle payload ran"
    assert not (tmp_path / "out").exists()


def test_a_plain_pt2_still_converts_without_trust(tmp_path):
    from onnxpipe.converter import convert

    marker = tmp_path / "unused.txt"
    evil_pt2(tmp_path, marker)
    result = convert(tmp_path / "good.pt2", tmp_path / "good.onnx")
    assert result.check.ok and (tmp_path / "good.onnx").is_file()


def test_pickled_module_needs_trust_and_a_state_dict_is_not_a_model(tmp_path):
    torch = pytest.importorskip("torch")
    from onnxpipe.converter import convert
    from onnxpipe.core.errors import InputError

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
    torch.save(model, tmp_path / "whole.pt")
    torch.save(model.state_dict(), tmp_path / "weights.pth")
    with pytest.raises(InputError, match="--trust"):
        convert(tmp_path / "whole.pt", tmp_path / "a.onnx", inputs=["x:1x4:float32"])
    with pytest.raises(InputError, match="state_dict"):
        convert(tmp_path / "weights.pth", tmp_path / "b.onnx", inputs=["x:1x4:float32"])
    assert not (tmp_path / "a.onnx").exists() and not (tmp_path / "b.onnx").exists()
    result = convert(tmp_path / "whole.pt", tmp_path / "c.onnx", inputs=["x:1x4:float32"], trust=True)
    assert result.check.ok


def test_savedmodel_with_file_ops_is_refused_without_trust(tmp_path):
    tf = pytest.importorskip("tensorflow")
    from onnxpipe.converter import convert
    from onnxpipe.converter.tensorflow import risky_ops
    from onnxpipe.core.errors import InputError

    marker = tmp_path / "written.txt"

    class Evil(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32)])
        def serve(self, x):
            tf.io.write_file(str(marker), tf.strings.as_string(tf.reduce_sum(x)))
            return {"y": x * 2.0}

    m = Evil()
    tf.saved_model.save(m, str(tmp_path / "sm"), signatures={"serving_default": m.serve})
    assert not marker.exists()
    assert any(op.startswith("WriteFile") for op in risky_ops(tmp_path / "sm"))
    with pytest.raises(InputError, match="WriteFile") as err:
        convert(tmp_path / "sm", tmp_path / "out" / "m.onnx")
    assert "--trust" in str(err.value)
    assert not marker.exists() and not (tmp_path / "out").exists()
