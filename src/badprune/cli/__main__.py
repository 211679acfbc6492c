"""``python -m badprune.cli``: the same as ``badprune-fast``."""
import sys

from . import main

sys.exit(main())
