"""The example model zoo, installed as ``onnxpipe_zoo``: each folder has model.py (a factory), data.py
and a recipe."""
