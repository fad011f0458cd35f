"""TensorFlow / Keras 3 sources: factory (Keras model, tf.function), SavedModel, .keras file."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from conftest import run_cli, write_factory  # noqa: E402

from onnxpipe.converter import convert  # noqa: E402
from onnxpipe.core.errors import InputError  # noqa: E402
from onnxpipe.core.session import run_model  # noqa: E402

KERAS = """
import numpy as np
import keras

def make():
    keras.utils.set_random_seed(0)
    img = keras.Input((8, 8, 1), name="img")
    aux = keras.Input((5,), name="aux")
    a = keras.layers.Flatten()(keras.layers.Conv2D(4, 3, activation="relu")(img))
    b = keras.layers.Dense(4, activation="tanh")(aux)
    joined = keras.layers.Concatenate()([a, b])
    return keras.Model([img, aux], {"logits": keras.layers.Dense(10)(joined), "feat": joined})

def build():
    rng = np.random.default_rng(0)
    return make(), (rng.random((2, 8, 8, 1), dtype=np.float32), rng.random((2, 5), dtype=np.float32))

def build_function():
    import tensorflow as tf
    w = tf.constant(np.random.default_rng(0).standard_normal((5, 3)).astype("float32"))
    @tf.function
    def f(x):
        return {"y": tf.nn.relu(tf.matmul(x, w)), "s": tf.reduce_sum(x, axis=1)}
    return f, (np.ones((4, 5), np.float32),)
"""


def test_keras_factory_two_inputs_dict_outputs(tmp_path):
    path = write_factory(tmp_path, KERAS)
    result = convert(f"{path}:build", tmp_path / "k.onnx")
    assert result.framework == "tensorflow" and result.kind == "keras"
    assert result.check.ok and {r.batch for r in result.check.runs} == {2, 4}
    model = onnx.load(tmp_path / "k.onnx")
    assert [i.name for i in model.graph.input] == ["img", "aux"]
    assert len(model.graph.output) == 2


def test_tf_function_factory(tmp_path):
    path = write_factory(tmp_path, KERAS)
    result = convert(f"{path}:build_function", tmp_path / "f.onnx")
    assert result.kind == "tf.function" and result.check.ok
    out = run_model(tmp_path / "f.onnx", {"x": np.ones((7, 5), np.float32)})
    assert sorted(v.shape for v in out.values()) == [(7,), (7, 3)]


@pytest.fixture(scope="module")
def keras_model():
    import importlib.util

    from conftest import ROOT  # noqa: F401

    spec = importlib.util.spec_from_loader("keras_factory", loader=None)
    module = importlib.util.module_from_spec(spec)
    exec(KERAS, module.__dict__)
    return module.make()


def test_savedmodel_directory(tmp_path, keras_model):
    saved = tmp_path / "saved"
    keras_model.export(str(saved), verbose=False)
    result = convert(saved, tmp_path / "s.onnx")
    assert result.kind == "savedmodel" and result.check.ok
    assert {r.batch for r in result.check.runs} == {2, 4}


def test_keras_file(tmp_path, keras_model):
    path = tmp_path / "m.keras"
    keras_model.save(str(path))
    result = convert(path, tmp_path / "m.onnx")
    assert result.kind == "keras" and result.check.ok


def test_keras_file_with_explicit_inputs(tmp_path, keras_model):
    path = tmp_path / "m.keras"
    keras_model.save(str(path))
    result = convert(path, tmp_path / "m.onnx", inputs=["img:3x8x8x1:float32", "aux:3x5:float32"])
    assert result.check.ok and result.check.runs[0].batch == 3


def test_directory_that_is_not_a_savedmodel(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = run_cli("convert", str(tmp_path / "empty"), "-o", str(tmp_path / "o.onnx"))
    assert proc.returncode == 2 and "not a TensorFlow SavedModel" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_framework_mismatch_is_an_error(tmp_path):
    path = write_factory(tmp_path, KERAS)
    with pytest.raises(InputError, match="--framework torch was given"):
        convert(f"{path}:build", tmp_path / "o.onnx", framework="torch")
