"""The README's Python examples run, in order, against a real server."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import ServerHandle

README = Path(__file__).resolve().parents[2] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples() -> None:
    assert len(_python_blocks()) >= 10


@pytest.mark.slow
def test_readme_examples_run(server: ServerHandle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "readme"}
    for index, block in enumerate(_python_blocks()):
        code = (
            block.replace("127.0.0.1:50051", server.address)
            .replace("/tmp/", f"{tmp_path}/")
            .replace("weightsmith-data/", f"{server.store}/")
        )
        exec(compile(code, f"README.md block {index}", "exec"), namespace)
