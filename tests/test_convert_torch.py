"""PyTorch sources: factories (tuple, dict, several outputs), TorchScript, torch.export, fallbacks."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

from conftest import run_cli, write_factory  # noqa: E402

from onnxpipe.converter import convert, pytorch  # noqa: E402
from onnxpipe.core.errors import CheckFailedError, ConversionError, InputError  # noqa: E402
from onnxpipe.core.session import run_model  # noqa: E402

TWO_INPUTS = """
import torch

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.head = torch.nn.Linear(4 * 8 * 8, 10)

    def forward(self, image, extra):
        h = torch.relu(self.bn(self.conv(image))).flatten(1)
        return {"logits": self.head(h), "score": h.mean(1) + extra.sum(1)}

def build():
    return Net(), (torch.randn(1, 1, 8, 8), torch.randn(1, 3))

def build_kwargs():
    return Net(), {"image": torch.randn(2, 1, 8, 8), "extra": torch.randn(2, 3)}

def build_numpy():
    import numpy as np
    return Net(), (np.random.rand(2, 1, 8, 8).astype("float32"), np.random.rand(2, 3).astype("float32"))
"""


@pytest.mark.parametrize("factory", ["build", "build_kwargs", "build_numpy"])
def test_factory_with_several_inputs_and_outputs(tmp_path, factory):
    path = write_factory(tmp_path, TWO_INPUTS)
    result = convert(f"{path}:{factory}", tmp_path / "m.onnx")
    assert result.check.ok
    assert result.exporter == "torch.onnx.export (dynamo)"
    model = onnx.load(tmp_path / "m.onnx")
    assert [i.name for i in model.graph.input] == ["image", "extra"]
    assert [o.name for o in model.graph.output] == ["logits", "score"]
    # the first axis is symbolic: batches of 1 and 5 both run
    for b in (1, 5):
        out = run_model(tmp_path / "m.onnx", {"image": np.zeros((b, 1, 8, 8), np.float32),
                                              "extra": np.zeros((b, 3), np.float32)})
        assert out["logits"].shape == (b, 10) and out["score"].shape == (b,)


def test_static_batch_keeps_the_example_batch(tmp_path):
    path = write_factory(tmp_path, TWO_INPUTS)
    result = convert(f"{path}:build_kwargs", tmp_path / "m.onnx", dynamic_batch=False)
    dim = onnx.load(tmp_path / "m.onnx").graph.input[0].type.tensor_type.shape.dim[0]
    assert dim.dim_value == 2
    assert {r.batch for r in result.check.runs} == {2}


def test_dynamo_failure_falls_back_to_torchscript_and_says_why(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("dynamo cannot trace this")

    monkeypatch.setattr(pytorch, "EXPORTERS", [("dynamo", broken), ("torchscript", pytorch.export_torchscript)])
    path = write_factory(tmp_path, TWO_INPUTS)
    result = convert(f"{path}:build", tmp_path / "m.onnx")
    assert result.exporter == "torch.onnx.export (torchscript)"
    assert [a.strategy for a in result.attempts] == ["dynamo", "torchscript"]
    assert "dynamo cannot trace this" in result.attempts[0].error
    assert result.check.ok and {r.batch for r in result.check.runs} == {1, 3}


def test_every_exporter_failing_is_one_error(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("nope")

    monkeypatch.setattr(pytorch, "EXPORTERS", [("dynamo", broken), ("torchscript", broken)])
    path = write_factory(tmp_path, TWO_INPUTS)
    with pytest.raises(ConversionError, match="dynamo: RuntimeError: nope; torchscript: RuntimeError: nope"):
        convert(f"{path}:build", tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_torchscript_archive_needs_and_uses_input_specs(tmp_path):
    class Net(torch.nn.Module):
        def forward(self, x):
            return torch.tanh(x) * 2 + x.sum(dim=1, keepdim=True)

    archive = tmp_path / "net.pt"
    torch.jit.save(torch.jit.script(Net()), str(archive))
    with pytest.raises(InputError, match="--input"):
        convert(archive, tmp_path / "m.onnx")
    result = convert(archive, tmp_path / "m.onnx", inputs=["x:2x5:float32"])
    assert result.kind == "torchscript" and result.check.ok
    assert onnx.load(tmp_path / "m.onnx").graph.input[0].name == "x"


def test_torch_export_archive(tmp_path):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(6, 3)

        def forward(self, x):
            return torch.nn.functional.gelu(self.lin(x))

    ep = torch.export.export(Net().eval(), (torch.randn(4, 6),),
                             dynamic_shapes=({0: torch.export.Dim("batch")},))
    archive = tmp_path / "net.pt2"
    torch.export.save(ep, str(archive))
    result = convert(archive, tmp_path / "m.onnx")
    assert result.kind == "torch.export" and result.check.ok
    assert {r.batch for r in result.check.runs} == {4, 6}


def test_integer_inputs_stay_in_range(tmp_path):
    path = write_factory(tmp_path, """
        import torch
        class Emb(torch.nn.Module):
            def __init__(self):
                super().__init__()
                torch.manual_seed(0)
                self.emb = torch.nn.Embedding(11, 4)
            def forward(self, tokens):
                return self.emb(tokens).mean(1)
        def build():
            return Emb(), (torch.randint(0, 11, (3, 7)),)
    """)
    result = convert(f"{path}:build", tmp_path / "m.onnx")
    assert result.check.ok  # random batches drew token ids inside the embedding table


def test_failing_check_exits_1_and_keeps_the_model(tmp_path):
    # the exported graph freezes the call counter; the framework keeps counting, so outputs differ
    path = write_factory(tmp_path, """
        import torch
        class Drifting(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.calls = 0
            def forward(self, x):
                self.calls += 1
                return x * float(self.calls)
        def build():
            return Drifting(), (torch.ones(2, 3),)
    """)
    out = tmp_path / "m.onnx"
    with pytest.raises(CheckFailedError, match="kept at"):
        convert(f"{path}:build", out)
    assert out.exists()
    proc = run_cli("convert", f"{path}:build", "-o", str(tmp_path / "cli.onnx"))
    assert proc.returncode == 1
    assert "FAIL" in proc.stdout and "error: ONNX outputs differ" in proc.stderr
    assert (tmp_path / "cli.onnx").exists()


@pytest.mark.parametrize("source, message", [
    ("missing.py:build", "no such file"),
    ("{factory}:nothere", "has no factory named 'nothere'"),
    ("{factory}:broken", "factory {factory}:broken raised ZeroDivisionError"),
    ("{factory}:not_a_pair", "expected (model, example_inputs)"),
    ("{factory}:not_a_model", "not a torch.nn.Module"),
    ("{factory}", "names a Python file but no factory"),
])
def test_bad_factories_are_one_line_errors(tmp_path, source, message):
    path = write_factory(tmp_path, """
        def broken():
            return 1 / 0
        def not_a_pair():
            return 3
        def not_a_model():
            return object(), ()
    """)
    source = source.format(factory=path)
    proc = run_cli("convert", source, "-o", str(tmp_path / "m.onnx"))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and message.format(factory=path) in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "m.onnx").exists()


def test_debug_shows_the_traceback(tmp_path):
    path = write_factory(tmp_path, "def broken():\n    return 1 / 0\n")
    proc = run_cli("--debug", "convert", f"{path}:broken", "-o", str(tmp_path / "m.onnx"))
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "ZeroDivisionError" in proc.stderr
