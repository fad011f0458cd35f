"""The example model zoo: each folder has model.py (a factory), data.py and a recipe."""
