"""Incremental detokenization with stop strings, for one sequence.

The text released so far never contains a stop string and never ends in half a
UTF-8 character: text that could still become (part of) a stop string, or an
incomplete byte sequence, is held back until it is decided.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

_REPLACEMENT = "\ufffd"


@dataclass(slots=True)
class TextStream:
    """Turns generated token ids into released text deltas.

    Attributes:
        tokenizer: a transformers tokenizer (``decode``).
        stop: stop strings.
        released: text handed out so far.
        stopped: a stop string was found; generation must end.
    """

    tokenizer: Any
    stop: tuple[str, ...] = ()
    ids: list[int] = field(default_factory=list)
    released: str = ""
    stopped: bool = False

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def push(self, token_id: int, final: bool = False) -> str:
        """Add one token; return the newly released text (maybe empty)."""
        self.ids.append(token_id)
        return self._release(final)

    def finish(self) -> str:
        """Release everything still held back (the sequence ended)."""
        return self._release(True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        text = self._text()
        cut = len(text)
        search_from = max(0, len(self.released) - max((len(s) for s in self.stop), default=0))
        for s in self.stop:
            if not s:
                continue
            at = text.find(s, search_from)
            if at != -1 and at < cut:
                cut = at
                self.stopped = True
        if not self.stopped and not final:
            while cut > 0 and text[cut - 1] == _REPLACEMENT:
                cut -= 1
            for s in self.stop:  # hold back a tail that may be the start of a stop string
                for k in range(min(len(s) - 1, cut), 0, -1):
                    if text[cut - k : cut] == s[:k]:
                        cut -= k
                        break
        cut = max(cut, len(self.released))
        delta = text[len(self.released) : cut]
        self.released = text[:cut]
        return delta
