"""The example model zoo in models/: factories, data modules, accuracy, the weight cache.

The models train on first use. Here the cache points at a session tmp dir (never the user's cache),
so each model trains once per test session (~8 s CNN, ~6 s Keras, ~25 s transformer on 2 CPUs).
"""
from __future__ import annotations

import contextlib
import importlib.util
import itertools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

ZOO = Path(__file__).resolve().parent.parent / "models"
NAMES = ("digits_cnn", "keras_digits", "tiny_transformer")
INPUTS = {"digits_cnn": ("x", (1, 8, 8), np.float32),
          "keras_digits": ("x", (8, 8, 1), np.float32),
          "tiny_transformer": ("tokens", (64,), np.int64)}
MIN_ACCURACY = {"digits_cnn": 0.95, "keras_digits": 0.93, "tiny_transformer": 0.85}
HEAVY = ("torch", "tensorflow", "keras")
_counter = itertools.count()


def load_factory_module(path: Path):
    """Import a factory file the way onnxpipe does: by path, its directory on sys.path meanwhile."""
    name = f"_test_zoo_{path.parent.name}_{next(_counter)}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    parent = str(path.parent)
    added = parent not in sys.path
    if added:
        sys.path.insert(0, parent)
    try:
        spec.loader.exec_module(module)
    finally:
        if added:
            sys.path.remove(parent)
    return module


@contextlib.contextmanager
def captured_fd1():
    """Capture what is written on file descriptor 1 (Python prints and C-level writes alike)."""
    sys.stdout.flush()
    saved = os.dup(1)
    out: list[str] = []
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 1)
        try:
            yield out
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
            tmp.seek(0)
            out.append(tmp.read().decode(errors="replace"))


@pytest.fixture(scope="session")
def zoo_cache(tmp_path_factory):
    """ONNXPIPE_CACHE_DIR -> a session tmp dir, so the tests never read or write the user's cache."""
    path = tmp_path_factory.mktemp("onnxpipe_cache")
    saved = os.environ.get("ONNXPIPE_CACHE_DIR")
    os.environ["ONNXPIPE_CACHE_DIR"] = str(path)
    yield path
    if saved is None:
        os.environ.pop("ONNXPIPE_CACHE_DIR", None)
    else:
        os.environ["ONNXPIPE_CACHE_DIR"] = saved


class Built:
    def __init__(self, module, model, example, stdout: str) -> None:
        self.module, self.model, self.example, self.stdout = module, model, example, stdout


def _build(name: str) -> Built:
    module = load_factory_module(ZOO / name / "model.py")
    with captured_fd1() as out:
        model, example = module.build()
    return Built(module, model, example, out[0])


@pytest.fixture(scope="session")
def digits_cnn(zoo_cache):
    pytest.importorskip("torch")
    return _build("digits_cnn")


@pytest.fixture(scope="session")
def keras_digits(zoo_cache):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    pytest.importorskip("tensorflow")
    pytest.importorskip("keras")
    return _build("keras_digits")


@pytest.fixture(scope="session")
def tiny_transformer(zoo_cache):
    pytest.importorskip("torch")
    return _build("tiny_transformer")


@pytest.fixture
def built(request):
    return request.getfixturevalue(request.param)


def _predict(name: str, model, inputs: dict[str, np.ndarray]) -> np.ndarray:
    (value,) = inputs.values()
    if name == "keras_digits":
        return np.asarray(model(value, training=False))
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(value)).numpy()


# ----------------------------------------------------------------------------- data modules (no torch/tf)

def _load_data(name: str):
    return load_factory_module(ZOO / name / "data.py")


@pytest.mark.parametrize("name", NAMES)
def test_data_shapes_dtypes_and_split(name):
    data = _load_data(name)
    key, shape, dtype = INPUTS[name]
    batches = data.calibration()
    assert isinstance(batches, list) and batches
    assert all(list(b) == [key] for b in batches)
    assert sum(len(b[key]) for b in batches) == 256
    assert all(b[key].shape[1:] == shape and b[key].dtype == dtype and len(b[key]) <= 32 for b in batches)
    assert len(data.calibration(n=40)) == 2
    inputs, labels = data.evaluation()
    assert list(inputs) == [key]
    assert inputs[key].shape == (450, *shape) and inputs[key].dtype == dtype
    assert labels.shape == (450,) and labels.dtype == np.int64 and set(labels.tolist()) == set(range(10))
    if dtype == np.float32:
        assert 0.0 <= inputs[key].min() and inputs[key].max() <= 1.0
    else:
        assert 0 <= inputs[key].min() and inputs[key].max() <= 16
    # calibration comes from the TRAIN split, evaluation is the TEST split: no overlap
    train_inputs, train_labels = data.train_set()
    assert train_inputs[key].shape == (1347, *shape)
    np.testing.assert_array_equal(batches[0][key], train_inputs[key][:32])
    test_rows = {r.tobytes() for r in inputs[key].reshape(450, -1)}
    calib_rows = [r.tobytes() for b in batches for r in b[key].reshape(len(b[key]), -1)]
    assert sum(r in test_rows for r in calib_rows) < 5  # a few digits images are exact duplicates


@pytest.mark.parametrize("name", NAMES)
def test_data_module_imports_no_framework(name):
    code = f"""
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("zoo_data", {str(ZOO / name / "data.py")!r})
mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
mod.calibration(); mod.evaluation()
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {list(HEAVY)!r})))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1]) == []


def test_two_zoo_models_do_not_clash():
    """Every zoo dir has a data.py: each factory must get its own, whatever is loaded first."""
    code = f"""
import importlib.util, json, sys
def load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec); sys.modules[name] = mod
    parent = path.rsplit("/", 1)[0]; sys.path.insert(0, parent)
    try: spec.loader.exec_module(mod)
    finally: sys.path.remove(parent)
    return mod
zoo = {str(ZOO)!r}
mods = {{n: load(f"{{zoo}}/{{n}}/model.py", "user_" + n) for n in {list(NAMES)!r}}}
datas = {{n: load(f"{{zoo}}/{{n}}/data.py", "plain_data_" + n) for n in {list(NAMES)!r}}}
out = {{n: [m._data.__file__, {{k: list(v.shape) for k, v in m._data.evaluation()[0].items()}},
           {{k: list(v.shape) for k, v in datas[n].evaluation()[0].items()}}] for n, m in mods.items()}}
out["plain data imported"] = "data" in sys.modules
out["heavy"] = sorted(m for m in sys.modules if m.split(".")[0] in {list(HEAVY)!r})
print(json.dumps(out))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out.pop("plain data imported") is False
    assert out.pop("heavy") == []  # importing a model.py (without build()) stays light too
    for name, (data_file, shapes, plain_shapes) in out.items():
        assert Path(data_file) == ZOO / name / "data.py"
        key, shape, _ = INPUTS[name]
        assert shapes == plain_shapes == {key: [450, *shape]}


# ----------------------------------------------------------------------------- factories

@pytest.mark.slow
@pytest.mark.parametrize("built", NAMES, indirect=True)
def test_factory_builds(built):
    name = built.module.NAME
    key, shape, dtype = INPUTS[name]
    assert built.stdout == ""  # stdout may carry --json: training must not print
    assert isinstance(built.example, tuple) and len(built.example) == 1
    example = built.example[0]
    if name == "keras_digits":
        assert isinstance(example, np.ndarray)
        assert [t.name for t in built.model.inputs] == [key]
        out = np.asarray(built.model(example, training=False))
    else:
        import inspect

        import torch

        assert isinstance(example, torch.Tensor)
        assert not built.model.training
        assert all(not m.training for m in built.model.modules())
        assert list(inspect.signature(built.model.forward).parameters) == [key]
        with torch.no_grad():
            out = built.model(example).numpy()
        example = example.numpy()
    assert example.shape == (4, *shape) and example.dtype == dtype
    assert out.shape == (4, 10) and out.dtype == np.float32


@pytest.mark.slow
@pytest.mark.parametrize("built", NAMES, indirect=True)
def test_accuracy(built):
    name = built.module.NAME
    inputs, labels = built.module._data.evaluation()
    accuracy = float((_predict(name, built.model, inputs).argmax(1) == labels).mean())
    assert accuracy >= MIN_ACCURACY[name], f"{name}: {accuracy:.3f}"


@pytest.mark.slow
def test_transformer_attention_is_explicit(tiny_transformer):
    from torch import nn

    kinds = {type(m) for m in tiny_transformer.model.modules()}
    assert not kinds & {nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerEncoder}
    assert sum(isinstance(m, nn.LayerNorm) for m in tiny_transformer.model.modules()) == 5


@pytest.mark.slow
@pytest.mark.parametrize("built", NAMES, indirect=True)
def test_cache_is_reused(built, zoo_cache):
    module = built.module
    name = module.NAME
    path = module.cache_file()
    assert path.is_file() and path.parent == zoo_cache / "zoo"
    assert not [p for p in path.parent.iterdir() if ".tmp" in p.name]  # atomic write left no temp file
    assert module.TRAIN_CALLS == 1
    mtime = path.stat().st_mtime_ns
    inputs, _ = module._data.evaluation()
    # same module again, and a fresh copy of it (as a new `onnxpipe convert` run would load it)
    again, _ = module.build()
    fresh = load_factory_module(ZOO / name / "model.py")
    with captured_fd1() as out:
        reloaded, _ = fresh.build()
    assert out[0] == ""
    assert module.TRAIN_CALLS == 1 and fresh.TRAIN_CALLS == 0
    assert path.stat().st_mtime_ns == mtime
    expected = _predict(name, built.model, inputs)
    np.testing.assert_allclose(_predict(name, again, inputs), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_predict(name, reloaded, inputs), expected, rtol=1e-5, atol=1e-5)


def test_cache_dir_env_override(monkeypatch, tmp_path):
    common = load_factory_module(ZOO / "_common.py")
    monkeypatch.setenv("ONNXPIPE_CACHE_DIR", str(tmp_path))
    assert common.cache_dir() == tmp_path / "zoo"
    a = common.cache_path("m", {"code_version": 1, "lr": 0.1}, ".pt")
    assert a.parent == tmp_path / "zoo" and a.name.startswith("m-") and a.suffix == ".pt"
    assert a == common.cache_path("m", {"lr": 0.1, "code_version": 1}, ".pt")
    assert a != common.cache_path("m", {"code_version": 2, "lr": 0.1}, ".pt")
    monkeypatch.delenv("ONNXPIPE_CACHE_DIR")
    import platformdirs

    assert common.cache_dir() == Path(platformdirs.user_cache_dir("onnxpipe")) / "zoo"


def test_atomic_target_leaves_nothing_on_failure(tmp_path):
    common = load_factory_module(ZOO / "_common.py")
    final = tmp_path / "sub" / "w.weights.h5"
    with pytest.raises(RuntimeError):
        with common.atomic_target(final) as tmp:
            assert tmp.name.endswith(".weights.h5") and tmp.parent == final.parent
            tmp.write_bytes(b"partial")
            raise RuntimeError("writer failed")
    assert list(final.parent.iterdir()) == []
    with common.atomic_target(final) as tmp:
        tmp.write_bytes(b"ok")
    assert final.read_bytes() == b"ok" and list(final.parent.iterdir()) == [final]
