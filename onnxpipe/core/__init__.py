"""The ground floor: everything the other floors stand on, importing none of them.

Model load/save with external data (``modelio``), atomic file writers and digests (``files``),
graph walks and opsets (``graph``), input specs, example inputs and the one feed check
(``tensors``), shape resolution (``shapes``) and cost analysis (``analysis``, the per-op rules in
``cost``), the CPU session (``session``), the one comparison
vocabulary (``compare``), the one timing loop (``timing``), data sources and metrics (``sources``,
``data``, ``metrics``), the hardware probe, user-file import, optional dependencies and errors.
Nothing here imports ``converter``, ``passes``, ``partition``, ``runtimes``, ``serve``,
``pipeline`` or ``cli`` (import-linter checks it).
"""
