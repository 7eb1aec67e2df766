"""``python -m vist2.serve --model DIR``: see :mod:`vist2.serve`."""

import sys

from . import main

sys.exit(main())
