"""The prune pass on the zoo's trained digits CNN: the issue's size and accuracy outcomes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from onnxpipe.pipeline import optimize

ROOT = Path(__file__).resolve().parent.parent


def _data():
    spec = importlib.util.spec_from_file_location("digits_cnn_data_for_prune", ROOT / "models/digits_cnn/data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_digits_cnn_at_ratio_03_loses_40_percent_and_keeps_its_accuracy(tmp_path):
    pytest.importorskip("torch")
    from onnxpipe.converter import convert

    model = convert(str(ROOT / "models/digits_cnn/model.py:build"), tmp_path / "digits.onnx").model
    data = _data()
    calibration, evaluation = data.calibration(), data.evaluation()
    # exact channel counts (round_to 1): the CPU's default multiple (8 or 16) would leave 16-channel layers whole
    result = optimize(model, [{"prune": {"ratio": 0.3, "reconstruct": True, "round_to": 1}}], calibration=lambda: iter(calibration),
                      evaluation=evaluation, metric="top1", measure_latency=False)
    base, pruned = result.stages
    assert pruned.kept, pruned.reason
    totals = pruned.notes["totals"]
    assert totals["params_after"] <= 0.6 * totals["params_before"]
    assert totals["macs_after"] <= 0.6 * totals["macs_before"]
    recon = pruned.notes["reconstruct"]
    assert recon["metric_before"] < base.metric - 0.05  # pruning alone hurts ...
    assert pruned.metric == recon["metric_after"] >= base.metric - 0.02  # ... the refit brings it back
