"""Passes on a model whose weights stay on disk: the same results as in memory, the weights never all read."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import pytest
from conftest import run_cli
from onnx import numpy_helper

import onnxpipe
from onnxpipe.core import external, skeleton
from onnxpipe.core.modelio import load_model, save_model
from onnxpipe.core.session import run_model
from onnxpipe.passes.base import Pass, PassContext, PassResult
from onnxpipe.passes.quant_weight_only import WeightOnlyQuantize

D = 128  # each weight 128 x 128 float32 = 64 KiB: big enough to stay out of the simplifier's skeleton
V = 300  # embedding rows


def llm_like_model(branch: bool = True) -> onnx.ModelProto:
    """ids -> Gather(table) -> MatMul chain with Tanh, an Identity copy, a Reshape whose shape is computed
    (Shape -> Gather -> Concat: for the simplifier to fold), a MatMul reusing the first weight (tied) and
    one excluded later, and an If whose branches read a weight (a subgraph)."""
    rng = np.random.default_rng(0)

    def w(name: str, shape: tuple[int, ...]) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32), name)

    inits = [w("table", (V, D)), w("w0", (D, D)), w("w1", (D, D)), w("w2", (D, D)),
             numpy_helper.from_array(np.array([-1], np.int64), "minus1"),
             numpy_helper.from_array(np.array([0], np.int64), "zero"),
             numpy_helper.from_array(np.array(True), "flag")]
    branch_w = w("wb", (D, D))
    then = oh.make_graph([oh.make_node("MatMul", ["h2", "wb"], ["br"], name="branch_mm")], "then", [],
                         [oh.make_tensor_value_info("br", onnx.TensorProto.FLOAT, None)], [branch_w])
    other = oh.make_graph([oh.make_node("Identity", ["h2"], ["br2"])], "else", [],
                          [oh.make_tensor_value_info("br2", onnx.TensorProto.FLOAT, None)])
    nodes = [
        oh.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
        oh.make_node("MatMul", ["e", "w0"], ["m0"], name="mm0"), oh.make_node("Tanh", ["m0"], ["h0"]),
        oh.make_node("Identity", ["h0"], ["h0c"]),
        oh.make_node("MatMul", ["h0c", "w1"], ["m1"], name="mm1"), oh.make_node("Tanh", ["m1"], ["h1"]),
        oh.make_node("MatMul", ["h1", "w0"], ["m2"], name="mm_tied"), oh.make_node("Tanh", ["m2"], ["h2"]),
        oh.make_node("If", ["flag"], ["hb"], then_branch=then, else_branch=other, name="branch") if branch
        else oh.make_node("Identity", ["h2"], ["hb"], name="branch"),
        oh.make_node("MatMul", ["hb", "w2"], ["m3"], name="mm_last"),
        oh.make_node("Shape", ["m3"], ["s"]), oh.make_node("Gather", ["s", "zero"], ["s0"], axis=0),
        oh.make_node("Concat", ["s0", "minus1"], ["shape"], axis=0),
        oh.make_node("Reshape", ["m3", "shape"], ["logits"]),
    ]
    graph = oh.make_graph(nodes, "llm_like", [oh.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["B", 5])],
                          [oh.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["B", None])], inits)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])


@pytest.fixture
def on_disk(tmp_path):
    return save_model(llm_like_model(), tmp_path / "src" / "model.onnx", external_data=True)


@pytest.fixture
def flat_on_disk(tmp_path):
    """The model without its If: every MatMul in the top graph (a weight-only quantizer's by-weight path)."""
    return save_model(llm_like_model(branch=False), tmp_path / "flat" / "model.onnx", external_data=True)


def ids(batch: int = 2) -> dict[str, np.ndarray]:
    return {"ids": np.random.default_rng(1).integers(0, V, (batch, 5)).astype(np.int64)}


PASSES = ["simplify", {"quantize": {"mode": "int4", "exclude_nodes": ["mm_last"], "quantize_embeddings": True}}, "strip"]


def test_optimize_on_disk_gives_the_in_memory_result_without_reading_the_weights(on_disk, monkeypatch):
    in_memory = onnxpipe.optimize(load_model(on_disk), PASSES, check_inputs=[ids()], measure_latency=False)

    def refuse(model):
        raise AssertionError("a lazy pass read every weight into memory")

    monkeypatch.setattr(external, "materialize", refuse)
    lazy = onnxpipe.optimize(on_disk, PASSES, check_inputs=[ids()], measure_latency=False)
    assert [(s.name, s.kept, s.reason) for s in lazy.stages] == [(s.name, s.kept, s.reason) for s in in_memory.stages]
    assert all(s.kept for s in lazy.stages), [s.reason for s in lazy.stages]
    assert [s.nodes for s in lazy.stages] == [s.nodes for s in in_memory.stages]
    simplify = lazy.stages[1]
    assert simplify.nodes < lazy.stages[0].nodes and simplify.notes["weights_kept_out"] >= 4
    ops = {n.op_type for n in lazy.model.graph.node}
    assert {"MatMulNBits", "GatherBlockQuantized"} <= ops and "Identity" not in ops
    # the same numbers: every weight quantized on its own equals the whole-model quantizer's result
    np.testing.assert_allclose(run_model(lazy.model, ids(3))["logits"], run_model(in_memory.model, ids(3))["logits"],
                               rtol=0, atol=1e-6)
    # the weights stay on disk: the model in memory is a header, the blocks the pass made were moved out
    assert external.lazy_bytes(lazy.model) > 0 and lazy.model.ByteSize() < 20_000
    assert lazy.stages[2].size_bytes == pytest.approx(in_memory.stages[2].size_bytes, rel=0.05)
    # the excluded MatMul still reads its float weight (w2); the tied w0 went once both its readers were quantized
    floats = [t for t in lazy.model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and list(t.dims) == [D, D]]
    assert len(floats) == 1 and external.is_external(floats[0])
    assert sum(n.op_type == "MatMul" for n in lazy.model.graph.node) == 1


def test_fp16_on_disk_converts_weight_by_weight_to_the_in_memory_result(on_disk, monkeypatch):
    ref = onnxpipe.optimize(load_model(on_disk), ["fp16"], check_inputs=[ids()], measure_latency=False)
    monkeypatch.setattr(external, "materialize", lambda model: pytest.fail("fp16 read every weight into memory"))
    got = onnxpipe.optimize(on_disk, ["fp16"], check_inputs=[ids()], measure_latency=False)
    assert got.stages[1].kept and got.stages[1].notes["weights_converted_one_by_one"] == 4
    a = {t.name: external.tensor_array(t) for t in ref.model.graph.initializer}
    b = {t.name: external.tensor_array(t) for t in got.model.graph.initializer}
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name
    assert external.lazy_bytes(got.model) >= 4 * D * D * 2  # the float16 weights are on disk, not in memory


class Halve(Pass):
    """A pass that needs every weight's bytes (not lazy): it halves the float weights."""

    name = "halve"
    atol = 10.0

    def apply(self, model, ctx):
        out = onnx.ModelProto()
        out.CopyFrom(model)
        for t in out.graph.initializer:
            if t.data_type == onnx.TensorProto.FLOAT:
                t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) / 2, t.name))
        return PassResult(out)


def test_a_pass_that_needs_the_bytes_gets_them_and_its_weights_go_back_to_disk(on_disk):
    lines = []
    spec = [Halve()]
    ref = onnxpipe.optimize(load_model(on_disk), spec, check_inputs=[ids()], measure_latency=False)
    got = onnxpipe.optimize(on_disk, spec, check_inputs=[ids()], measure_latency=False,
                            on_event=lambda message, stage: lines.append(message))
    assert got.stages[1].kept and ref.stages[1].kept
    assert any("reading" in line and "into memory" in line for line in lines)
    np.testing.assert_array_equal(run_model(got.model, ids())["logits"], run_model(ref.model, ids())["logits"])
    assert external.has_external_refs(got.model)  # the weights were moved out of memory after the pass
    assert got.model.ByteSize() < 20_000


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_int8_on_disk_streams_through_onnx_runtime_to_the_in_memory_result(on_disk, monkeypatch, mode):
    spec = [{"quantize": {"mode": mode}}]
    data = [ids(4), ids(3)]
    ref = onnxpipe.optimize(load_model(on_disk), spec, check_inputs=data, calibration=lambda: iter(data),
                            measure_latency=False)
    monkeypatch.setattr(external, "materialize", lambda model: pytest.fail("int8 read every weight into memory"))
    got = onnxpipe.optimize(on_disk, spec, check_inputs=data, calibration=lambda: iter(data), measure_latency=False)
    assert got.stages[1].kept and ref.stages[1].kept, got.stages[1].reason
    assert got.stages[1].notes["nodes_quantized"] == ref.stages[1].notes["nodes_quantized"] > 0
    np.testing.assert_allclose(run_model(got.model, ids())["logits"], run_model(ref.model, ids())["logits"],
                               rtol=0, atol=1e-6)
    assert sorted(n.op_type for n in got.model.graph.node) == sorted(n.op_type for n in ref.model.graph.node)
    a = {t.name: external.tensor_array(t) for t in got.model.graph.initializer}
    b = {t.name: external.tensor_array(t) for t in ref.model.graph.initializer}
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert external.lazy_bytes(got.model) > 0 and got.model.ByteSize() < 30_000
    for t in got.model.graph.initializer:  # every data file it reads outlives the pass's work folder
        if external.is_external(t):
            assert external.source_file(t).parent == external.spill_folder()


def test_quantize_by_weight_equals_the_whole_model_quantizer_for_hqq_too(flat_on_disk, monkeypatch):
    on_disk = flat_on_disk
    monkeypatch.setattr(external, "materialize", lambda model: pytest.fail("int4 read every weight into memory"))
    for algorithm in ("rtn", "hqq"):
        cfg = {"mode": "int4", "algorithm": algorithm}
        whole = WeightOnlyQuantize(cfg).apply(load_model(on_disk), PassContext(check_inputs=[ids()])).model
        lazy = WeightOnlyQuantize(cfg).apply(load_model(on_disk, load_external_data=False),
                                             PassContext(check_inputs=[ids()])).model
        assert sorted(n.op_type for n in lazy.graph.node) == sorted(n.op_type for n in whole.graph.node)
        a = {t.name: external.tensor_array(t) for t in lazy.graph.initializer}
        b = {t.name: numpy_helper.to_array(t) for t in whole.graph.initializer}
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_array_equal(a[name], b[name], err_msg=f"{algorithm}: {name}")


def test_hollow_and_fill_give_back_the_weights_the_graph_still_reads(on_disk):
    lazy = load_model(on_disk, load_external_data=False)
    bare, taken = skeleton.hollow(lazy)
    assert {"table", "w0", "w1", "w2"} <= set(taken) and "minus1" not in taken
    # top-level weights are out; the If branch's weight is read in (tools need subgraphs whole)
    assert bare.ByteSize() < D * D * 4 + 20_000 and not external.has_external_refs(bare)
    assert {i.name for i in bare.graph.input} >= {"table", "w0", "w1", "w2"}
    bare.graph.node[4].input[1] = "w0"  # a tool rewired mm1 to w0: w1 is read by nothing any more
    filled = skeleton.fill(bare, taken, lazy)
    assert [i.name for i in filled.graph.input] == ["ids"]
    names = {t.name for t in filled.graph.initializer}
    assert {"table", "w0", "w2", "minus1"} <= names and "w1" not in names
    assert all(external.is_external(t) for t in filled.graph.initializer if t.name in taken)


def test_spill_moves_weights_out_and_returns_a_small_model(tmp_path):
    model = llm_like_model()
    before = run_model(model, ids())["logits"]
    spilled = external.spill(model, tmp_path)
    assert spilled is not model and spilled.ByteSize() < 20_000
    assert len(list(tmp_path.glob("spill-*.data"))) == 1
    np.testing.assert_array_equal(run_model(spilled, ids())["logits"], before)
    assert external.spill(spilled, tmp_path) is spilled  # nothing left in memory to move


def test_weights_in_many_files_optimize_like_one(tmp_path, on_disk):
    """One data file per tensor (what onnx.save writes with all_tensors_to_one_file=False)."""
    folder = tmp_path / "many"
    folder.mkdir()
    onnx.save_model(llm_like_model(), str(folder / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=False, size_threshold=1024)
    assert len([p for p in folder.iterdir() if p.name != "model.onnx"]) >= 5
    one = onnxpipe.optimize(on_disk, PASSES, check_inputs=[ids()], measure_latency=False)
    many = onnxpipe.optimize(folder / "model.onnx", PASSES, check_inputs=[ids()], measure_latency=False)
    assert [(s.name, s.kept, s.nodes) for s in many.stages] == [(s.name, s.kept, s.nodes) for s in one.stages]
    np.testing.assert_array_equal(run_model(many.model, ids())["logits"], run_model(one.model, ids())["logits"])
    out = save_model(many.model, tmp_path / "out" / "model.onnx")
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx", "model.onnx.data"]


def test_cli_optimize_keeps_external_data_and_matches(on_disk, tmp_path):
    out = tmp_path / "out" / "model.onnx"
    r = run_cli("optimize", str(on_disk), "-o", str(out), "--pass", "simplify", "--pass", "quantize:mode=int4",
                "--pass", "strip")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "model.onnx.data").is_file()
    assert not list((tmp_path / "out").glob("spill-*"))
    ref = run_model(str(on_disk), ids())["logits"]
    got = run_model(str(out), ids())["logits"]
    cos = float((ref * got).sum() / np.linalg.norm(ref) / np.linalg.norm(got))
    assert cos > 0.98


# -- commands on a model with external data: weights stay on disk in, external data out -------------------

def test_commands_take_external_data_and_write_it_the_same_way(on_disk, tmp_path, monkeypatch):
    out = tmp_path / "converted" / "model.onnx"
    r = run_cli("convert", str(on_disk), "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "converted" / "model.onnx.data").is_file()  # written the way it came: weights beside it
    np.testing.assert_array_equal(run_model(str(out), ids())["logits"], run_model(str(on_disk), ids())["logits"])
    repo = tmp_path / "repo"
    r = run_cli("export-triton", str(on_disk), "-o", str(repo), "--name", "m")
    assert r.returncode == 0, r.stderr
    assert (repo / "m" / "1" / "model.onnx.data").is_file()
    r = run_cli("validate", str(on_disk), "--providers", "cpu", "--precisions", "fp32,fp16,int8", "--json")
    assert r.returncode == 0, r.stderr


def test_validate_builds_precision_variants_of_a_model_on_disk(on_disk):
    from onnxpipe.pipeline.validation import validate
    from onnxpipe.runtimes.validate import parse_targets

    report = validate(str(on_disk), parse_targets("cpu", ["fp32", "fp16", "int8"]), inputs=[ids()])
    assert [r.error for r in report.rows] == [None, None, None]
    assert all(r.ok for r in report.rows), [(r.target, [o.detail for o in r.outputs]) for r in report.rows]


@pytest.mark.parametrize("quantize", [{"mode": "int4", "exclude_lm_head": True}, {"mode": "dynamic"}],
                         ids=["int4", "int8-dynamic"])
def test_a_real_decoder_export_on_disk_optimizes_like_in_memory(tmp_path, monkeypatch, quantize):
    """A transformers Llama export (rotary caches, shape arithmetic, GQA reshapes, KV cache): the skeleton
    simplifies it to the same graph and int4 by weight gives the same numbers as the whole-model quantizer."""
    from hf_tiny import decoder

    from onnxpipe.converter.huggingface import convert_folder
    from onnxpipe.core.inputs import decoder_feeds

    src = decoder("llama", tmp_path / "hf", layers=2, hidden=128, with_tokenizer=False)
    out = tmp_path / "onnx"
    convert_folder(src, out, check=False, external_data_threshold=0)
    path = out / "model.onnx"
    assert (out / "model.onnx.data").is_file()
    spec = ["simplify", {"quantize": quantize}, "strip"]
    ref = onnxpipe.optimize(load_model(path), spec, measure_latency=False)
    monkeypatch.setattr(external, "materialize", lambda model: pytest.fail("a lazy pass read every weight"))
    got = onnxpipe.optimize(path, spec, measure_latency=False)
    assert [(s.name, s.kept, s.nodes) for s in got.stages] == [(s.name, s.kept, s.nodes) for s in ref.stages]
    assert all(s.kept for s in got.stages), [s.reason for s in got.stages]
    feeds = decoder_feeds(got.model, 2, 5, 1, np.random.default_rng(0))
    a, b = run_model(got.model, feeds), run_model(ref.model, feeds)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=0, atol=1e-5, err_msg=name)
    assert external.lazy_bytes(got.model) > 0


def test_int4_budget_on_disk_picks_the_same_mixed_precision(flat_on_disk, monkeypatch):
    """max_drop ranks MatMuls on real activations and assembles int4/int8/float variants: on disk the same."""
    spec = [{"quantize": {"mode": "int4", "max_drop": 0.002, "min_cosine": 0.9}}]
    data = [ids(4), ids(3)]
    ref = onnxpipe.optimize(load_model(flat_on_disk), spec, check_inputs=data, measure_latency=False)
    monkeypatch.setattr(external, "materialize", lambda model: pytest.fail("int4 read every weight into memory"))
    got = onnxpipe.optimize(flat_on_disk, spec, check_inputs=data, measure_latency=False)
    a, b = got.stages[1].notes, ref.stages[1].notes
    assert len(b["trials"]) > 1  # the budget was not met by all-int4: the ladder ran
    assert (a["kept_8bit"], a["kept_float"], a["budget_met"]) == (b["kept_8bit"], b["kept_float"], b["budget_met"])
    assert [t["nodes"] for t in a["trials"]] == [t["nodes"] for t in b["trials"]]
    np.testing.assert_allclose(run_model(got.model, ids())["logits"], run_model(ref.model, ids())["logits"],
                               rtol=0, atol=1e-6)


def test_run_recipe_on_a_model_with_external_data(on_disk, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {{source: {on_disk}}}\n"
                      "passes: [simplify, {quantize: {mode: int4}}, strip]\n"
                      "validate: {providers: [cpu], atol: 0.5, rtol: 0.1}\n"
                      f"output: {tmp_path / 'run'}\n")
    result = onnxpipe.run(recipe)
    assert all(s.kept for s in result.pipeline.stages), [s.reason for s in result.pipeline.stages]
    assert all(row["ok"] for row in result.validation)
    assert (tmp_path / "run" / "model.onnx.data").is_file()
    ref = run_model(str(on_disk), ids())["logits"]
    got = run_model(str(tmp_path / "run" / "model.onnx"), ids())["logits"]
    assert float((ref * got).sum() / np.linalg.norm(ref) / np.linalg.norm(got)) > 0.98


def test_int4_of_weights_inside_subgraphs_reads_them_for_the_whole_model_quantizer(on_disk):
    lines = []
    cfg = {"mode": "int4"}
    whole = WeightOnlyQuantize(cfg).apply(load_model(on_disk), PassContext()).model
    lazy = WeightOnlyQuantize(cfg).apply(load_model(on_disk, load_external_data=False), PassContext(log=lines.append)).model
    assert any("inside If/Loop bodies" in line for line in lines)
    np.testing.assert_array_equal(run_model(lazy, ids())["logits"], run_model(whole, ids())["logits"])


def test_a_session_on_a_lazy_model_leaves_no_link_to_the_users_data_file(on_disk):
    """ONNX Runtime refuses a model whose subgraph weights sit in a file with several hard links: the links
    a lazy session loads through go as soon as the session has read (memory-mapped) the weights."""
    from onnxpipe.core.session import Session

    data = on_disk.parent / "model.onnx.data"
    with Session(load_model(on_disk, load_external_data=False)) as s:
        assert data.stat().st_nlink == 1
        expected = s.run(ids())["logits"]
        np.testing.assert_array_equal(run_model(str(on_disk), ids())["logits"], expected)  # the original loads


def test_prune_on_disk_reads_weights_through_memory_maps_to_the_in_memory_result(tmp_path, monkeypatch):
    from conftest import conv_gemm_model

    path = save_model(conv_gemm_model(), tmp_path / "conv" / "model.onnx", external_data=True, threshold=0)
    x = [{"x": np.random.default_rng(2).standard_normal((4, 3, 8, 8)).astype(np.float32)}]
    spec = [{"prune": {"ratio": 0.5, "min_agreement": 0.01, "agreement": "cosine", "round_to": 1, "check_latency": False}}]
    ref = onnxpipe.optimize(load_model(path), spec, check_inputs=x, measure_latency=False)
    monkeypatch.setattr(external, "materialize", lambda model: pytest.fail("prune read every weight into memory"))
    got = onnxpipe.optimize(path, spec, check_inputs=x, measure_latency=False)
    assert got.stages[1].kept and ref.stages[1].kept, (got.stages[1].reason, ref.stages[1].reason)
    assert got.stages[1].notes["totals"] == ref.stages[1].notes["totals"]
    assert got.stages[1].notes["totals"]["params_after"] < got.stages[1].notes["totals"]["params_before"]
    np.testing.assert_array_equal(run_model(got.model, x[0])["y"], run_model(ref.model, x[0])["y"])


def test_serve_answers_from_a_triton_repository_with_external_data(on_disk, tmp_path):
    import tritonclient.http as httpclient
    from conftest import serving, triton_client

    from onnxpipe.serve.triton import export_triton

    repo = tmp_path / "repo"
    export_triton(on_disk, repo, "llm", max_batch_size=4)
    assert (repo / "llm" / "1" / "model.onnx.data").is_file()
    feeds = ids(3)
    with serving(repo, "cpu") as (url, _), triton_client(url) as client:
        request = httpclient.InferInput("ids", list(feeds["ids"].shape), "INT64")
        request.set_data_from_numpy(feeds["ids"])
        got = client.infer("llm", [request]).as_numpy("logits")
    np.testing.assert_allclose(got, run_model(str(on_disk), feeds)["logits"], rtol=0, atol=1e-6)


def test_opset_conversion_on_disk_reads_no_weight(on_disk, monkeypatch):
    spec = [{"opset": {"version": 19}}]
    ref = onnxpipe.optimize(load_model(on_disk), spec, check_inputs=[ids()], measure_latency=False)
    monkeypatch.setattr(external, "materialize", lambda model: pytest.fail("opset read every weight into memory"))
    got = onnxpipe.optimize(on_disk, spec, check_inputs=[ids()], measure_latency=False)
    assert got.stages[1].kept and got.model.opset_import[0].version == 19
    np.testing.assert_array_equal(run_model(got.model, ids())["logits"], run_model(ref.model, ids())["logits"])
    assert external.lazy_bytes(got.model) > 0


def test_the_spill_folder_follows_the_environment_and_warns_on_memory_backed_folders(tmp_path, monkeypatch, caplog):
    from pathlib import Path

    monkeypatch.setattr(external, "_spill_dir", None)
    monkeypatch.setenv(external.SPILL_ENV, str(tmp_path))
    folder = external.spill_folder()
    assert folder.parent == tmp_path and folder.is_dir()
    monkeypatch.setattr(external, "_spill_dir", None)
    monkeypatch.setenv(external.SPILL_ENV, str(tmp_path / "missing"))
    with pytest.raises(external.InputError, match="ONNXPIPE_SPILL_DIR"):
        external.spill_folder()
    if Path("/dev/shm").is_dir() and external._in_memory_fs(Path("/dev/shm")):
        monkeypatch.setattr(external, "_spill_dir", None)
        monkeypatch.setenv(external.SPILL_ENV, "/dev/shm")
        with caplog.at_level("WARNING", logger="onnxpipe.external"):
            shm = external.spill_folder()
        assert "held in memory" in caplog.text
        shm.rmdir()
