"""Structured channel pruning on the ONNX graph: groups, importance, selection, surgery, refit.

The ``prune`` pass (:mod:`onnxpipe.passes.prune`) drives these modules:

- :mod:`.graphview`: constants, inferred shapes, producers and consumers of a graph.
- :mod:`.groups`: channel labels traced through the graph, coupled channels merged into groups,
  anything unprovable marked unsafe; the per-op rules live in :mod:`.layers` (weights),
  :mod:`.rules` (elementwise, joins, Concat, Split, pooling, ...), :mod:`.reshape` (Flatten,
  Reshape, channel shuffle) and :mod:`.shapeops` (Pad, Resize, Slice, Tile, Expand, Shape).
- :mod:`.edits`: what pruning changes, recorded while tracing.
- :mod:`.importance`: L1/L2 group weight norms and mean activation magnitude per channel.
- :mod:`.select`: which channels each group loses (ratio, round_to, minimum, grouped convs).
- :mod:`.apply`: the graph surgery.
- :mod:`.reconstruct`: least-squares refit of the consumers on calibration data.
- :mod:`.agreement`: how the pipeline judges a pruned model against the unpruned one.
- :mod:`.report`: per-group channels, parameters and MACs, as a rich table.
"""
