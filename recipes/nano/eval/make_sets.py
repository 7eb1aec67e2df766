"""Builds the nano model's development and test sets (dev.jsonl, test.jsonl beside this file) from
offline English texts that are not in the training corpora (KJV, WEB, the synthetic chats):

- prose written for this project: ``recipes/nano/heldout.txt`` and ``recall.txt`` (dev only);
- quotations and short literature: Debian's ``fortunes`` package (``literature`` -> dev,
  ``wisdom`` -> test), BSD-licensed;
- technical reference prose: Python's own language reference as the standard library ships it
  (``pydoc_data.topics``), topics in sorted order, the first half -> dev, the second -> test;
- legal prose: the Apache-2.0 licence text -> dev, GPL-3 -> test (Debian's common-licenses).

Recipes are chosen on dev; test is scored once per shipped model (bench/notes/nano.md). The files
are committed, so a machine without the fortunes package still has them; rerun to rebuild:

    apt-get install fortunes && python recipes/nano/eval/make_sets.py
"""

from __future__ import annotations

import json
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
FORTUNES = Path("/usr/share/games/fortunes")
LICENSES = Path("/usr/share/common-licenses")
LIMIT = 30_000  # characters per genre and set: ~3,700 8-token targets each with --stride 8


def fortunes(name: str) -> str:
    """The fortune file's entries, one paragraph each, tab indents dropped."""
    entries = (FORTUNES / name).read_text(encoding="utf-8", errors="replace").split("\n%\n")
    return "\n\n".join(re.sub(r"^\t+", "", e.strip("\n"), flags=re.M) for e in entries if e.strip())


def reference(half: int) -> str:
    from pydoc_data.topics import topics

    keys = sorted(topics)
    part = keys[: len(keys) // 2] if half == 0 else keys[len(keys) // 2 :]
    return "\n\n".join(topics[k].strip() for k in part)


def cut(text: str, limit: int = LIMIT) -> str:
    """At most ``limit`` characters, ending on a paragraph break."""
    if len(text) <= limit:
        return text
    return text[: text.rfind("\n\n", 0, limit)]


def main() -> None:
    nano = HERE.parent
    sets = {
        "dev": [("heldout", (nano / "heldout.txt").read_text(encoding="utf-8")),
                ("recall", (nano / "recall.txt").read_text(encoding="utf-8")),
                ("fortunes-literature", cut(fortunes("literature"))),
                ("python-reference-a", cut(reference(0))),
                ("apache-2.0", cut((LICENSES / "Apache-2.0").read_text(encoding="utf-8")))],
        "test": [("fortunes-wisdom", cut(fortunes("wisdom"))),
                 ("python-reference-b", cut(reference(1))),
                 ("gpl-3", cut((LICENSES / "GPL-3").read_text(encoding="utf-8")))],
    }
    for name, docs in sets.items():
        path = HERE / f"{name}.jsonl"
        with path.open("w", encoding="utf-8") as f:
            for source, text in docs:
                f.write(json.dumps({"source": source, "text": text}, ensure_ascii=False) + "\n")
        print(f"{path.name}: " + ", ".join(f"{s} {len(t):,}" for s, t in docs) + " characters")


if __name__ == "__main__":
    main()
