"""Small value checks shared by the config validators (render config, sampling parameters).

A leaf module: it imports nothing from the package, so any module may use it without a cycle.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def is_int(v: Any) -> bool:
    """An integer that is not a bool; numpy integers count.

        >>> is_int(3), is_int(np.int64(3)), is_int(True), is_int(3.0)
        (True, True, False, False)
    """
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))
