"""The client distribution stays light: no TensorFlow, a sorted public surface."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import weightsmith

REPO = Path(__file__).resolve().parents[2]


def test_import_weightsmith_does_not_import_tensorflow() -> None:
    code = (
        "import sys, weightsmith; c = weightsmith.Client('127.0.0.1:1'); c.close(); "
        "print(sorted(m for m in sys.modules "
        "if m.split('.')[0] in ('tensorflow', 'keras', 'weightsmith_server')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_base_dependencies_are_client_only() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = {d.split(">")[0].split("=")[0].split("<")[0].strip() for d in project["dependencies"]}
    assert names == {"grpcio", "grpcio-status", "protobuf", "numpy"}
    assert any(d.startswith("tensorflow==") for d in project["optional-dependencies"]["server"])
    assert any(d.startswith("tensorflow[and-cuda]") for d in project["optional-dependencies"]["gpu"])


def test_public_surface_is_sorted_and_complete() -> None:
    assert weightsmith.__all__ == sorted(weightsmith.__all__)
    for name in weightsmith.__all__:
        assert hasattr(weightsmith, name), name


def test_client_never_imports_tensorflow_in_source() -> None:
    for path in (REPO / "client" / "weightsmith").rglob("*.py"):
        text = path.read_text()
        assert "import tensorflow" not in text and "import keras" not in text, path
