"""The benchmark harness, kept apart from the library core.

:mod:`.registry` defines what an entry file builds (``Problem``, ``Baseline``) and pre-trains the
dense models (``train_dense`` = :func:`admm_compress.trainer.fit` with no compressor);
:mod:`.entries` loads the problem and solver entry files (``problems/``, ``solvers/``; benchopt
style) and checks the parameters a run assigns; the ``admm-compress`` CLI
(:mod:`admm_compress.bench.cli`, with :mod:`.run` for one run and :mod:`.compare` for the bench
command) drives it.  Nothing in the core (constraints, solver, export) imports
this package.  The old path ``admm_compress.registry`` still imports and is :mod:`.registry`.
"""
