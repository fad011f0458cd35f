"""The one feed check (core.tensors.feed_mismatch) that sessions, the runner, calibration and the server share."""

import numpy as np
import pytest

from onnxpipe.core.errors import InputError
from onnxpipe.core.tensors import TensorInfo, check_feeds, feed_mismatch

F32 = np.dtype("float32")
IDS = TensorInfo("ids", ["B", "S"], np.dtype("int64"))
MASK = TensorInfo("mask", ["B", "S"], np.dtype("int64"))
X = TensorInfo("x", [2, 3], F32)


def ids(*shape):
    return np.zeros(shape, np.int64)


@pytest.mark.parametrize("feeds, kind, names, text", [
    ({"ids": ids(1, 4), "mask": ids(1, 4), "q": ids(1)}, "unknown", ("q",), "unknown input(s) q: expected ids, mask"),
    ({"ids": ids(1, 4)}, "missing", ("mask",), "missing input 'mask': expected int64 [B, S]"),
    ({"ids": ids(1, 4), "mask": np.zeros((1, 4), np.int32)}, "dtype", ("mask",),
     "input 'mask': expected dtype int64, received int32"),
    ({"ids": ids(1, 4), "mask": ids(4)}, "shape", ("mask",), "input 'mask': expected shape [B, S], received [4]"),
])
def test_each_kind_names_expected_and_received(feeds, kind, names, text):
    problem = feed_mismatch(feeds, [IDS, MASK])
    assert (problem.kind, problem.names, str(problem)) == (kind, names, text)
    with pytest.raises(InputError, match=r"\(.+\)$"):  # the hint on the fix
        check_feeds(feeds, [IDS, MASK])


def test_fixed_dims_and_the_options():
    good = {"x": np.zeros((2, 3), np.float32)}
    assert feed_mismatch(good, [X]) is None
    assert check_feeds({**good}, [X])["x"] is good["x"]
    assert feed_mismatch({"x": np.zeros((2, 4), np.float32)}, [X]).kind == "shape"
    assert feed_mismatch({"x": np.zeros((2, 4), np.float32)}, [X], shapes="rank") is None
    assert feed_mismatch({"x": np.zeros((5, 2), np.float32)}, [X], shapes="none") is None
    # a fixed batch axis of 2 takes 6 samples (three batches) only when asked, and never 5
    assert feed_mismatch({"x": np.zeros((6, 3), np.float32)}, [X]).kind == "shape"
    assert feed_mismatch({"x": np.zeros((6, 3), np.float32)}, [X], batch_multiple=True) is None
    assert feed_mismatch({"x": np.zeros((5, 3), np.float32)}, [X], batch_multiple=True).kind == "shape"
    assert feed_mismatch({**good, "extra": np.ones(1)}, [X], allow_unknown=True) is None
    # dtypes compare under the caller's names (a server's wire datatypes)
    wire = feed_mismatch({"x": np.zeros((2, 3), np.float64)}, [X], dtype_name=lambda d: d.name.upper())
    assert (wire.expected, wire.received) == ("FLOAT32", "FLOAT64")


def test_symbolic_dims_agree_across_inputs_when_asked():
    feeds = {"ids": ids(2, 5), "mask": ids(2, 7)}
    assert feed_mismatch(feeds, [IDS, MASK]) is None
    problem = feed_mismatch(feeds, [IDS, MASK], same_symbols=True)
    assert problem.kind == "dims" and str(problem) == "input 'mask': expected dims S=5 (as in input 'ids'), received S=7"
    assert feed_mismatch({"ids": ids(2, 5), "mask": ids(2, 5)}, [IDS, MASK], same_symbols=True) is None
