"""The module map of the README's Layout section: moved modules and the old paths that alias them.

Every old path must be the *same module object* as its new home (so names, private ones included,
and monkeypatching behave as before the move), and the method functions must not be shadowed by
the packages that hold their code.
"""
import importlib
import subprocess
import sys

import pytest

MOVES = {
    "admm_compress.factorization": "admm_compress.methods._lorita.factorization",
    "admm_compress.methods.lorita": "admm_compress.methods._lorita.solver",
    "admm_compress.rank_selection": "admm_compress.methods._decomposable_net.rank_selection",
    "admm_compress.lowrank_autograd": "admm_compress.methods._decomposable_net.lowrank_autograd",
    "admm_compress.methods.decomposable_net": "admm_compress.methods._decomposable_net.solver",
    "admm_compress.structure": "admm_compress.parametrizations",
    "admm_compress.registry": "admm_compress.bench.registry",
}


@pytest.mark.parametrize("old, new", MOVES.items())
def test_old_path_is_the_moved_module(old, new):
    assert importlib.import_module(old) is importlib.import_module(new)


def test_old_paths_imported_first_in_a_fresh_interpreter():
    """Import order must not matter: importing the old paths first (before admm_compress.methods)
    gives the moved modules, and the method functions stay functions (one fresh interpreter)."""
    code = ("import importlib, sys\n"
            + "".join(f"import {old}\n" for old in MOVES)
            + "import admm_compress.methods as M\n"
            + "".join(f"assert sys.modules[{old!r}] is importlib.import_module({new!r})\n"
                      for old, new in MOVES.items())
            + "assert callable(M.lorita) and M.lorita.__name__ == 'lorita'\n"
            + "assert callable(M.decomposable_net) and M.decomposable_net.__name__ == 'decomposable_net'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_method_functions_are_not_shadowed_by_their_packages():
    from admm_compress import methods
    from admm_compress.methods._decomposable_net import DecomposableNetSolver
    from admm_compress.methods._lorita import LoRITaSolver

    import admm_compress.methods.lorita  # noqa: F401  (must not rebind methods.lorita to the module)
    import admm_compress.methods.decomposable_net  # noqa: F401

    assert isinstance(methods.lorita(2, 1e-4), LoRITaSolver)
    assert isinstance(methods.decomposable_net(), DecomposableNetSolver)
    import admm_compress.methods._lorita as lorita_pkg
    import admm_compress.methods._lorita.factorization as fz

    assert lorita_pkg.LoRITaSolver is LoRITaSolver and lorita_pkg.factorization is fz
    from admm_compress.methods.lorita import LoRITaSolver as old_name

    assert old_name is LoRITaSolver
