"""Generate the blocking `Client` (client.py) from the hand-written `AsyncClient` (_async_client.py).

The recipe of httpcore's `scripts/unasync.py`: whole-word substitutions turn
coroutines into blocking methods (`async def` -> `def`, `await x` -> `x`,
`async for`/`async with` -> `for`/`with`, `__aenter__` -> `__enter__`,
`AsyncIterator` -> `Iterator`, `AsyncTransport` -> `SyncTransport`, ...),
then loops that only re-yield become `yield from`, and ruff formats the
result. The I/O that really differs lives in `weightsmith._transport`, whose
twin classes share method names, so nothing else needs translating.

Usage:
    python scripts/unasync.py          # rewrite client.py
    python scripts/unasync.py --check  # exit 1 with a diff when client.py is stale
"""

from __future__ import annotations

import argparse
import difflib
import re
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "client" / "weightsmith"
SOURCE = PACKAGE / "_async_client.py"
TARGET = PACKAGE / "client.py"

HEADER = (
    "# Generated from _async_client.py by scripts/unasync.py: do not edit.\n"
    "# Edit _async_client.py, then run `python scripts/unasync.py` (`make test` checks they agree).\n"
)

SUBS: tuple[tuple[str, str], ...] = (
    ("AsyncClient", "Client"),
    ("AsyncTransport", "SyncTransport"),
    ("AsyncIterator", "Iterator"),
    ("An async iterator", "An iterator"),
    ("async def", "def"),
    ("async with", "with"),
    ("async for", "for"),
    ("await ", ""),
    ("__aenter__", "__enter__"),
    ("__aexit__", "__exit__"),
)
COMPILED_SUBS = [(re.compile(rf"(^|\b){regex}($|\b)"), rf"\g<1>{repl}\g<2>") for regex, repl in SUBS]
# `(await self._send(...)).model` reads `self._send(...).model` once the await is gone.
_AWAITED_ATTRIBUTE = re.compile(r"\(await ([\w.]+\(.*?\))\)\.")
# An async generator cannot `yield from`; its blocking twin should (ruff's UP028).
_YIELD_LOOP = re.compile(
    r"^(?P<indent> *)for (?P<item>\w+) in (?P<iterable>.+):\n(?P=indent)    yield (?P=item)\n"
    r"(?!(?P=indent)    \S)",
    re.MULTILINE,
)
_SINGLE_LINE_FROM_IMPORT = re.compile(r"^(from \S+ import )([\w, ]+)$")


def _sort_key(name: str) -> tuple[int, str]:
    # isort's order-by-type, as ruff applies it: CONSTANTS, Classes, functions.
    return (0 if name.isupper() else 1 if name[0].isupper() else 2, name)


def _sort_imported_names(line: str) -> str:
    match = _SINGLE_LINE_FROM_IMPORT.match(line)
    if match is None:
        return line
    names = sorted((name.strip() for name in match.group(2).split(",")), key=_sort_key)
    return match.group(1) + ", ".join(names)


def unasync_line(line: str) -> str:
    """Translate one line of the async source (without its newline) into its blocking twin."""
    line = _AWAITED_ATTRIBUTE.sub(r"\1.", line)
    for regex, repl in COMPILED_SUBS:
        line = regex.sub(repl, line)
    return _sort_imported_names(line)


def generate(source: str) -> str:
    """Return the text of client.py for the text of _async_client.py, formatted by ruff."""
    text = "".join(unasync_line(line) + "\n" for line in source.splitlines())
    text = _YIELD_LOOP.sub(r"\g<indent>yield from \g<iterable>\n", text)
    formatted = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--stdin-filename", str(TARGET), "-"],
        input=text,
        capture_output=True,
        text=True,
        check=True,
    )
    return HEADER + formatted.stdout


def main(argv: list[str] | None = None) -> int:
    """Write client.py, or with `--check` report whether it is up to date."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail with a diff instead of writing")
    args = parser.parse_args(argv)
    expected = generate(SOURCE.read_text())
    if not args.check:
        TARGET.write_text(expected)
        return 0
    actual = TARGET.read_text() if TARGET.exists() else ""
    if actual == expected:
        return 0
    sys.stdout.writelines(
        difflib.unified_diff(
            actual.splitlines(keepends=True),
            expected.splitlines(keepends=True),
            fromfile=str(TARGET.relative_to(PACKAGE.parent.parent)),
            tofile=f"{TARGET.relative_to(PACKAGE.parent.parent)} (generated)",
        )
    )
    print(f"\n{TARGET.name} is stale: run `python scripts/unasync.py`.", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
