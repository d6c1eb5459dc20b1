#!/usr/bin/env python3
"""Print the shell block of README.md that follows an HTML-comment marker.

README.md marks its two commands with ``<!-- main-job -->`` and
``<!-- test-command -->``; the first fenced code block after a marker is the
command. ``.ci/run`` runs exactly what this prints, and ``tests/test_readme.py``
checks that both blocks are found, so README and CI cannot drift apart.

Usage: ``python3 .ci/readme_block.py MARKER [README]`` (exit 1 if not found).
Standard library only: it runs before any virtualenv exists.
"""

from __future__ import annotations

import sys
from pathlib import Path


def readme_block(text: str, marker: str) -> str:
    """The body of the first fenced block after ``<!-- marker -->`` in ``text``.

    Raises:
        LookupError: the marker is missing, no fenced block follows it, or the block is empty.
    """
    tag = f"<!-- {marker} -->"
    lines = text.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == tag)
    except StopIteration:
        raise LookupError(f"README has no {tag} marker") from None
    body: list[str] = []
    inside = False
    for line in lines[start + 1:]:
        if line.lstrip().startswith("```"):
            if inside:
                break
            inside = True
            continue
        if inside:
            body.append(line)
    else:
        raise LookupError(f"no closed ``` block after {tag}")
    command = "\n".join(body).strip()
    if not command:
        raise LookupError(f"the block after {tag} is empty")
    return command


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 2
    readme = Path(argv[2]) if len(argv) == 3 else Path(__file__).resolve().parent.parent / "README.md"
    try:
        print(readme_block(readme.read_text(encoding="utf-8"), argv[1]))
    except (OSError, LookupError) as e:
        print(f"readme_block: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
