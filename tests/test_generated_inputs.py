"""Generated check inputs follow the graph: token ids inside their tables, masks 0/1, one-line errors."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxpipe.core.compare import outputs_on
from onnxpipe.core.errors import InputError
from onnxpipe.core.inputs import example_inputs, input_hints
from onnxpipe.pipeline import optimize


def encoder_model() -> onnx.ModelProto:
    """A BERT-like embedding block: ids into 3 tables (100, 2 and 16 rows), a mask multiplied in.

    ``position_ids`` is shifted by 2 before its Gather (as RoBERTa's padding offset does), so
    only 0..13 stay inside the 16-row table; ``token_type_ids`` is cast twice first.
    """
    model = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    enc (int64[batch, seq] input_ids, int64[batch, seq] attention_mask, int64[batch, seq] token_type_ids,
         int64[batch, seq] position_ids) => (float[batch, seq, 4] y) {
        two = Constant <value = int64[1] {2}> ()
        we = Gather (words, input_ids)
        t32 = Cast <to = 6> (token_type_ids)
        t64 = Cast <to = 7> (t32)
        te = Gather (types, t64)
        shifted = Add (position_ids, two)
        pe = Gather (positions, shifted)
        s1 = Add (we, te)
        s2 = Add (s1, pe)
        m = Cast <to = 1> (attention_mask)
        mu = Unsqueeze (m, axes)
        y = Mul (s2, mu)
    }
    """)
    rng = np.random.default_rng(0)
    model.graph.initializer.extend([
        onnx.numpy_helper.from_array(rng.standard_normal((100, 4)).astype(np.float32), "words"),
        onnx.numpy_helper.from_array(rng.standard_normal((2, 4)).astype(np.float32), "types"),
        onnx.numpy_helper.from_array(rng.standard_normal((16, 4)).astype(np.float32), "positions"),
        onnx.numpy_helper.from_array(np.array([-1], dtype=np.int64), "axes")])
    onnx.checker.check_model(model, full_check=True)
    return model


def test_hints_read_the_tables_each_input_indexes():
    hints = input_hints(encoder_model())
    assert (hints["input_ids"].kind, hints["input_ids"].low, hints["input_ids"].high) == ("index", 0, 99)
    assert (hints["token_type_ids"].low, hints["token_type_ids"].high) == (0, 1)  # through two Casts
    assert (hints["position_ids"].low, hints["position_ids"].high) == (0, 13)  # 16 rows, shifted by 2
    assert hints["attention_mask"].kind == "mask"


def test_generated_inputs_run_and_stay_in_range():
    model = encoder_model()
    for seed in range(5):
        feeds = example_inputs(model, batch=3, seed=seed)
        assert feeds["input_ids"].shape == (3, 8)  # a symbolic sequence length gets 8, not 1
        assert feeds["token_type_ids"].max() <= 1 and feeds["position_ids"].max() <= 13
        mask = feeds["attention_mask"]
        assert set(np.unique(mask)) <= {0, 1} and (mask[:, 0] == 1).all()  # padding-like, never empty
        outputs_on(model, [feeds])  # no index out of range


def unfeedable_model() -> onnx.ModelProto:
    """ids reach a 1-row table through an op no rule follows (a power of a run-time value)."""
    model = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (int64[N] ids, int64[N] k) => (float[N, 4] y) {
        z = Pow (ids, k)
        y = Gather (table, z)
    }
    """)
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.ones((1, 4), np.float32), "table"))
    return model


def test_a_model_generated_inputs_cannot_feed_asks_for_data():
    model = unfeedable_model()
    with pytest.raises(InputError) as err:
        optimize(model, ["simplify"], measure_latency=False)
    assert "ids" in err.value.message and "data" in str(err.value.hint)


@pytest.mark.parametrize("command", [["optimize", "-o", "{out}", "--pass", "simplify"],
                                     ["bench", "--providers", "cpu", "--batch-sizes", "1"]])
def test_commands_say_one_line_when_the_model_cannot_run(tmp_path, command):
    from tests.conftest import run_cli

    path = tmp_path / "m.onnx"
    onnx.save(unfeedable_model(), str(path))
    proc = run_cli(command[0], str(path), *[c.format(out=tmp_path / "o.onnx") for c in command[1:]])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-1500:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("error:") and ("data" in lines[-1])
