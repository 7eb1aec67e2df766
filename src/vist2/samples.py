"""The public-domain sample passages shipped with the package (the demo's, benchmark's and tests' text).

    >>> from vist2.samples import sample_text
    >>> sample_text("en")[:30]
    'In the beginning God created t'
"""

from importlib import resources

LANGUAGES = ("en", "zh")


def sample_text(lang: str = "en") -> str:
    """The embedded sample passage: KJV Genesis (``"en"``) or Hong Lou Meng, chapter 1 (``"zh"``)."""
    if lang not in LANGUAGES:
        raise ValueError(f"lang must be one of {LANGUAGES}, got {lang!r}")
    return resources.files("vist2").joinpath(f"data/sample_{lang}.txt").read_text(encoding="utf-8")
