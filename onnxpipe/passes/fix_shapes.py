"""fix-shapes: make chosen dynamic dims static (TensorRT and some quantizers prefer it)."""

from __future__ import annotations

import onnx
from pydantic import Field, PositiveInt

from onnxpipe.core.errors import InputError
from onnxpipe.core.tensors import graph_inputs
from onnxpipe.passes.base import Pass, PassConfig, PassContext, PassResult


def _set_dims(values, dims: dict[str, int], shapes: dict[str, list[int]]) -> int:
    changed = 0
    for v in values:
        if not v.type.HasField("tensor_type") or not v.type.tensor_type.HasField("shape"):
            continue
        tdims = v.type.tensor_type.shape.dim
        if v.name in shapes:
            new = shapes[v.name]
            if len(new) != len(tdims):
                raise InputError(f"fix-shapes: input {v.name!r} has rank {len(tdims)}, received shape {new}",
                                 hint="give one value per dim")
            for d, value in zip(tdims, new):
                if d.HasField("dim_value") and d.dim_value != value:
                    raise InputError(f"fix-shapes: input {v.name!r} has static dim {d.dim_value}, received {value}",
                                     hint="only dynamic dims can be fixed")
                d.Clear()
                d.dim_value = value
                changed += 1
            continue
        for d in tdims:
            if d.HasField("dim_param") and d.dim_param in dims:
                value = dims[d.dim_param]
                d.Clear()
                d.dim_value = value
                changed += 1
    return changed


class FixShapes(Pass):
    """Replace symbolic dims by values: by dim name (``dims``) or whole input shapes (``inputs``).

    Example:
        >>> FixShapes({"dims": {"batch": 1}})
        fix-shapes(dims={'batch': 1})
    """

    name = "fix-shapes"
    lazy = True  # declarations and shape inference only
    atol = 1e-5
    rtol = 1e-4

    class Config(PassConfig):
        dims: dict[str, PositiveInt] = Field(default_factory=dict)
        """Symbolic dim name -> value, applied everywhere the name appears."""
        inputs: dict[str, list[PositiveInt]] = Field(default_factory=dict)
        """Input name -> full static shape."""

    def apply(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        if not self.config.dims and not self.config.inputs:
            raise InputError("fix-shapes needs dims or inputs", hint="e.g. {dims: {batch: 1}}")
        names = {i.name for i in graph_inputs(model)}
        unknown = sorted(set(self.config.inputs) - names)
        if unknown:
            raise InputError(f"fix-shapes: {', '.join(unknown)} not an input of the model",
                             hint=f"inputs: {', '.join(sorted(names))}")
        symbolic = {d.dim_param for v in model.graph.input for d in v.type.tensor_type.shape.dim if d.dim_param}
        unknown = sorted(set(self.config.dims) - symbolic)
        if unknown:
            raise InputError(f"fix-shapes: the model has no symbolic dim {', '.join(map(repr, unknown))}",
                             hint=f"its symbolic dims: {', '.join(sorted(symbolic)) or 'none'}")
        out = onnx.ModelProto()
        out.CopyFrom(model)
        g = out.graph
        changed = _set_dims(g.input, self.config.dims, self.config.inputs)
        changed += _set_dims(g.output, self.config.dims, {})
        if not changed:
            return PassResult(model, modified=False, notes={"fixed_dims": 0})
        # stale intermediate shapes would contradict the new ones: infer them again
        del g.value_info[:]
        try:
            out = onnx.shape_inference.infer_shapes(out, strict_mode=False, data_prop=True)
        except Exception:  # noqa: BLE001 - the fixed inputs are what matters; the check runs after
            pass
        return PassResult(out, notes={"fixed_dims": changed})
