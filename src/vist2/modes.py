"""The compression modes: one closed set, named once (imported without torch, for the CLI and the server).

    >>> Mode.parse("pcc") is Mode.PCC, Mode.GCC == "gcc", MODES
    (True, True, ('gcc', 'pcc', 'none'))
"""

from __future__ import annotations

from enum import Enum


class Mode(str, Enum):
    """What a request compresses. A ``str`` subclass, so ``Mode.GCC == "gcc"`` and plain strings are
    accepted wherever a mode is."""

    GCC = "gcc"  # prompt and generated text compressed (the paper's global context compression)
    PCC = "pcc"  # prompt only (the Glyph-style baseline)
    NONE = "none"  # nothing: a plain LLM

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__  # f"{Mode.GCC:5}" pads the value, as for the plain string

    @classmethod
    def parse(cls, value: "str | Mode") -> "Mode":
        """A mode from its name; ValueError naming the choices otherwise."""
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {value!r}") from None


MODES: tuple[str, ...] = tuple(m.value for m in Mode)  # the names, for argparse choices and messages
