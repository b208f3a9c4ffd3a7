"""``python -m admm_compress`` = the ``admm-compress`` command (see :mod:`admm_compress.cli`)."""
import sys

from .cli import main

sys.exit(main())
