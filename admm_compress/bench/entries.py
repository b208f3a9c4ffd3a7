"""Loading the benchmark's entry files (``problems/*.py``, ``solvers/*.py``; benchopt style) and
checking the parameters a run assigns to them (``--set key=value``).

:func:`load_problems` / :func:`load_solvers` scan the search path (:func:`search_path`), import
each file with :func:`importlib.util.spec_from_file_location` and wrap it in a
:class:`ProblemEntry` / :class:`SolverEntry`; :func:`parse_assignments` and :func:`check_params`
validate ``--set`` values before any work starts.  The entry file contract is documented in
:mod:`.registry`.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import logging
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Iterable, Mapping, Sequence

from torch import nn


from .registry import ENV_VAR, Problem, RegistryError

log = logging.getLogger("admm_compress.bench.registry")  # unchanged logger name


def _repo_root_guess() -> Path:
    return Path(__file__).resolve().parents[2]


def search_path(kind: str, extra: Sequence[str | os.PathLike] | None = None) -> list[Path]:
    """Folders searched for ``kind`` (``"problems"`` or ``"solvers"``) entry files, in order."""
    if kind not in ("problems", "solvers"):
        raise ValueError(f"kind must be 'problems' or 'solvers', got {kind!r}")
    out: list[Path] = []
    for d in extra or ():
        p = Path(d).expanduser()
        if not p.is_dir():
            raise RegistryError(f"--{kind}-dir {os.fspath(d)!r} is not a folder")
        out.append(p)
    for root in filter(None, os.environ.get(ENV_VAR, "").split(os.pathsep)):
        r = Path(root).expanduser()
        out.append(r / kind if (r / kind).is_dir() else r)
    out.append(Path.cwd() / kind)
    out.append(_repo_root_guess() / kind)
    seen, uniq = set(), []
    for p in out:
        rp = p.resolve()
        if rp not in seen and p.is_dir():
            seen.add(rp)
            uniq.append(p)
    return uniq


def _load_module(path: Path, kind: str) -> ModuleType:
    modname = f"_admm_compress_{kind}_{path.stem}_{abs(hash(str(path.resolve()))) % 10**8}"
    if modname in sys.modules:
        return sys.modules[modname]
    spec = importlib.util.spec_from_file_location(modname, path)
    if spec is None or spec.loader is None:
        raise RegistryError(f"cannot load {path}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[modname] = mod
    try:
        spec.loader.exec_module(mod)
    except Exception:
        del sys.modules[modname]
        raise
    return mod


@dataclasses.dataclass
class _Entry:
    name: str
    path: Path
    module: ModuleType | None
    error: str | None = None

    @property
    def available(self) -> bool:
        return self.module is not None and self.error is None

    @property
    def description(self) -> str:
        if self.module is None:
            return ""
        d = getattr(self.module, "DESCRIPTION", None) or (self.module.__doc__ or "").strip().split("\n")[0]
        return d


@dataclasses.dataclass
class ProblemEntry(_Entry):
    defaults: dict = dataclasses.field(default_factory=dict)

    def build(self, seed: int = 0, device: str = "cpu", **params) -> Problem:
        full = check_params(self.name, "problem", params, self.defaults)
        prob = self.module.build(seed=seed, device=device, **full)
        if not isinstance(prob, Problem):
            raise RegistryError(f"problem file {self.path} build() returned {type(prob).__name__}, "
                                f"not admm_compress.bench.registry.Problem")
        return prob


@dataclasses.dataclass
class SolverEntry(_Entry):
    params: dict = dataclasses.field(default_factory=dict)
    defaults: dict = dataclasses.field(default_factory=dict)
    kind: str = "method"
    constraint: str | None = None

    def missing_requirements(self) -> list[str]:
        """Modules named in ``REQUIRES`` that cannot be imported (checked without importing)."""
        if self.module is None:
            return []
        out = []
        for name in getattr(self.module, "REQUIRES", ()):
            try:
                found = importlib.util.find_spec(name) is not None
            except (ImportError, ValueError):
                found = False
            if not found:
                out.append(name)
        return out

    @property
    def available(self) -> bool:
        return self.module is not None and self.error is None and not self.missing_requirements()

    @property
    def why_unavailable(self) -> str:
        if self.error:
            return self.error
        miss = self.missing_requirements()
        return f"missing module(s) {', '.join(miss)}" if miss else ""

    def export(self, solver, model: nn.Module, problem: Problem, params: Mapping[str, Any]) -> nn.Module:
        """The compact model: the file's ``export`` hook, ``solver.export(model)`` or ``ac.export``."""
        hook = getattr(self.module, "export", None)
        if callable(hook):
            return hook(solver, model, problem, **params)
        own = getattr(solver, "export", None)
        if callable(own):
            return own(model)
        from ..export import export

        return export(model, solver)  # through export_spec(): what training selected

    def resolve(self, params: Mapping[str, Any], problem: Problem | None = None) -> dict:
        """Defaults < problem's solver_defaults < user's ``params``, names checked."""
        check_params(self.name, "solver", params, self.defaults)
        full = dict(self.defaults)
        if problem is not None:
            full.update({k: v for k, v in problem.solver_defaults.items() if k in self.defaults})
        full.update(params)
        return full

    def check_problem(self, problem: Problem, valid: Iterable[str] = ()) -> None:
        """Refuse a solver that does not apply to an exact problem (before any work)."""
        if not problem.is_exact:
            return
        if self.kind != "admm" or self.constraint not in problem.accepts:
            ok = ", ".join(valid) or "(none loaded)"
            raise RegistryError(f"solver {self.name!r} does not apply to the exact problem {problem.name!r} "
                                f"(it accepts admm solvers for {list(problem.accepts)}); use one of: {ok}")

    def build(self, problem: Problem | None = None, **params):
        if not self.available:
            raise RegistryError(f"solver {self.name!r} is unavailable: {self.why_unavailable}")
        full = self.resolve(params, problem)
        fn = self.module.build
        try:
            if "problem" in inspect.signature(fn).parameters:
                return fn(problem=problem, **full)
            return fn(**full)
        except (ImportError, AttributeError) as e:
            if isinstance(e, AttributeError) and "admm_compress" not in str(e):
                raise
            raise RegistryError(f"solver {self.name!r} is unavailable: {e}") from e


def _entry_name(mod: ModuleType, path: Path) -> str:
    name = getattr(mod, "NAME", path.stem)
    if not isinstance(name, str) or not name:
        raise RegistryError(f"{path}: NAME must be a non-empty string, got {name!r}")
    return name


def _scan(kind: str, extra) -> dict[str, _Entry]:
    entries: dict[str, _Entry] = {}
    for folder in search_path(kind, extra):
        for path in sorted(folder.glob("*.py")):
            if path.name.startswith("_"):
                continue
            try:
                mod = _load_module(path, kind)
            except Exception as e:  # a broken file is listed, not fatal
                name = path.stem
                if name not in entries:
                    entries[name] = (ProblemEntry if kind == "problems" else SolverEntry)(
                        name, path, None, f"{type(e).__name__}: {e}")
                continue
            name = _entry_name(mod, path)
            if name in entries:
                log.debug("%s %r in %s is shadowed by %s", kind, name, path, entries[name].path)
                continue
            if not callable(getattr(mod, "build", None)):
                raise RegistryError(f"{path}: a {kind[:-1]} file must define build(...)")
            defaults = dict(getattr(mod, "DEFAULTS", {}))
            if kind == "problems":
                entries[name] = ProblemEntry(name, path, mod, None, defaults)
            else:
                grid = dict(getattr(mod, "PARAMS", {}))
                missing = [k for k in grid if k not in defaults]
                if missing:
                    raise RegistryError(f"{path}: PARAMS names {missing} have no entry in DEFAULTS")
                for k, v in grid.items():
                    if not isinstance(v, (list, tuple)) or not v:
                        raise RegistryError(f"{path}: PARAMS[{k!r}] must be a non-empty list of values")
                kind_ = getattr(mod, "KIND", "method")
                entries[name] = SolverEntry(name, path, mod, None, grid, defaults, kind_,
                                            getattr(mod, "CONSTRAINT", None))
    return entries


def load_problems(extra: Sequence[str | os.PathLike] | None = None) -> dict[str, ProblemEntry]:
    """All problem entries found on the search path (see module docstring), by name."""
    return _scan("problems", extra)


def load_solvers(extra: Sequence[str | os.PathLike] | None = None) -> dict[str, SolverEntry]:
    """All solver entries found on the search path, by name (unavailable ones included)."""
    return _scan("solvers", extra)


# =========================================================================== parameters
def parse_value(text: str) -> Any:
    """``"3"`` -> 3, ``"0.5"`` -> 0.5, ``"true"`` -> True, ``"none"`` -> None, ``"a,b"`` ->
    a tuple of parsed values, anything else -> the string."""
    t = text.strip()
    low = t.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null"):
        return None
    if "," in t:
        return tuple(parse_value(p) for p in t.split(",") if p.strip())
    for conv in (int, float):
        try:
            return conv(t)
        except ValueError:
            pass
    return t


def parse_assignments(items: Sequence[str] | None) -> dict[str, Any]:
    """``["key=value", ...]`` -> ``{key: parse_value(value)}``; malformed items raise."""
    out: dict[str, Any] = {}
    for item in items or ():
        if "=" not in item:
            raise RegistryError(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        k = k.strip()
        if not k:
            raise RegistryError(f"--set expects key=value, got {item!r}")
        out[k] = parse_value(v)
    return out


def check_params(entry: str, kind: str, params: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict:
    """``defaults`` updated by ``params``; unknown names raise :class:`RegistryError` listing the valid
    ones (with a did-you-mean), and a non-bool value for a parameter whose default is a bool raises."""
    unknown = sorted(k for k in params if k not in defaults)
    if unknown:
        import difflib

        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, list(defaults), n=1)
            if close:
                hints.append(f"{k!r} (did you mean {close[0]!r}?)")
            else:
                hints.append(repr(k))
        raise RegistryError(f"unknown parameter(s) {', '.join(hints)} for {kind} {entry!r}; valid: "
                            f"{', '.join(sorted(defaults)) or '(none)'}")
    for k, v in params.items():  # a flag takes true/false, nothing else (`--set include_linear=x`)
        if isinstance(defaults[k], bool) and not isinstance(v, bool):
            raise RegistryError(f"parameter {k}={v!r} of {kind} {entry!r} must be true or false "
                                f"(default {defaults[k]})")
    full = dict(defaults)
    full.update(params)
    return full


def unknown_name_error(kind: str, name: str, valid: Iterable[str]) -> RegistryError:
    """The error for a typo in a problem / solver name (lists the valid names)."""
    import difflib

    valid = sorted(valid)
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return RegistryError(f"unknown {kind} {name!r}{hint}; valid {kind}s: {', '.join(valid)}")
