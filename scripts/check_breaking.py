"""Check `protos/` for wire and JSON breaking changes with `buf breaking`.

Compares the working tree with a commit, `HEAD~1` unless one is given
(`check_breaking.py HEAD` checks uncommitted changes). Where that commit is not
there to compare with (outside a git checkout, a shallow clone, the first
commit) it prints why it skipped and succeeds, so a plain copy still tests.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str | None:
    """Output of a git command in the repository, or None when it fails."""
    result = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else None


def main(ref: str) -> int:
    # The common dir, not `.git`: in a linked worktree `.git` is a file.
    git_dir = _git("rev-parse", "--path-format=absolute", "--git-common-dir")
    if git_dir is None:
        print("buf breaking: skipped, not a git checkout")
        return 0
    commit = _git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
    if commit is None:
        print(f"buf breaking: skipped, no commit {ref} to compare with (first commit or shallow clone)")
        return 0
    buf = Path(sys.executable).parent / "buf"
    against = f"{git_dir}#ref={commit},subdir=protos"
    result = subprocess.run([str(buf), "breaking", "--against", against], cwd=REPO / "protos")
    if result.returncode == 0:
        print(f"buf breaking: no breaking change against {ref} ({commit[:12]})")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "HEAD~1"))
