"""Batching requests of different sequence lengths: padded on the right under an attention mask, cut back after."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import serving, triton_client
from onnx import TensorProto, helper, numpy_helper

pytest.importorskip("aiohttp")
httpclient = pytest.importorskip("tritonclient.http")
ort = pytest.importorskip("onnxruntime")

from onnxpipe.core.tensors import TensorInfo
from onnxpipe.serve.padding import PadPlan


def masked_encoder() -> onnx.ModelProto:
    """ids, mask [batch, seq] -> hidden [batch, seq, 8] (per token) and pooled [batch, 8] (masked mean)."""
    rng = np.random.default_rng(0)
    g = helper.make_graph(
        [helper.make_node("Gather", ["emb", "input_ids"], ["e"]),
         helper.make_node("Tanh", ["e"], ["hidden"]),
         helper.make_node("Cast", ["attention_mask"], ["mf"], to=TensorProto.FLOAT),
         helper.make_node("Unsqueeze", ["mf", "two"], ["m3"]),
         helper.make_node("Mul", ["e", "m3"], ["em"]),
         helper.make_node("ReduceSum", ["em", "one"], ["s"], keepdims=0),
         helper.make_node("ReduceSum", ["mf", "one"], ["n"], keepdims=1),
         helper.make_node("Div", ["s", "n"], ["pooled"])],
        "enc",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", "sequence", 8]),
         helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["batch", 8])],
        [numpy_helper.from_array(rng.standard_normal((50, 8)).astype(np.float32), "emb"),
         numpy_helper.from_array(np.array([1], np.int64), "one"), numpy_helper.from_array(np.array([2], np.int64), "two")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_pad_plan_only_where_a_mask_and_named_sequence_axes_make_it_safe():
    ids = TensorInfo("input_ids", ["b", "s"], np.dtype("int64"))
    mask = TensorInfo("attention_mask", ["b", "s"], np.dtype("int64"))
    plan = PadPlan.find([ids, mask], [TensorInfo("h", ["b", "s", 4], np.dtype("float32")),
                                      TensorInfo("p", ["b", 4], np.dtype("float32"))])
    assert plan.inputs == {"input_ids": 1, "attention_mask": 1} and plan.outputs == {"h": 1}
    assert PadPlan.find([ids], [TensorInfo("h", ["b", "s"], np.dtype("float32"))]) is None  # no mask
    assert PadPlan.find([ids, mask], [TensorInfo("h", None, np.dtype("float32"))]) is None  # unknown rank
    assert PadPlan.find([ids, mask, TensorInfo("bias", ["b", "s", "s"], np.dtype("float32"))], []) is None
    a = {"input_ids": np.array([[1, 2]]), "attention_mask": np.array([[1, 1]])}
    b = {"input_ids": np.array([[3, 4, 5]]), "attention_mask": np.array([[1, 1, 1]])}
    stacked = plan.stack([a, b])
    assert stacked["input_ids"].tolist() == [[1, 2, 0], [3, 4, 5]] and stacked["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]
    assert plan.cut({"h": np.zeros((1, 3, 4)), "p": np.zeros((1, 4))}, 2)["h"].shape == (1, 2, 4)


def test_requests_of_different_lengths_share_batches_and_get_their_own_answers(tmp_path):
    onnx.save(masked_encoder(), tmp_path / "enc.onnx")
    sess = ort.InferenceSession(str(tmp_path / "enc.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(4)
    lengths = [*range(2, 14), 40, 90]  # all different: without padding no two requests could share a batch
    rng.shuffle(lengths)
    feeds = [{"input_ids": rng.integers(1, 50, (1, n)).astype(np.int64), "attention_mask": np.ones((1, n), np.int64)}
             for n in lengths]
    with serving(tmp_path, "cpu[threads=1]", max_batch_size=16, max_queue_delay_ms=50) as (url, srv), \
            triton_client(url) as client:
        pending = []
        for f in feeds:
            inputs = []
            for name, arr in f.items():
                i = httpclient.InferInput(name, list(arr.shape), "INT64")
                i.set_data_from_numpy(arr)
                inputs.append(i)
            pending.append(client.async_infer("enc", inputs))
        for f, p in zip(feeds, pending):
            got = p.get_result(timeout=60)
            hidden, pooled = sess.run(["hidden", "pooled"], f)
            assert got.as_numpy("hidden").shape == hidden.shape
            np.testing.assert_allclose(got.as_numpy("hidden"), hidden, atol=1e-5, rtol=0)
            np.testing.assert_allclose(got.as_numpy("pooled"), pooled, atol=1e-5, rtol=0)
        h = srv.metrics.batch_requests
        assert h.total(model="enc") == len(feeds) and h.count(model="enc") < len(feeds), "nothing was padded together"


def test_padding_at_most_doubles_a_request(tmp_path):
    import asyncio

    from onnxpipe.serve.batcher import Batcher, _Request
    from onnxpipe.serve.repository import ModelEntry

    onnx.save(masked_encoder(), tmp_path / "enc.onnx")
    entry = ModelEntry.load(tmp_path / "enc.onnx", "enc")

    async def cut(lengths: list[int]) -> list[list[int]]:
        batcher = Batcher(entry, pool=None, max_batch_size=64)
        assert batcher.pad is not None
        for n in lengths:  # queued as infer() would, without awaiting the answers
            feeds = {"input_ids": np.ones((1, n), np.int64), "attention_mask": np.ones((1, n), np.int64)}
            key, length = batcher._key(feeds)
            batcher._queue.append(_Request(feeds, 1, key, asyncio.get_running_loop().create_future(), length=length))
        groups = []
        while batcher._queue:
            groups.append([r.length for r in batcher._cut()])
        return groups

    # 16 tokens or fewer always share; longer ones only with those at least half as long
    assert asyncio.run(cut([3, 16, 9, 40, 90, 60, 21])) == [[3, 16, 9], [40, 60], [90], [21]]
