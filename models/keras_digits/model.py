"""keras_digits: a two-branch Keras 3 functional model on sklearn's 8x8 digits.

Input ``keras.Input((8, 8, 1), name="x")``: Nx8x8x1 float32 (NHWC) in [0, 1].
Branch A: Conv2D(16, 3, same, relu) -> Conv2D(32, 3, stride 2, same, relu) -> Flatten.
Branch B: Flatten -> Dense(64, relu).
Concatenate -> Dense(64, relu) -> Dense(10): **logits** (no softmax, like the torch zoo models;
apply softmax yourself for probabilities). ~47k parameters.

``build()`` trains on first use (``keras.utils.set_random_seed``, which also seeds Python's and
numpy's global generators) and caches the weights (``.weights.h5``) in
``$ONNXPIPE_CACHE_DIR/zoo`` (default ``platformdirs.user_cache_dir("onnxpipe")/zoo``).
~98 % test accuracy, ~6 s of training. Keras runs with ``verbose=0``; nothing is printed on stdout.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from onnxpipe_zoo import _common
from onnxpipe_zoo.keras_digits import data as _data

log = logging.getLogger("onnxpipe.zoo.keras_digits")

NAME = "keras_digits"
CODE_VERSION = 1  # bump when the architecture or training loop changes: it is part of the cache key
CONFIG = {"code_version": CODE_VERSION, "seed": 0, "epochs": 15, "batch": 32, "lr": 2e-3,
          "split_seed": _common.SPLIT_SEED}
TRAIN_CALLS = 0  # how many times this process trained (the tests check that the cache is reused)


def _net():
    import keras
    from keras import layers

    x = keras.Input((8, 8, 1), name="x")
    a = layers.Conv2D(16, 3, padding="same", activation="relu", name="conv_a1")(x)
    a = layers.Conv2D(32, 3, strides=2, padding="same", activation="relu", name="conv_a2")(a)
    a = layers.Flatten(name="flatten_a")(a)
    b = layers.Flatten(name="flatten_b")(x)
    b = layers.Dense(64, activation="relu", name="dense_b")(b)
    h = layers.Concatenate(name="concat")([a, b])
    h = layers.Dense(64, activation="relu", name="dense_h")(h)
    logits = layers.Dense(10, name="logits")(h)
    return keras.Model(x, logits, name="keras_digits")


def train(seed: int = 0):
    """Train a fresh model on the TRAIN split with fixed seeds; returns it."""
    global TRAIN_CALLS
    import keras

    cfg = dict(CONFIG, seed=seed)
    start = time.perf_counter()
    keras.utils.set_random_seed(seed)
    model = _net()
    model.compile(optimizer=keras.optimizers.Adam(cfg["lr"]),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    inputs, labels = _data.train_set()
    model.fit(inputs["x"], labels, batch_size=cfg["batch"], epochs=cfg["epochs"], shuffle=True, verbose=0)
    TRAIN_CALLS += 1
    log.info("trained %s in %.1f s", NAME, time.perf_counter() - start)
    return model


def cache_file() -> Path:
    """Where the trained weights are cached (depends on CONFIG and ``ONNXPIPE_CACHE_DIR``)."""
    return _common.cache_path(NAME, CONFIG, ".weights.h5")


def load_trained():
    """The trained model: from the cached weights, else trained now and cached atomically."""
    path = cache_file()
    if path.is_file():
        model = _net()
        try:
            model.load_weights(path)
            return model
        except Exception as exc:  # a corrupt or stale file: retrain and overwrite it
            log.warning("ignoring unreadable cache %s (%s)", path, exc)
    model = train(CONFIG["seed"])
    with _common.atomic_target(path) as tmp:
        model.save_weights(tmp)
    return model


def build():
    """``(model, (x,))`` with ``x`` four TEST images as a 4x8x8x1 float32 numpy array."""
    model = load_trained()
    inputs, _ = _data.evaluation()
    return model, (np.ascontiguousarray(inputs["x"][:4]),)
