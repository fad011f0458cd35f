"""Models whose weights stay on disk: lazy loading, streaming writes, size-capped splits."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx.helper as oh
import pytest
from conftest import run_cli

from onnxpipe.core.errors import InputError
from onnxpipe.core.external import has_external_refs, tensor_array
from onnxpipe.core.modelio import load_model, save_model
from onnxpipe.core.session import Session
from onnxpipe.partition.cut import find_capped_cuts
from onnxpipe.partition.profile import profile_graph
from onnxpipe.partition.spec import PipelineSpec, run_sequence
from onnxpipe.partition.split import split_model

D = 32  # each weight: 32x32 float32 = 4096 bytes


def chain_model(layers: int = 6, *, tied: bool = False) -> onnx.ModelProto:
    """x -> MatMul(w_i) -> Tanh ... ; with ``tied`` the last layer reuses the first weight (as tied LM heads do)."""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        w = f"w{i}"
        if tied and i == layers - 1:
            w = "w0"
        else:
            inits.append(onnx.numpy_helper.from_array((rng.standard_normal((D, D)) / np.sqrt(D)).astype(np.float32), w))
        nodes += [oh.make_node("MatMul", [x, w], [f"m{i}"]), oh.make_node("Tanh", [f"m{i}"], [f"h{i}"])]
        x = f"h{i}"
    graph = oh.make_graph(nodes, "chain", [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", D])],
                          [oh.make_tensor_value_info(x, onnx.TensorProto.FLOAT, ["N", D])], inits)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])


@pytest.fixture
def external_chain(tmp_path):
    path = save_model(chain_model(), tmp_path / "src" / "chain.onnx", external_data=True, threshold=0)
    assert (tmp_path / "src" / "chain.onnx.data").is_file()
    return path


def x(batch: int = 3) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(1).standard_normal((batch, D)).astype(np.float32)}


def test_lazy_model_runs_and_streams_to_a_new_place_unchanged(external_chain, tmp_path):
    lazy = load_model(external_chain, load_external_data=False)
    assert has_external_refs(lazy)
    assert not any(t.raw_data for t in lazy.graph.initializer)
    with Session(external_chain) as s:
        expected = s.run(x())
    with Session(lazy) as s:  # ORT reads the data files through links, the proto holds none
        got = s.run(x())
    np.testing.assert_array_equal(got["h5"], expected["h5"])
    copy = save_model(lazy, tmp_path / "copy" / "chain.onnx")
    data = tmp_path / "copy" / "chain.onnx.data"
    assert data.is_file() and data.stat().st_size >= 6 * D * D * 4
    offsets = [int({e.key: e.value for e in t.external_data}["offset"])
               for t in onnx.load(str(copy), load_external_data=False).graph.initializer]
    assert all(o % 4096 == 0 for o in offsets)  # page-aligned: ORT can memory-map each tensor
    with Session(str(copy)) as s:
        np.testing.assert_array_equal(s.run(x())["h5"], expected["h5"])
    full = onnx.load(str(external_chain))
    for t in lazy.graph.initializer:  # memory-mapped values equal the original weights
        ref = next(i for i in full.graph.initializer if i.name == t.name)
        np.testing.assert_array_equal(tensor_array(t), onnx.numpy_helper.to_array(ref))


def test_in_memory_tensors_of_a_partly_lazy_model_are_written_too(external_chain, tmp_path):
    lazy = load_model(external_chain, load_external_data=False)
    extra = onnx.numpy_helper.from_array(np.full((D, D), 0.5, np.float32), "w_new")
    lazy.graph.initializer.append(extra)  # a pass added a weight in memory beside the ones on disk
    lazy.graph.node[0].input[1] = "w_new"
    out = save_model(lazy, tmp_path / "mixed" / "m.onnx")
    reloaded = onnx.load(str(out))
    w = next(i for i in reloaded.graph.initializer if i.name == "w_new")
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(w), np.full((D, D), 0.5, np.float32))


def test_missing_or_escaping_data_files_are_one_line_errors(external_chain, tmp_path):
    (tmp_path / "src" / "chain.onnx.data").rename(tmp_path / "elsewhere.data")
    with pytest.raises(InputError, match="chain.onnx.data, which is missing"):
        load_model(external_chain, load_external_data=False)
    model = onnx.load(str(external_chain), load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../elsewhere.data"
    onnx.save(model, str(tmp_path / "src" / "evil.onnx"))
    with pytest.raises(InputError, match="outside the model's folder"):
        load_model(tmp_path / "src" / "evil.onnx", load_external_data=False)


def test_inspect_reads_no_weight_bytes(external_chain):
    data = external_chain.parent / "chain.onnx.data"
    data.write_bytes(b"")  # weights gone: a command that read them would fail
    r = run_cli("inspect", str(external_chain), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["parameters"]["count"] == 6 * D * D
    r = run_cli("inspect", str(external_chain), "--memory", "--json")
    assert r.returncode == 0, r.stderr


def test_capped_cuts_use_the_fewest_parts_and_count_shared_weights_on_both_sides():
    profile = profile_graph(chain_model(6), batch=1)
    one = 4 * D * D
    plan = find_capped_cuts(profile, 2 * one + 2 * D * 4)  # two layers plus their handoffs fit
    assert len(plan.bounds) - 1 == 3
    assert all(load <= 2 * one + 2 * D * 4 for load in plan.loads)
    tied = profile_graph(chain_model(6, tied=True), batch=1)
    plan = find_capped_cuts(tied, 3 * one + 2 * D * 4)
    # w0 is read by the first and the last layer: both parts that hold them count it
    assert all(load <= 3 * one + 2 * D * 4 for load in plan.loads)
    assert len(plan.bounds) - 1 == 2
    with pytest.raises(InputError, match="alone holds"):
        find_capped_cuts(profile, one // 2)
    with pytest.raises(InputError, match="must be positive"):
        find_capped_cuts(profile, 0)


def test_split_by_size_from_external_data_matches_the_whole(external_chain, tmp_path):
    one = 4 * D * D
    cap = 2 * one + 1024
    result = split_model(external_chain, tmp_path / "parts", max_part_bytes=cap, batch=2)
    assert result.ok and len(result.spec.parts) == 3
    for k, part in enumerate(result.spec.parts):
        files = [tmp_path / "parts" / part.file, tmp_path / "parts" / f"{part.file}.data"]
        assert sum(f.stat().st_size for f in files if f.exists()) <= cap + 4096  # + page alignment
        assert onnx.load(str(files[0]), load_external_data=False).graph.initializer[0].data_location == 1
    spec = PipelineSpec.load(tmp_path / "parts")
    sessions = [Session(str(spec.part_path(k))) for k in range(len(spec.parts))]
    with Session(external_chain) as s:
        expected = s.run(x(4))
    got = run_sequence(sessions, spec.parts, spec.output_names, x(4))
    np.testing.assert_allclose(got["h5"], expected["h5"], atol=1e-6)
    assert spec.extra["max_part_bytes"] == cap and max(spec.extra["part_bytes"]) <= cap


def test_split_cli_size_options(external_chain, tmp_path):
    r = run_cli("split", str(external_chain), "-o", str(tmp_path / "p"), "--max-part-bytes", "10kB")
    assert r.returncode == 0, r.stderr
    assert len(json.loads((tmp_path / "p" / "pipeline.json").read_text())["parts"]) == 3
    r = run_cli("split", str(external_chain), "-o", str(tmp_path / "q"), "--max-part-bytes", "1kB")
    assert r.returncode == 2 and "alone holds" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "q").exists()
    r = run_cli("split", str(external_chain), "-o", str(tmp_path / "q"), "--max-part-bytes", "lots")
    assert r.returncode == 2 and "cannot read --max-part-bytes 'lots'" in r.stderr
    r = run_cli("split", str(external_chain), "-o", str(tmp_path / "q"), "--max-part-bytes", "10kB", "--parts", "3")
    assert r.returncode == 2 and "give one of them" in r.stderr


def toy_decoder(layers: int = 3, d: int = 8, vocab: int = 16) -> onnx.ModelProto:
    """A decoder-shaped graph: token ids, an embedding, per layer a KV cache (past_key_values.{i} ->
    present.{i}, [batch, 1 head, positions, d]) and an MLP, then logits."""
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    inputs = [oh.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, ["B", "S"]),
              oh.make_tensor_value_info("attention_mask", onnx.TensorProto.INT64, ["B", "T"])]
    outputs = []

    def w(name: str, shape: tuple[int, ...]) -> str:
        inits.append(onnx.numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32), name))
        return name

    nodes += [oh.make_node("Gather", [w("embed", (vocab, d)), "input_ids"], ["h"]),
              oh.make_node("Cast", ["attention_mask"], ["maskf"], to=onnx.TensorProto.FLOAT),
              oh.make_node("ReduceMean", ["maskf"], ["mscale"], keepdims=0)]
    h = "h"
    for i in range(layers):
        nodes.append(oh.make_node("Unsqueeze", [h, "one"], [f"h4_{i}"]))
        for kind in ("key", "value"):
            inputs.append(oh.make_tensor_value_info(f"past_key_values.{i}.{kind}", onnx.TensorProto.FLOAT,
                                                    ["B", 1, "P", d]))
            outputs.append(oh.make_tensor_value_info(f"present.{i}.{kind}", onnx.TensorProto.FLOAT, ["B", 1, "U", d]))
            nodes += [oh.make_node("MatMul", [f"h4_{i}", w(f"W{kind[0]}{i}", (d, d))], [f"{kind}{i}"]),
                      oh.make_node("Concat", [f"past_key_values.{i}.{kind}", f"{kind}{i}"], [f"present.{i}.{kind}"],
                                   axis=2)]
        nodes += [
            oh.make_node("ReduceMean", [f"present.{i}.key"], [f"km{i}"], axes=[1, 2], keepdims=0),
            oh.make_node("ReduceMean", [f"present.{i}.value"], [f"vm{i}"], axes=[1, 2], keepdims=0),
            oh.make_node("Mul", [f"km{i}", f"vm{i}"], [f"kv{i}"]),
            oh.make_node("Unsqueeze", [f"kv{i}", "one"], [f"kvu{i}"]),
            oh.make_node("Mul", [f"kvu{i}", "mscale"], [f"kvm{i}"]),
            oh.make_node("Add", [h, f"kvm{i}"], [f"a{i}"]),
            oh.make_node("MatMul", [f"a{i}", w(f"W1_{i}", (d, 4 * d))], [f"u{i}"]),
            oh.make_node("Relu", [f"u{i}"], [f"r{i}"]),
            oh.make_node("MatMul", [f"r{i}", w(f"W2_{i}", (4 * d, d))], [f"m{i}"]),
            oh.make_node("Add", [f"a{i}", f"m{i}"], [f"h{i}"]),
        ]
        h = f"h{i}"
    inits.append(onnx.numpy_helper.from_array(np.array([1], np.int64), "one"))
    nodes.append(oh.make_node("MatMul", [h, w("lm_head", (d, vocab))], ["logits"]))
    outputs.insert(0, oh.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["B", "S", vocab]))
    graph = oh.make_graph(nodes, "toy_decoder", inputs, outputs, inits)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])


def test_decoders_split_between_layers_and_each_stage_keeps_its_cache(tmp_path):
    from onnxpipe.partition.layers import layer_boundaries

    model = toy_decoder(3)
    profile = profile_graph(model, batch=1)
    bounds = layer_boundaries(profile)
    assert len(bounds) == 2
    for b in bounds:  # the cut comes right after a layer's residual Add: only the stream crosses
        assert profile.nodes[b - 1].op_type == "Add" and profile.nodes[b - 1].output[0].startswith("h")
    result = split_model(model, tmp_path / "dec", parts=3, at_layers=True, balance="params")
    assert result.ok
    spec = PipelineSpec.load(tmp_path / "dec")
    assert spec.extra["layers"] == [[0], [1], [2]]
    for k, part in enumerate(spec.parts):
        assert {t for t in part.inputs if t.startswith("past_")} == {f"past_key_values.{k}.key", f"past_key_values.{k}.value"}
        assert {t for t in part.outputs if t.startswith("present")} == {f"present.{k}.key", f"present.{k}.value"}
    with pytest.raises(InputError, match="too few for 5 parts"):
        split_model(model, tmp_path / "dec5", parts=5, at_layers=True)
    with pytest.raises(InputError, match="not a KV-cache decoder|no decoder layers"):
        split_model(chain_model(), tmp_path / "x", parts=2, at_layers=True)


def test_split_cli_takes_a_generation_folder_and_keeps_its_side_files(tmp_path):
    folder = tmp_path / "gen"
    save_model(toy_decoder(4), folder / "model.onnx")
    (folder / "tokenizer.json").write_text("{}")
    (folder / "genai_config.json").write_text("{}")
    r = run_cli("split", str(folder), "-o", str(tmp_path / "parts"), "--parts", "2", "--balance", "params")
    assert r.returncode == 0, r.stderr
    spec = json.loads((tmp_path / "parts" / "pipeline.json").read_text())
    assert spec["layers"] == [[0, 1], [2, 3]]  # layer boundaries chosen by default for a KV-cache model
    assert (tmp_path / "parts" / "tokenizer.json").is_file() and (tmp_path / "parts" / "genai_config.json").is_file()
