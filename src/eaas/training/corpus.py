"""Training text that ships with every Python: ``pydoc_data.topics`` and stdlib docstrings.

No download: ``pydoc_data.topics`` holds the language reference topics that
``help()`` shows (~465,000 characters on Python 3.11), and the docstrings of the
standard library's own modules add ~1.5 million more. A document is one topic or
one docstring; the held-out split is by document, chosen by a seeded hash of its
text, so the same text and seed give the same split on every machine.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from eaas.errors import ConfigError

SOURCES = ("topics", "topics+docstrings")
"""What :func:`load_corpus` can read: the pydoc topics alone, or with stdlib docstrings."""

SKIP_STDLIB_DIRS = frozenset({"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo", "tkinter"})
"""Stdlib folders left out: test suites, GUI code and installed third-party packages."""

MIN_DOCSTRING_CHARS = 40
"""Shorter docstrings ("Return self.") teach nothing and are left out."""


@dataclass(frozen=True, slots=True)
class Corpus:
    """Documents split into training and held-out parts.

    Attributes:
        train: training documents, in a fixed order.
        held_out: held-out documents (never trained on), in a fixed order.
        source: the :data:`SOURCES` entry they came from.
    """

    train: tuple[str, ...]
    held_out: tuple[str, ...]
    source: str

    @property
    def chars(self) -> tuple[int, int]:
        """(training, held-out) characters."""
        return sum(map(len, self.train)), sum(map(len, self.held_out))


def pydoc_topics() -> list[str]:
    """The ``pydoc_data.topics`` entries as documents (``"title\\n\\ntext"``), sorted by title."""
    from pydoc_data.topics import topics

    return [f"{name}\n\n{text.strip()}" for name, text in sorted(topics.items()) if text.strip()]


@functools.lru_cache(maxsize=4)
def stdlib_docstrings(root: Path | None = None, min_chars: int = MIN_DOCSTRING_CHARS) -> tuple[str, ...]:
    """Module, class and function docstrings of the standard library's ``.py`` files.

    The files are parsed with :mod:`ast`, never imported. Files are read in sorted
    path order, nodes in :func:`ast.walk` order, so the list is deterministic for a
    given Python version. Memoised (parsing the stdlib takes seconds).

    Args:
        root: the stdlib folder (default: ``sysconfig.get_paths()["stdlib"]``).
        min_chars: shortest docstring kept.
    """
    root = Path(root or sysconfig.get_paths()["stdlib"])
    out: list[str] = []
    for path in sorted(root.rglob("*.py")):
        if SKIP_STDLIB_DIRS.intersection(path.relative_to(root).parts[:-1]):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    out.append(doc)
    return tuple(out)


def _held_out_key(doc: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by the document's text and the seed."""
    digest = hashlib.sha256(f"{seed}\0{doc}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_held_out(docs: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Split documents into (train, held_out) by a seeded hash of each document.

    Raises:
        ConfigError: ``fraction`` is not in (0, 1), or a side would be empty.
    """
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"held-out fraction {fraction!r} must be in (0, 1)")
    train, held = [], []
    for doc in docs:
        (held if _held_out_key(doc, seed) < fraction else train).append(doc)
    if not train or not held:
        raise ConfigError(f"{len(docs)} documents at held-out fraction {fraction} leave one side empty")
    return train, held


def load_corpus(source: str = "topics+docstrings", *, held_out_fraction: float = 0.05, seed: int = 0,
                max_documents: int | None = None) -> Corpus:
    """Read the documents of ``source`` and split them.

    Args:
        source: one of :data:`SOURCES`.
        held_out_fraction: share of documents held out (by a seeded hash).
        seed: the split's seed.
        max_documents: keep only the first N documents (tiny budgets in tests).

    Raises:
        ConfigError: unknown source, or a split that leaves a side empty.
    """
    if source not in SOURCES:
        raise ConfigError(f"unknown corpus source {source!r}: expected one of {', '.join(SOURCES)}")
    docs = pydoc_topics()
    if source == "topics+docstrings":
        docs += list(stdlib_docstrings())
    if max_documents is not None:
        docs = docs[:max_documents]
    train, held = split_held_out(docs, held_out_fraction, seed)
    return Corpus(tuple(train), tuple(held), source)
