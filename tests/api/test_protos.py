"""The committed generated code matches a fresh generation from protos/."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    # protoc runs in its own process: loaded next to TensorFlow it crashes.
    subprocess.run([sys.executable, str(REPO / "scripts" / "gen_protos.py"), str(tmp_path)], check=True)
    fresh = tmp_path / "weightsmith" / "v1"
    committed = REPO / "client" / "weightsmith" / "v1"
    names = sorted(p.name for p in fresh.iterdir() if p.is_file())
    assert names, "generation produced nothing"
    stale = [
        n
        for n in names
        if not (committed / n).exists() or not filecmp.cmp(fresh / n, committed / n, shallow=False)
    ]
    assert not stale, f"run `make protos`: stale generated files {stale}"


def test_buf_lint_standard_passes() -> None:
    buf = Path(sys.executable).parent / "buf"
    result = subprocess.run([str(buf), "lint"], cwd=REPO / "protos", capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "STANDARD" in (REPO / "protos" / "buf.yaml").read_text()
