"""Styled text: a :class:`Span` is a run of text drawn in one style; chat messages become spans.

    >>> from vist2.render.spans import chat_spans
    >>> [(s.text, s.style) for s in chat_spans([{"role": "user", "content": "Hi"},
    ...                                          {"role": "assistant", "content": "Hello."},
    ...                                          {"role": "user", "content": "2+2?"}])]
    [('Hi\\n', 'user'), ('Hello.\\n', 'assistant'), ('2+2?\\n', 'question')]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Span:
    """A run of text drawn in one style (a name from ``RenderConfig.style_names``)."""

    text: str
    style: str = "plain"


_ROLE_STYLES = {"user": "user", "assistant": "assistant", "system": "plain", "question": "question"}


def chat_spans(
    messages: Sequence[Mapping[str, Any]],
    *,
    question: str = "last",
    role_styles: Mapping[str, str] | None = None,
    separator: str = "\n",
) -> list[Span]:
    """Chat messages ``[{"role": ..., "content": ...}]`` -> styled spans.

    Each message becomes one span ``content + separator`` whose style comes
    from its role (``user`` -> ``"user"``, ``assistant`` -> ``"assistant"``,
    ``system`` -> ``"plain"``, ``question`` -> ``"question"``; override with
    ``role_styles``).  With ``question="last"`` the last user message is the
    question being asked and gets the ``"question"`` style; ``question="none"``
    keeps it ``"user"``.  A message's own ``"style"`` key wins over both.
    """
    if question not in ("last", "none"):
        raise ValueError(f"chat_spans: question must be 'last' or 'none', got {question!r}")
    roles = dict(_ROLE_STYLES)
    if role_styles:
        roles.update(role_styles)
    last_user = -1
    if question == "last":
        for i, m in enumerate(messages):
            if m.get("role") == "user":
                last_user = i
    spans = []
    for i, m in enumerate(messages):
        role = m.get("role")
        content = m.get("content", "")
        if not isinstance(content, str):
            raise ValueError(f"chat_spans: message {i} content must be a string, got {type(content).__name__}")
        if "style" in m:
            style = m["style"]
        elif i == last_user:
            style = "question"
        elif role in roles:
            style = roles[role]
        else:
            raise ValueError(f"chat_spans: message {i} has unknown role {role!r} (known: {sorted(roles)})")
        spans.append(Span(content + separator, style))
    return spans

