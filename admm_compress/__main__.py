"""``python -m admm_compress`` = the ``admm-compress`` command (see :mod:`admm_compress.bench.cli`)."""
import sys

from .bench.cli import main

sys.exit(main())
