"""Bad input to every command, as a careless or hostile user gives it: one line, exit 2, nothing written.

Each case runs ``onnxpipe.cli.main`` in this process (a few also as real subprocesses) and must
end with exactly one ``error: ...`` line on stderr naming the bad thing, exit code 2, no
traceback, and no file or folder left where the command would have written (its output, the
current directory, beside its inputs).
"""

from __future__ import annotations

import os
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import conv_gemm_model, gather_model, run_cli
from onnx import TensorProto, helper

# ---------------------------------------------------------------------------------------------
# the files the cases use: built once per module


def one_node_model() -> onnx.ModelProto:
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "one",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def two_node_model() -> onnx.ModelProto:
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["h"]), helper.make_node("Neg", ["h"], ["y"])], "two",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    w = tmp_path_factory.mktemp("world")
    onnx.save(conv_gemm_model(), w / "m.onnx")
    onnx.save(gather_model(), w / "int.onnx")
    onnx.save(one_node_model(), w / "one.onnx")
    onnx.save(two_node_model(), w / "two.onnx")
    rng = np.random.default_rng(0)
    np.savez(w / "data.npz", x=rng.standard_normal((8, 3, 8, 8)).astype(np.float32))
    np.savez(w / "data2.npz", x=rng.standard_normal((8, 3, 8, 8)).astype(np.float32))
    np.savez(w / "empty.npz", x=np.zeros((0, 3, 8, 8), np.float32))
    np.savez(w / "wrongname.npz", z=rng.standard_normal((8, 3, 8, 8)).astype(np.float32))
    np.savez(w / "wrongshape.npz", x=rng.standard_normal((8, 3, 9, 9)).astype(np.float32))
    np.savez(w / "intdata.npz", x=np.ones((8, 3, 8, 8), np.int64))
    np.savez(w / "nan.npz", x=np.full((8, 3, 8, 8), np.nan, np.float32))
    np.savez(w / "idx.npz", idx=np.arange(8, dtype=np.int64) % 10)
    np.save(w / "obj.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with zipfile.ZipFile(w / "objects.npz", "w") as z:
        z.write(w / "obj.npy", "x.npy")
    (w / "corrupt.npz").write_bytes(b"PK\x03\x04 this is not a zip archive at all" * 10)
    (w / "truncated.npz").write_bytes((w / "data.npz").read_bytes()[:200])
    (w / "text.npz").write_text("hello")
    (w / "corrupt.npy").write_bytes(b"\x93NUMPY\x01\x00garbage")
    (w / "corrupt.onnx").write_bytes(os.urandom(512))
    (w / "empty.onnx").write_bytes(b"")
    (w / "text.onnx").write_text("not a model")
    (w / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    (w / "list.yaml").write_text("- a\n- b\n")
    (w / "badyaml.yaml").write_text("model: {source: [unclosed\n")
    (w / "unknownkey.yaml").write_text("model: {source: m.onnx}\nwhatever: 1\n")
    (w / "badpass.yaml").write_text("model: {source: m.onnx}\npasses: [nosuchpass]\n")
    (w / "badbatch.yaml").write_text("model: {source: m.onnx}\ndata: {batch_size: 0}\n")
    (w / "nanatol.yaml").write_text("model: {source: m.onnx}\nvalidate: {atol: .nan}\n")
    (w / "negatol.yaml").write_text("model: {source: m.onnx, atol: -1}\n")
    (w / "missingsrc.yaml").write_text("model: {source: nope.onnx}\n")
    (w / "baddata.yaml").write_text("model: {source: m.onnx}\ndata: {calibration: corrupt.npz}\n")
    (w / "fixneg.yaml").write_text("model: {source: m.onnx}\npasses: [{fix-shapes: {dims: {N: -1}}}]\n")
    (w / "empty.yaml").write_text("")
    (w / "badtuned.json").write_text("{not json")
    (w / "listtuned.json").write_text("[1, 2]")
    (w / "binary.json").write_bytes(bytes(range(256)))
    (w / "somefile").write_text("x")
    (w / "adir").mkdir()
    (w / "data.py").write_text(textwrap.dedent("""
        import numpy as np

        def raises():
            raise RuntimeError("boom in the data function")

        def not_iterable():
            return 42

        def empty():
            return iter(())

        def empty_gen():
            yield from ()

        def not_dicts():
            return [1, 2, 3]

        def strings():
            return [{"x": "abc"}]

        def gen_raises():
            yield {"x": np.zeros((1, 3, 8, 8), np.float32)}
            raise ValueError("second batch broke")

        def objects():
            return [{"x": np.array([None, {}], dtype=object)}]

        def wrong_name():
            return [{"z": np.zeros((1, 3, 8, 8), np.float32)}]

        NOT_CALLABLE = 3
        """))
    (w / "broken.py").write_text("def f(:\n")
    (w / "importfails.py").write_text("raise ImportError('no module named nowhere')\n")
    (w / "factory.py").write_text(textwrap.dedent("""
        def raises():
            raise RuntimeError("factory broke")

        def returns_none():
            return None

        def returns_int():
            return 3
        """))
    return w


# ---------------------------------------------------------------------------------------------
# the cases: (id, argv with {w} = the files above and {o} = a fresh output place, needle in the message)

NUM_BAD = ["nan", "inf", "-inf", "-1"]

CASES: list[tuple[str, list[str], str]] = []


def case(cid: str, argv: str | list[str], needle: str) -> None:
    CASES.append((cid, argv.split() if isinstance(argv, str) else argv, needle))


# global --------------------------------------------------------------------------------------
case("unknown-command", "frobnicate", "frobnicate")
case("unknown-option", "inspect {w}/m.onnx --frob", "--frob")
case("missing-argument", "inspect", "MODEL")
case("missing-required-option", "convert {w}/m.onnx", "--output")
case("option-missing-value", "inspect {w}/m.onnx --batch-size", "--batch-size")
case("int-not-a-number", "inspect {w}/m.onnx --batch-size abc", "--batch-size")
case("providers-extra-arg", "providers extra", "extra")
case("passes-extra-option", "passes --frob", "--frob")

# inspect ---------------------------------------------------------------------------------------
for v in ["0", "-1", "-100"]:
    case(f"inspect-batch-{v}", f"inspect {{w}}/m.onnx --batch-size {v}", "--batch-size")
for v in ["N=0", "N=-1", "N=abc", "=3", "N", "N=1.5", "N=99999999999999999999999"]:
    case(f"inspect-dim-{v}", ["inspect", "{w}/m.onnx", "--dim", v], "--dim")
case("inspect-dim-unknown", "inspect {w}/m.onnx --dim nosuch=3", "nosuch")
for src in ["nope.onnx", "corrupt.onnx", "empty.onnx", "text.onnx", "adir", "data.npz"]:
    case(f"inspect-model-{src}", f"inspect {{w}}/{src}", src)
case("inspect-input-bad", "inspect {w}/m.onnx --input x:axb", "x:axb")
case("inspect-input-unknown", "inspect {w}/m.onnx --input zz:1x3x8x8", "zz")
case("inspect-input-negative", "inspect {w}/m.onnx --input x:-1x3x8x8", "x:-1x3x8x8")

# convert ---------------------------------------------------------------------------------------
for v in NUM_BAD:
    case(f"convert-atol-{v}", f"convert {{w}}/m.onnx -o {{o}}/m.onnx --atol {v}", "--atol")
    case(f"convert-rtol-{v}", f"convert {{w}}/m.onnx -o {{o}}/m.onnx --rtol {v}", "--rtol")
for v in ["0", "-1", "1000"]:
    case(f"convert-opset-{v}", f"convert {{w}}/m.onnx -o {{o}}/m.onnx --opset {v}", "--opset")
for src in ["nope.onnx", "corrupt.onnx", "empty.onnx", "text.onnx", "somefile", "data.npz", "corrupt.npy"]:
    case(f"convert-source-{src}", f"convert {{w}}/{src} -o {{o}}/m.onnx", src)
for spec, needle in [("broken.py:f", "broken.py"), ("importfails.py:f", "importfails.py"),
                     ("factory.py:nosuch", "nosuch"), ("factory.py:raises", "factory broke"),
                     ("factory.py:returns_none", "returns_none"), ("factory.py:returns_int", "returns_int"),
                     ("nope.py:f", "nope.py"), ("factory.py", "factory.py"), ("data.py:NOT_CALLABLE", "NOT_CALLABLE")]:
    case(f"convert-factory-{spec}", f"convert {{w}}/{spec} -o {{o}}/m.onnx", needle)
case("convert-framework-bad", "convert {w}/m.onnx -o {o}/m.onnx --framework jax", "jax")
case("convert-input-bad", "convert {w}/m.onnx -o {o}/m.onnx --input x:1xq:float32", "x:1xq:float32")
case("convert-input-dtype", "convert {w}/m.onnx -o {o}/m.onnx --input x:1x3x8x8:float99", "float99")
for out, needle in [("/sys/x.onnx", "/sys/x.onnx"), ("/dev/null/x.onnx", "/dev/null"), ("/proc/x.onnx", "/proc/x.onnx"),
                    ("{w}/somefile/x.onnx", "somefile"), ("{w}/m.onnx", "m.onnx"), ("/proc/self/x", "/proc/self/x")]:
    case(f"convert-output-{out}", ["convert", "{w}/m.onnx", "-o", out], needle)

# optimize -------------------------------------------------------------------------------------
for p, needle in [("nosuch", "nosuch"), ("fix-shapes:{dims: {N: -1}}", "-1"), ("fix-shapes:{dims: {N: 0}}", "0"),
                  ("fix-shapes:{dims: {nosuch: 2}}", "nosuch"), ("fix-shapes:{dims: {N: abc}}", "abc"),
                  ("opset:version=0", "version"), ("opset:version=-3", "version"), ("opset:version=abc", "version"),
                  ("fp16:{keep_fp32_ops: 3}", "keep_fp32_ops"), ("simplify:{frob: 1}", "frob"),
                  ("prune:{ratio: 2}", "ratio"), ("prune:{ratio: -0.1}", "ratio"), ("prune:{ratio: .nan}", "ratio"),
                  ("quantize:{mode: weird}", "mode"), ("simplify:{", "simplify:{"), ("fp16:a=b=c", "fp16")]:
    case(f"optimize-pass-{p}", ["optimize", "{w}/m.onnx", "-o", "{o}/m.onnx", "--pass", p], needle)
for d, needle in [("nope.npz", "nope.npz"), ("corrupt.npz", "corrupt.npz"), ("truncated.npz", "truncated.npz"),
                  ("text.npz", "text.npz"), ("objects.npz", "objects.npz"), ("empty.npz", "empty.npz"),
                  ("data.py:raises", "boom"), ("data.py:not_iterable", "not_iterable"), ("data.py:empty", "empty"),
                  ("data.py:empty_gen", "empty_gen"), ("data.py:not_dicts", "not_dicts"), ("data.py:strings", "strings"),
                  ("data.py:objects", "objects"), ("data.py:nosuch", "nosuch"), ("broken.py:f", "broken.py"),
                  ("wrongname.npz", "wrongname.npz"), ("wrongshape.npz", "wrongshape.npz")]:
    case(f"optimize-data-{d}", ["optimize", "{w}/m.onnx", "-o", "{o}/m.onnx", "--pass", "quantize:{mode: static}",
                                "--data", "{w}/" + d], needle)
case("optimize-model-corrupt", "optimize {w}/corrupt.onnx -o {o}/m.onnx --pass simplify", "corrupt.onnx")
case("optimize-output-sys", "optimize {w}/m.onnx -o /sys/m.onnx --pass simplify", "/sys/m.onnx")
case("optimize-output-dir", "optimize {w}/m.onnx -o {w}/adir --pass simplify", "adir")
case("optimize-report-file", "optimize {w}/m.onnx -o {o}/m.onnx --report {w}/somefile --pass simplify", "somefile")
case("optimize-report-sys", "optimize {w}/m.onnx -o {o}/m.onnx --report /sys/rep --pass simplify", "/sys/rep")

# run -----------------------------------------------------------------------------------------------
for r, needle in [("nope.yaml", "nope.yaml"), ("binary.yaml", "binary.yaml"), ("list.yaml", "list.yaml"),
                  ("badyaml.yaml", "badyaml.yaml"), ("unknownkey.yaml", "whatever"), ("badpass.yaml", "nosuchpass"),
                  ("badbatch.yaml", "batch_size"), ("nanatol.yaml", "atol"), ("negatol.yaml", "atol"),
                  ("missingsrc.yaml", "nope.onnx"), ("baddata.yaml", "corrupt.npz"), ("fixneg.yaml", "-1"),
                  ("empty.yaml", "empty.yaml"), ("adir", "adir"), ("corrupt.onnx", "corrupt.onnx")]:
    case(f"run-recipe-{r}", ["run", "{w}/" + r, "-o", "{o}/run"], needle)
case("run-output-sys", "run {w}/missingsrc.yaml -o /sys/run", "/sys/run")
case("run-output-file", "run {w}/missingsrc.yaml -o {w}/somefile", "somefile")

# infer ---------------------------------------------------------------------------------------------
INFER = "infer {w}/m.onnx --data {w}/data.npz -o {o}/out"
for v in ["0", "-1"]:
    case(f"infer-batch-{v}", f"{INFER} -b {v}", "--batch-size")
    case(f"infer-shard-{v}", f"{INFER} --shard-size {v}", "--shard-size")
    case(f"infer-attempts-{v}", f"{INFER} --max-attempts {v}", "--max-attempts")
case("infer-batch-huge", f"{INFER} -b 100000000000", "--batch-size")
for dev, needle in [("gpu", "gpu"), ("cpu:x", "cpu:x"), ("cpu[threads=-1]", "threads"), ("cpu[frob=1]", "frob"),
                    (",".join(["cpu"] * 200), "cpu"), ("cuda:0", "cuda"), ("", "--devices"), ("cpu[threads=nan]", "threads")]:
    case(f"infer-devices-{dev[:20]}", ["infer", "{w}/m.onnx", "--data", "{w}/data.npz", "-o", "{o}/out", "--devices", dev], needle)
case("infer-backend-bad", f"{INFER} --backend spark", "spark")
for d, needle in [("nope.npz", "nope.npz"), ("corrupt.npz", "corrupt.npz"), ("truncated.npz", "truncated.npz"),
                  ("text.npz", "text.npz"), ("objects.npz", "objects.npz"), ("obj.npy", "obj.npy"),
                  ("corrupt.npy", "corrupt.npy"), ("data.py:raises", "boom"), ("data.py:not_iterable", "not_iterable"),
                  ("data.py:not_dicts", "not_dicts"), ("data.py:strings", "strings"), ("data.py:objects", "objects"),
                  ("data.py:gen_raises", "second batch broke"), ("data.py:wrong_name", "z"),
                  ("wrongname.npz", "wrongname.npz"), ("wrongshape.npz", "wrongshape.npz"), ("intdata.npz", "intdata.npz"),
                  ("empty.npz", "empty.npz"), ("data.py:empty", "empty"), ("adir", "adir")]:
    case(f"infer-data-{d}", ["infer", "{w}/m.onnx", "--data", "{w}/" + d, "-o", "{o}/out"], needle)
for out, needle in [("/sys/out", "/sys/out"), ("/dev/null/out", "/dev/null"), ("{w}/somefile", "somefile"),
                    ("{w}/m.onnx", "m.onnx")]:
    case(f"infer-output-{out}", ["infer", "{w}/m.onnx", "--data", "{w}/data.npz", "-o", out], needle)
case("infer-model-corrupt", "infer {w}/corrupt.onnx --data {w}/data.npz -o {o}/out", "corrupt.onnx")
case("infer-model-missing", "infer {w}/nope.onnx --data {w}/data.npz -o {o}/out", "nope.onnx")
case("infer-config-bad", f"{INFER} --config {{w}}/badtuned.json", "badtuned.json")
case("infer-config-list", f"{INFER} --config {{w}}/listtuned.json", "listtuned.json")
case("infer-config-binary", f"{INFER} --config {{w}}/binary.json", "binary.json")
case("infer-config-missing", f"{INFER} --config {{w}}/nope.json", "nope.json")

# validate -----------------------------------------------------------------------------------------
VAL = "validate {w}/m.onnx"
for v in ["0", "-1", "-2"]:
    case(f"validate-batches-{v}", f"{VAL} --batches {v}", "--batches")
    case(f"validate-batch-size-{v}", f"{VAL} -b {v}", "--batch-size")
    case(f"validate-chunk-{v}", f"{VAL} --chunk {v}", "--chunk")
for v in NUM_BAD:
    case(f"validate-atol-{v}", f"{VAL} --atol {v}", "--atol")
    case(f"validate-rtol-{v}", f"{VAL} --rtol {v}", "--rtol")
for t, needle in [("nosuch=1e-3", "nosuch"), ("y=nan", "y=nan"), ("y=-1", "y=-1"), ("y=abc", "y=abc"),
                  ("=1e-3", "=1e-3"), ("y", "y"), ("y=1e-3,nan", "nan"), ("y=1e-3,-5", "-5")]:
    case(f"validate-tol-{t}", ["validate", "{w}/m.onnx", "--tol", t], needle)
case("validate-batch-huge", f"{VAL} -b 100000000000", "--batch-size")
case("validate-batches-huge", f"{VAL} --batches 100000000000", "--batches")
case("validate-providers-bad", f"{VAL} --providers npu", "npu")
case("validate-providers-empty", ["validate", "{w}/m.onnx", "--providers", ""], "--providers")
case("validate-precision-bad", f"{VAL} --precisions fp8", "fp8")
case("validate-precision-slash", f"{VAL} --providers cpu/int3", "int3")
case("validate-reference-corrupt", f"{VAL} --reference {{w}}/corrupt.onnx", "corrupt.onnx")
case("validate-reference-missing", f"{VAL} --reference {{w}}/nope.onnx", "nope.onnx")
case("validate-reference-npz-corrupt", f"{VAL} --reference {{w}}/corrupt.npz", "corrupt.npz")
for d, needle in [("corrupt.npz", "corrupt.npz"), ("objects.npz", "objects.npz"), ("data.py:raises", "boom"),
                  ("data.py:not_iterable", "not_iterable"), ("data.py:empty", "empty"), ("empty.npz", "empty.npz"),
                  ("wrongname.npz", "wrongname.npz"), ("wrongshape.npz", "wrongshape.npz"), ("nope.npz", "nope.npz")]:
    case(f"validate-data-{d}", ["validate", "{w}/m.onnx", "--data", "{w}/" + d], needle)
for d, needle in [("corrupt.npz", "corrupt.npz"), ("truncated.npz", "truncated.npz"), ("objects.npz", "objects.npz"),
                  ("nope.npz", "nope.npz"), ("text.npz", "text.npz"), ("wrongname.npz", "wrongname.npz")]:
    case(f"validate-load-{d}", ["validate", "{w}/m.onnx", "--load-inputs", "{w}/" + d], needle)
case("validate-save-sys", f"{VAL} --save-inputs /sys/in.npz", "/sys/in.npz")
case("validate-save-dir", f"{VAL} --save-inputs {{w}}/adir", "adir")
case("validate-input-bad", f"{VAL} --input x:1x3", "x")
case("validate-model-corrupt", "validate {w}/corrupt.onnx", "corrupt.onnx")
case("validate-int-model-bad-data", "validate {w}/int.onnx --data {w}/data.npz", "data.npz")

# bench ----------------------------------------------------------------------------------------------
BENCH = "bench {w}/m.onnx"
for v in ["-1", "-100"]:
    case(f"bench-runs-{v}", f"{BENCH} --runs {v}", "--runs")
    case(f"bench-warmup-{v}", f"{BENCH} --warmup {v}", "--warmup")
case("bench-runs-0", f"{BENCH} --runs 0", "--runs")
for v in NUM_BAD + ["0"]:
    case(f"bench-budget-{v}", f"{BENCH} --budget {v}", "--budget")
for v in ["0", "-1", "abc", "1,,x", "100000000000", "1,0"]:
    case(f"bench-batch-sizes-{v}", ["bench", "{w}/m.onnx", "--batch-sizes", v], "--batch-sizes")
for v in ["0", "-2", "abc", "100000"]:
    case(f"bench-threads-{v}", ["bench", "{w}/m.onnx", "--threads", v], "--threads")
case("bench-dim-unknown", f"{BENCH} --dim nosuch=3", "nosuch")
case("bench-dim-zero", f"{BENCH} --dim N=0", "--dim")
case("bench-providers-bad", f"{BENCH} --providers tpu", "tpu")
case("bench-providers-many", ["bench", "{w}/m.onnx", "--providers", ",".join(["cpu"] * 200)], "cpu")
case("bench-model-corrupt", "bench {w}/corrupt.onnx", "corrupt.onnx")
case("bench-config-bad", f"{BENCH} --config {{w}}/badtuned.json", "badtuned.json")
for d, needle in [("corrupt.npz", "corrupt.npz"), ("objects.npz", "objects.npz"), ("data.py:raises", "boom"),
                  ("wrongname.npz", "wrongname.npz"), ("empty.npz", "empty.npz"), ("nope.npz", "nope.npz")]:
    case(f"bench-data-{d}", ["bench", "{w}/m.onnx", "--data", "{w}/" + d], needle)
case("bench-int-model-bad-data", "bench {w}/int.onnx --data {w}/data.npz", "data.npz")

# tune -----------------------------------------------------------------------------------------------
TUNE = "tune {w}/m.onnx -o {o}/tuned.json"
for v in NUM_BAD + ["0"]:
    case(f"tune-budget-{v}", f"{TUNE} --budget-s {v}", "--budget-s")
for v in ["nan", "-1", "inf"]:
    case(f"tune-atol-{v}", f"{TUNE} --atol {v}", "--atol")
    case(f"tune-rtol-{v}", f"{TUNE} --rtol {v}", "--rtol")
for v in ["0", "-1"]:
    case(f"tune-max-batch-{v}", f"{TUNE} --max-batch {v}", "--max-batch")
for v in ["lots", "-1GiB", "0"]:
    case(f"tune-memory-cap-{v}", f"{TUNE} --memory-cap {v}", "--memory-cap")
case("tune-objective-bad", f"{TUNE} --objective speed", "speed")
case("tune-batch-sizes-bad", f"{TUNE} --batch-sizes 0", "--batch-sizes")
case("tune-batch-sizes-huge", f"{TUNE} --batch-sizes 100000000000", "--batch-sizes")
case("tune-dim-unknown", f"{TUNE} --dim nosuch=3", "nosuch")
case("tune-try-bad", f"{TUNE} --try gpu9", "gpu9")
case("tune-devices-bad", f"{TUNE} --devices tpu", "tpu")
case("tune-output-sys", "tune {w}/m.onnx -o /sys/tuned.json", "/sys/tuned.json")
case("tune-output-dir", "tune {w}/m.onnx -o {w}/adir", "adir")
case("tune-chart-sys", f"{TUNE} --chart /sys/c.png", "/sys/c.png")
case("tune-model-corrupt", "tune {w}/corrupt.onnx -o {o}/tuned.json", "corrupt.onnx")
case("tune-data-corrupt", f"{TUNE} --data {{w}}/corrupt.npz", "corrupt.npz")
case("tune-int-model-bad-data", "tune {w}/int.onnx -o {o}/tuned.json --data {w}/data.npz", "data.npz")

# serve ----------------------------------------------------------------------------------------------
SERVE = "serve {w}/m.onnx --port 0"
for v in ["-1", "70000", "abc"]:
    case(f"serve-port-{v}", ["serve", "{w}/m.onnx", "--port", v], "--port")
for v in ["0", "-1"]:
    case(f"serve-max-batch-{v}", f"{SERVE} --max-batch-size {v}", "--max-batch-size")
    case(f"serve-max-queue-{v}", f"{SERVE} --max-queue {v}", "--max-queue")
for v in ["-5", "nan", "inf"]:
    case(f"serve-delay-{v}", f"{SERVE} --max-queue-delay-ms {v}", "--max-queue-delay-ms")
for v in ["0", "-1", "nan", "inf"]:
    case(f"serve-body-{v}", f"{SERVE} --max-body-mb {v}", "--max-body-mb")
    case(f"serve-header-timeout-{v}", f"{SERVE} --header-timeout-s {v}", "--header-timeout-s")
    case(f"serve-body-timeout-{v}", f"{SERVE} --body-timeout-s {v}", "--body-timeout-s")
    case(f"serve-restart-window-{v}", f"{SERVE} --restart-window-s {v}", "--restart-window-s")
case("serve-max-restarts-neg", f"{SERVE} --max-restarts -1", "--max-restarts")
case("serve-host-bad", f"{SERVE} --host 999.1.1.1", "--host")
case("serve-host-name", f"{SERVE} --host no.such.host.invalid", "--host")
case("serve-model-missing", "serve {w}/nope.onnx --port 0", "nope.onnx")
case("serve-model-corrupt", "serve {w}/corrupt.onnx --port 0", "corrupt.onnx")
case("serve-empty-dir", "serve {w}/adir --port 0", "adir")
case("serve-devices-bad", f"{SERVE} --devices tpu", "tpu")
case("serve-config-bad", f"{SERVE} --config {{w}}/badtuned.json", "badtuned.json")

# export-triton --------------------------------------------------------------------------------------
TRITON = "export-triton {w}/m.onnx -o {o}/repo --name m"
for v in ["-5", "nan", "inf"]:
    case(f"triton-delay-{v}", f"{TRITON} --max-queue-delay-ms {v}", "--max-queue-delay-ms")
for v in ["-1", "-100"]:
    case(f"triton-max-batch-{v}", f"{TRITON} --max-batch-size {v}", "--max-batch-size")
for v in ["0", "-1"]:
    case(f"triton-instances-{v}", f"{TRITON} --instances {v}", "--instances")
    case(f"triton-version-{v}", f"{TRITON} --version {v}", "--version")
for n in ["../evil", "a/b", "", ".", "..", "x" * 300]:
    case(f"triton-name-{n[:12]}", ["export-triton", "{w}/m.onnx", "-o", "{o}/repo", "--name", n], "--name")
case("triton-devices-bad", f"{TRITON} --devices tpu", "tpu")
case("triton-output-sys", "export-triton {w}/m.onnx -o /sys/repo --name m", "/sys/repo")
case("triton-output-file", "export-triton {w}/m.onnx -o {w}/somefile --name m", "somefile")
case("triton-model-corrupt", "export-triton {w}/corrupt.onnx -o {o}/repo --name m", "corrupt.onnx")

# split -------------------------------------------------------------------------------------------------
SPLIT = "split {w}/m.onnx -o {o}/parts"
for v in ["0", "-1"]:
    case(f"split-parts-{v}", f"{SPLIT} --parts {v}", "--parts")
    case(f"split-batch-{v}", f"{SPLIT} -b {v}", "--batch-size")
case("split-parts-too-many", f"{SPLIT} --parts 1000", "1000")
case("split-one-node", "split {w}/one.onnx -o {o}/parts --parts 2", "1 node")
for v in NUM_BAD:
    case(f"split-atol-{v}", f"{SPLIT} --atol {v}", "--atol")
    case(f"split-rtol-{v}", f"{SPLIT} --rtol {v}", "--rtol")
case("split-balance-bad", f"{SPLIT} --balance speed", "speed")
case("split-cut-unknown", f"{SPLIT} --cut nosuch", "nosuch")
case("split-dim-unknown", f"{SPLIT} --dim nosuch=3", "nosuch")
case("split-output-sys", "split {w}/m.onnx -o /sys/parts", "/sys/parts")
case("split-output-file", "split {w}/m.onnx -o {w}/somefile", "somefile")
case("split-model-corrupt", "split {w}/corrupt.onnx -o {o}/parts", "corrupt.onnx")
case("split-data-corrupt", f"{SPLIT} --data {{w}}/corrupt.npz", "corrupt.npz")
case("split-int-model-bad-data", "split {w}/int.onnx -o {o}/parts --data {w}/data.npz", "data.npz")


# ---------------------------------------------------------------------------------------------
# the check


def snapshot(*roots: Path) -> set[str]:
    out = set()
    for root in roots:
        if root.exists():
            out |= {str(p) for p in root.rglob("*")}
    return out


def run_case(argv: list[str], world: Path, tmp: Path, capsys) -> tuple[int, str]:
    from onnxpipe.cli import main

    o = tmp / "o"
    args = [a.replace("{w}", str(world)).replace("{o}", str(o)) for a in argv]
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    return code, capsys.readouterr().err


@pytest.mark.parametrize("cid,argv,needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(cid, argv, needle, world, tmp_path, capsys, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("ONNXPIPE_DEVICES", "cpu")
    before = snapshot(world)
    code, err = run_case(argv, world, tmp_path, capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err, err
    assert code == 2, f"exit {code}: {err}"
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert needle.lower() in lines[0].lower(), lines[0]
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir()), list((tmp_path / "o").rglob("*"))
    assert not (tmp_path / "o").exists(), "the output folder was created"
    assert not any(cwd.iterdir()), list(cwd.iterdir())
    assert snapshot(world) == before, snapshot(world) ^ before


def test_the_corpus_is_large():
    assert len(CASES) >= 250
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("argv,needle", [
    (["validate", "{w}/m.onnx", "--atol", "nan"], "--atol"),
    (["infer", "{w}/m.onnx", "--data", "{w}/corrupt.npz", "-o", "{o}/out"], "corrupt.npz"),
    (["convert", "{w}/m.onnx", "-o", "/sys/x.onnx"], "/sys/x.onnx"),
    (["inspect", "{w}/m.onnx", "--frob"], "--frob"),
])
def test_as_a_real_subprocess(argv, needle, world, tmp_path):
    r = run_cli(*[a.replace("{w}", str(world)).replace("{o}", str(tmp_path / "o")) for a in argv], cwd=tmp_path)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr
    assert not (tmp_path / "o").exists()


def test_resume_refuses_other_data(world, tmp_path, capsys):
    """A job resumed with another data file would mix old and new rows: refused, naming both digests."""
    out = tmp_path / "job"
    code, err = run_case(["infer", "{w}/m.onnx", "--data", "{w}/data.npz", "-o", str(out), "--shard-size", "4"],
                         world, tmp_path, capsys)
    assert code == 0, err
    before = sorted(p.name for p in out.iterdir())
    code, err = run_case(["infer", "{w}/m.onnx", "--data", "{w}/data2.npz", "-o", str(out), "--resume", "--shard-size", "4"],
                         world, tmp_path, capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "other data" in lines[0] and "data2.npz" in lines[0], err
    assert sorted(p.name for p in out.iterdir()) == before
    code, err = run_case(["infer", "{w}/m.onnx", "--data", "{w}/data.npz", "-o", str(out), "--resume",
                          "--shard-size", "4"], world, tmp_path, capsys)
    assert code == 0, err


def test_data_option_feeds_bench_tune_and_split(world, tmp_path, capsys, monkeypatch):
    """--data is what bench, tune and split run the model on (real token ids or indices, not random ones)."""
    import json

    from onnxpipe.core.tensors import tile_batch

    np.testing.assert_array_equal(tile_batch({"i": np.arange(3), "t": np.ones((2, 2))}, 5)["i"], [0, 1, 2, 0, 1])
    np.save(world / "x4.npy", np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32))
    monkeypatch.chdir(tmp_path)
    code, err = run_case(["bench", "{w}/int.onnx", "--data", "{w}/idx.npz", "--batch-sizes", "1,16", "--runs", "2",
                          "--warmup", "0", "--budget", "0.01", "--json"], world, tmp_path, capsys)
    assert code == 0, err
    code, err = run_case(["split", "{w}/two.onnx", "-o", str(tmp_path / "parts"), "--data", "{w}/x4.npy", "--json"],
                         world, tmp_path, capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "parts" / "pipeline.json").read_text())["check"]["ok"]
    code, err = run_case(["tune", "{w}/int.onnx", "-o", str(tmp_path / "tuned.json"), "--data", "{w}/idx.npz",
                          "--budget-s", "3"], world, tmp_path, capsys)
    assert code == 0, err
    assert (tmp_path / "tuned.json").is_file()
