"""``python -m onnxpipe`` runs the command line."""

from onnxpipe.cli import main

main()
