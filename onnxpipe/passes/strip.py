"""strip: short names for internal tensors and nodes, no debug info, no shapes inference derives anyway.

Names are bytes in the file: on a small model they are a large share of it (ONNX Runtime's
quantizer alone adds names like ``block.conv1.weight_DequantizeLinear_Output``). Like ``strip``
on a binary, this pass keeps what runs and drops what only helps a reader; the map from new
names to old ones goes to the report, the way debug symbols go to a separate file.
"""

from __future__ import annotations

import difflib

import onnx

from onnxpipe.core.errors import InputError
from onnxpipe.core.graph import all_graphs, drop_derivable_shapes, name_bytes, strip_names, value_names
from onnxpipe.passes.base import Pass, PassConfig, PassContext, PassResult


class Strip(Pass):
    """Rename internal tensors ``t0, t1, ...`` and nodes ``n0, n1, ...``; graph inputs and outputs keep their names.

    Example:
        >>> Strip({"keep": ["logits_pre_softmax"]})
        strip(keep=['logits_pre_softmax'])
    """

    name = "strip"
    lazy = True  # names and shapes only: weights on disk stay there
    atol = 0.0  # the same graph under other names computes the same numbers
    rtol = 0.0

    class Config(PassConfig):
        keep: list[str] = []
        """Tensor or node names to leave as they are (graph inputs and outputs always are)."""
        keep_debug: bool = False
        """Keep node doc strings and node metadata (exporters put stack traces there)."""

    def apply(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        c = self.config
        graphs = list(all_graphs(model.graph))
        known = {n for g in graphs for n in value_names(g)} | {node.name for g in graphs for node in g.node}
        known.discard("")
        for name in c.keep:
            if name not in known:
                close = difflib.get_close_matches(name, sorted(known), n=3)
                raise InputError(f"strip: keep: no tensor or node named {name!r}",
                                 hint=f"did you mean {', '.join(close)}?" if close else "see the names with onnxpipe inspect")
        if len(model.training_info):
            raise InputError("strip: the model carries training info, whose algorithm refers to tensors by name",
                             hint="strip the inference model only")
        out = onnx.ModelProto()
        out.CopyFrom(model)
        before_names = name_bytes(model)
        tensors, nodes = strip_names(out, c.keep, debug=c.keep_debug)
        shapes = drop_derivable_shapes(out)
        saved = model.ByteSize() - out.ByteSize()
        ctx.log(f"strip: {len(tensors)} tensors and {len(nodes)} nodes renamed, {saved:,} bytes saved "
                f"({saved / max(model.ByteSize(), 1):.1%} of the file)")
        notes = {"tensors_renamed": len(tensors), "nodes_renamed": len(nodes), "derivable_shapes_dropped": shapes,
                 "bytes_saved": saved,
                 "name_bytes": {"before": before_names, "after": name_bytes(out)},
                 "names": {"tensors": tensors, "nodes": nodes}}
        return PassResult(out, modified=saved != 0 or bool(tensors or nodes), notes=notes)
