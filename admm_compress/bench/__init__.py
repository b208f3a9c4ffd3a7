"""The benchmark harness, kept apart from the library core.

:mod:`.registry` loads the problem and solver entry files (``problems/``, ``solvers/``; benchopt
style), pre-trains the dense models and runs the baselines; the ``admm-compress`` CLI
(:mod:`admm_compress.cli`) drives it.  Nothing in the core (constraints, solver, export) imports
this package.  The old path ``admm_compress.registry`` still imports and is :mod:`.registry`.
"""
