"""Converting a decoder folder in bounded memory: the large-model path, forced on a tiny model.

A decoder over the external-data threshold is exported with its weights left in the exporter's
files, streamed into the output, and checked by ONNX Runtime after the torch model is freed
(benchmarks/memory_convert.py measures the memory on a 2.6 GB folder). A threshold of one byte
sends a model of a few hundred kB down the same path, so it can be compared with the usual one.
"""

from __future__ import annotations

import gc
import weakref

import hf_tiny
import numpy as np
import onnx
import pytest

pytest.importorskip("transformers")


def _feeds(model: onnx.ModelProto, batch: int = 2, prompt: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    ids = rng.integers(0, hf_tiny.VOCAB, size=(batch, prompt), dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids),
             "position_ids": np.broadcast_to(np.arange(prompt, dtype=np.int64), ids.shape).copy()}
    for inp in model.graph.input[3:]:
        heads, size = (d.dim_value for d in inp.type.tensor_type.shape.dim[1::2])
        feeds[inp.name] = np.zeros((batch, heads, 0, size), np.float32)
    return feeds


def _run(path) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    model = onnx.load(str(path))  # with its external data, as any ONNX tool loads it
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, _feeds(model))))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return hf_tiny.decoder("llama", tmp_path_factory.mktemp("hf") / "llama", with_tokenizer=False)


def test_large_model_path_writes_external_data_with_the_same_outputs(llama, tmp_path, monkeypatch):
    from onnxpipe.converter import hf_common, hf_decoder
    from onnxpipe.converter.huggingface import convert_folder
    from onnxpipe.core import external

    usual = convert_folder(llama, tmp_path / "usual")
    assert not (tmp_path / "usual" / "model.onnx.data").exists()

    loaded: list[weakref.ref] = []
    freed_before_check: list[bool] = []
    real_load, real_check = hf_common.load_pretrained, hf_decoder.check_onnx

    def load(*args, **kwargs):
        model = real_load(*args, **kwargs)
        loaded.append(weakref.ref(model))
        return model

    def check(*args, **kwargs):
        gc.collect()
        freed_before_check.append(loaded[-1]() is None)
        return real_check(*args, **kwargs)

    monkeypatch.setattr(hf_decoder, "load_pretrained", load)
    monkeypatch.setattr(hf_decoder, "check_onnx", check)
    bounded = convert_folder(llama, tmp_path / "bounded", external_data_threshold=1)
    assert freed_before_check == [True]  # ONNX Runtime ran after the torch model was gone

    out = tmp_path / "bounded"
    assert (out / "model.onnx.data").stat().st_size > 100_000 > (out / "model.onnx").stat().st_size
    header = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert external.has_external_refs(header)
    assert bounded.check.ok, bounded.check.as_dict()
    assert [r.label for r in bounded.check.runs] == [r.label for r in usual.check.runs]
    for a, b in zip(bounded.check.worst(), usual.check.worst()):
        assert a.max_abs == pytest.approx(b.max_abs, abs=1e-6)
    assert max(c.max_abs for c in bounded.check.worst()) < 1e-4

    # the same graph and weights, and the same outputs from a plain onnxruntime session
    full = onnx.load(str(out / "model.onnx"))
    same = onnx.load(str(tmp_path / "usual" / "model.onnx"))
    assert [(n.op_type, list(n.input)) for n in full.graph.node] == [(n.op_type, list(n.input)) for n in same.graph.node]
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in same.graph.initializer}
    for t in full.graph.initializer:
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(t), weights[t.name])
    got, want = _run(out / "model.onnx"), _run(tmp_path / "usual" / "model.onnx")
    assert list(got) == list(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=1e-6, rtol=0, err_msg=name)

    # the model in the result reads its weights from the written folder
    assert external.has_external_refs(bounded.model)
    assert {external.source_file(t).parent for t in external.initializers(bounded.model)
            if external.is_external(t)} == {out.resolve()}


def test_large_model_path_without_output_keeps_a_usable_model(llama):
    from onnxpipe.converter.huggingface import convert_folder
    from onnxpipe.core import external
    from onnxpipe.core.session import Session

    result = convert_folder(llama, None, external_data_threshold=1)
    assert result.path is None and result.check.ok
    assert external.has_external_refs(result.model)
    with Session(result.model) as session:
        got = session.run(_feeds(result.model))
    assert got["logits"].shape == (2, 5, hf_tiny.VOCAB) and np.isfinite(got["logits"]).all()


def test_single_file_task_takes_the_large_model_path_too(tmp_path, monkeypatch):
    import onnxruntime as ort
    import torch
    import transformers as tf

    from onnxpipe.converter import check as check_mod
    from onnxpipe.converter import huggingface
    from onnxpipe.core import external

    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_labels=3)
    tf.BertForSequenceClassification(cfg).eval().save_pretrained(str(tmp_path / "bert"))
    usual = huggingface.convert_folder(tmp_path / "bert", tmp_path / "usual.onnx")

    loaded: list[weakref.ref] = []
    freed_before_check: list[bool] = []
    real_load, real_compare = huggingface.load_pretrained, check_mod.compare_outputs

    def load(*args, **kwargs):
        model = real_load(*args, **kwargs)
        loaded.append(weakref.ref(model))
        return model

    def compare(*args, **kwargs):
        gc.collect()
        freed_before_check.append(loaded[-1]() is None)
        return real_compare(*args, **kwargs)

    monkeypatch.setattr(huggingface, "load_pretrained", load)
    monkeypatch.setattr(check_mod, "compare_outputs", compare)
    bounded = huggingface.convert_folder(tmp_path / "bert", tmp_path / "bounded.onnx", external_data_threshold=1)
    assert freed_before_check == [True]
    assert bounded.files == ["bounded.onnx", "bounded.onnx.data"] and usual.files == ["usual.onnx"]
    assert external.has_external_refs(onnx.load(str(tmp_path / "bounded.onnx"), load_external_data=False))
    assert bounded.check.ok and [r.label for r in bounded.check.runs] == [r.label for r in usual.check.runs]
    for a, b in zip(bounded.check.worst(), usual.check.worst()):
        assert a.max_abs == pytest.approx(b.max_abs, abs=1e-6)
    ids = np.array([[5, 7, 9, 11]] * 3, np.int64)
    outs = []
    for name in ("bounded.onnx", "usual.onnx"):
        sess = ort.InferenceSession(str(tmp_path / name), providers=["CPUExecutionProvider"])
        feeds = {i.name: (ids if i.name == "input_ids" else np.ones_like(ids) if i.name == "attention_mask"
                          else np.zeros_like(ids)) for i in sess.get_inputs()}
        outs.append(sess.run(None, feeds)[0])
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-6, rtol=0)
