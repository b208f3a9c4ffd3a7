"""Constraint specifications: which weights must satisfy which constraint, seen through which view.

A :class:`Constrain` binds a constraint (a set or a penalty) and a view to the weights it
selects.  Resolution against a model (:func:`resolve`) lists every bound weight as a
:class:`Binding` and refuses, before anything is trained or modified, a spec that selects
nothing, a weight selected twice, or a weight the set/view cannot handle.

Selection (``target``)
    * ``str``: a glob (:func:`fnmatch.fnmatchcase`) over fully-qualified module names, e.g.
      ``"layer*.*.conv*"``.  Only modules holding the parameter (``weight`` by default) with
      at least two dimensions are selected, so a glob never picks up a BatchNorm scale.
    * a module type (or tuple of types): every instance (``isinstance``).
    * a callable ``predicate(name, module) -> bool``.

``exclude`` removes modules by glob(s) after selection.  A DDP/DataParallel wrapper is looked
through (names are those of the wrapped model).
"""
from __future__ import annotations

import dataclasses
import fnmatch
import logging
from typing import Callable, Iterable, Sequence, Union

import torch
from torch import nn

from .sets.base import Constraint
from .views import VIEWS, View, check_module, get_view

__all__ = ["Constrain", "Binding", "resolve", "unwrap", "describe", "SpecError", "exact_glob"]

log = logging.getLogger(__name__)

Target = Union[str, type, tuple, Callable[[str, nn.Module], bool]]


class SpecError(ValueError):
    """A constraint spec that cannot be applied to the model (raised before any work)."""


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper (or itself)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the module ``name`` of ``root`` is, under every name it is registered at.

    A module held at several attributes (``self.a = self.b = nn.Linear(...)``) is listed once
    by ``named_modules()``; replacing it at one name only would leave the others as they were.
    (``nn.Module.set_submodule`` does one name and needs torch >= 2.5.)
    """
    old = root.get_submodule(name)
    names = [n for n, m in root.named_modules(remove_duplicate=False) if m is old and n] or [name]
    for n in names:
        parent_name, _, attr = n.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        setattr(parent, attr, new)


@dataclasses.dataclass(eq=False)
class Constrain:
    """Put ``constraint`` on the weights selected by ``target``.

    Parameters
    ----------
    target : str, type, tuple of types or callable
        Glob over fully-qualified module names, module type(s), or ``predicate(name, module)``.
    constraint : Constraint
        A set (hard constraint, e.g. :class:`~admm_compress.LowRank`) or a penalty
        (:class:`~admm_compress.SchattenP`).
    view : str or View, default "auto"
        How the weight becomes the matrix/tensor the constraint acts on: ``"auto"`` (Linear:
        ``(out, in)``; conv: ``"channel"`` ``(out, in*kh*kw)``), ``"channel"``, ``"spatial"``,
        ``"matrix"``, ``"identity"`` or a :class:`~admm_compress.views.View` such as ``TTView``.
    exclude : str or sequence of str, optional
        Globs of module names to leave out.
    param : str, default "weight"
        Name of the parameter on the selected modules.
    rho : float, optional
        ADMM penalty parameter for this spec (defaults to the solver's ``rho``).
    metric : {None, "bn"}
        ``"bn"``: project in the metric of the BatchNorm that consumes the layer's output
        (LRPET BN rectification, Eq. 7-10); the BN is found through the model graph.
    name : str, optional
        Label used in summaries and error messages.
    skip_unexportable : bool, default False
        What to do with a selected layer that :func:`admm_compress.export` could not turn into a
        smaller layer (a depthwise conv under low rank, a transposed conv, ...; see
        :mod:`admm_compress.exportable`).  ``False``: refuse the spec (``SpecError`` naming the
        layer, the set, the view and the fix), before any training.  ``True``: leave the layer
        unconstrained and say so once, at WARNING (the methods' default targets use this, so
        ``methods.lrpet()`` compresses a MobileNet's dense convs and skips its depthwise ones).

    Notes
    -----
    A structured :class:`~admm_compress.Cardinality` (``group_dim`` 0 or 1) on a convolution
    always groups the weight as stored, ``(out, in, *k)``: ``group_dim=1`` keeps whole input
    channels and ``0`` whole filters, whatever ``view`` says (a matrix view would group
    kernel taps instead, which export cannot remove).  An unstructured ``Cardinality`` with
    ``view="auto"`` acts on the weight as stored too (top-k of all entries does not depend on
    the reshape), so it also applies to grouped and depthwise convolutions.
    """

    target: Target
    constraint: Constraint
    view: Union[str, View] = "auto"
    exclude: Union[str, Sequence[str], None] = None
    param: str = "weight"
    rho: float | None = None
    metric: str | None = None
    name: str | None = None
    skip_unexportable: bool = False

    def __post_init__(self):
        if not isinstance(self.constraint, Constraint):
            raise TypeError(f"Constrain: constraint must be a set or penalty from admm_compress "
                            f"(LowRank, Cardinality, TTRank, SchattenP, Sum, ...), got "
                            f"{type(self.constraint).__name__}")
        if not (isinstance(self.target, (str, type, tuple)) or callable(self.target)):
            raise TypeError(f"Constrain: target must be a glob string, a module type or a "
                            f"predicate(name, module), got {self.target!r}")
        if isinstance(self.target, tuple) and not all(isinstance(t, type) for t in self.target):
            raise TypeError(f"Constrain: a tuple target must hold module types, got {self.target!r}")
        if self.rho is not None:
            from ._validation import check_float
            check_float("rho", self.rho, low=0.0, where=self.label)
        if self.metric not in (None, "bn"):
            raise ValueError(f"{self.label}: metric={self.metric!r} is not allowed; choose None or 'bn'")
        if isinstance(self.exclude, str):
            self.exclude = (self.exclude,)
        elif self.exclude is not None:
            self.exclude = tuple(self.exclude)
        if not isinstance(self.view, (str, View)):
            raise TypeError(f"{self.label}: view must be a view name or a View, got {self.view!r}")
        if isinstance(self.view, str) and self.view != "auto" and self.view not in VIEWS:
            import difflib

            known = sorted(VIEWS) + ["auto"]
            close = difflib.get_close_matches(self.view, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{self.label}: view={self.view!r} is not a known view{hint}; choose one of "
                             f"{known} or pass a View (e.g. TTView)")
        if not isinstance(self.skip_unexportable, bool):
            raise TypeError(f"{self.label}: skip_unexportable must be a bool, got {self.skip_unexportable!r}")

    @property
    def label(self) -> str:
        if self.name:
            return f"Constrain[{self.name}]"
        t = self.target
        t = t.__name__ if isinstance(t, type) else (t if isinstance(t, str) else getattr(t, "__name__", repr(t)))
        return f"Constrain({t!r}, {self.constraint!r})"

    # ---------------------------------------------------------------- select
    def _selected(self, name: str, module: nn.Module) -> bool:
        t = self.target
        if isinstance(t, str):
            p = _get_param(module, self.param)
            ok = fnmatch.fnmatchcase(name, t) and p is not None and p.dim() >= 2
        elif isinstance(t, (type, tuple)):
            ok = isinstance(module, t)
        else:
            ok = bool(t(name, module))
        if ok and self.exclude:
            ok = not any(fnmatch.fnmatchcase(name, e) for e in self.exclude)
        return ok

    def select(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """Modules (name, module) this spec selects in ``model`` (wrapper unwrapped).

        A module registered under several names is selected once, under the first of its names
        the target matches (so a glob naming only its second name selects it too).
        """
        model = unwrap(model)
        out, seen = [], set()
        for n, m in model.named_modules(remove_duplicate=False):
            if id(m) not in seen and self._selected(n, m):
                seen.add(id(m))
                out.append((n, m))
        return out


def _get_param(module: nn.Module, name: str):
    """The parameter ``name`` of ``module`` (the original tensor shape under parametrize)."""
    p = getattr(module, name, None)
    return p if isinstance(p, torch.Tensor) else None


def _storage_key(module: nn.Module, name: str) -> int:
    """Identity of the tensor behind ``module.<name>``: the same for tied weights (one
    ``Parameter`` held by several modules), also under :mod:`torch.nn.utils.parametrize`."""
    from torch.nn.utils import parametrize

    if parametrize.is_parametrized(module, name):
        plist = module.parametrizations[name]
        orig = getattr(plist, "original", None)  # original0/original1 for an unsafe multi-output one
        return id(orig) if orig is not None else id(plist)
    t = module._parameters.get(name) if name in module._parameters else None
    if t is None:
        t = module._buffers.get(name) if name in module._buffers else getattr(module, name, None)
    return id(t)


@dataclasses.dataclass(eq=False)
class Binding:
    """One constrained weight: the module, its parameter, the spec, the view."""

    name: str
    module: nn.Module
    param_name: str
    spec: Constrain
    spec_index: int
    view: View

    @property
    def key(self) -> str:
        """Fully-qualified parameter name, e.g. ``layer1.0.conv1.weight``."""
        return f"{self.name}.{self.param_name}" if self.name else self.param_name

    @property
    def constraint(self) -> Constraint:
        return self.spec.constraint

    @property
    def param(self) -> torch.Tensor:
        return getattr(self.module, self.param_name)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.param.shape)

    @property
    def viewed_shape(self) -> tuple[int, ...]:
        return tuple(self.view.viewed_shape(self.shape))

    def to_view(self, w: torch.Tensor) -> torch.Tensor:
        return self.view.to(w)

    def from_view(self, t: torch.Tensor) -> torch.Tensor:
        return self.view.back(t, self.shape)


def _as_list(spec) -> list[Constrain]:
    if isinstance(spec, Constrain):
        return [spec]
    if isinstance(spec, Iterable) and not isinstance(spec, (str, bytes)):
        spec = list(spec)
        for i, s in enumerate(spec):
            if not isinstance(s, Constrain):
                raise TypeError(f"spec[{i}] must be an admm_compress.Constrain, got {type(s).__name__}")
        if not spec:
            raise SpecError("spec is empty: give at least one Constrain(...)")
        return spec
    raise TypeError(f"spec must be a Constrain or a list of Constrain, got {type(spec).__name__}")


def resolve(spec, model: nn.Module, check_export: bool = True, warn: bool = False) -> "Bindings":
    """Bind every spec to the weights it selects in ``model``.

    ``check_export`` refuses (or, for a ``skip_unexportable`` spec, skips) every weight that
    :func:`admm_compress.export` could not turn into a smaller layer
    (:func:`admm_compress.exportable.refusal`); ``warn`` logs, at WARNING, the skipped layers
    and the layers export would keep dense (a rank at or above break-even).

    Raises
    ------
    SpecError
        A spec selects nothing; a weight is selected twice; a tied weight (one ``Parameter``
        held by several modules) is selected by two different specs (two constraints on one
        tensor cannot both hold); a selected module lacks the parameter; the view or the
        constraint cannot handle the weight's shape.  Nothing is modified when this raises.
    """
    from .exportable import refusal, shrink_warning

    specs = _as_list(spec)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model = unwrap(model)
    seen: dict[tuple[int, str], str] = {}
    tensors: dict[int, tuple[int, str, Constrain]] = {}  # storage id -> (spec index, weight key, spec)
    bindings = Bindings()
    for i, s in enumerate(specs):
        n_skipped = len(bindings.skipped)
        selected = s.select(model)
        if not selected:
            names = [n for n, m in model.named_modules() if n and _get_param(m, s.param) is not None]
            hint = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise SpecError(f"{s.label} (spec[{i}]) selects no layer of {type(model).__name__}; "
                            f"layers with a '{s.param}' are: {hint}")
        for name, module in selected:
            where = f"{s.label} on layer '{name}'"
            p = _get_param(module, s.param)
            if p is None:
                raise SpecError(f"{where}: {type(module).__name__} has no tensor parameter '{s.param}'")
            key = (id(module), s.param)
            if key in seen:
                raise SpecError(f"{where}: weight '{name}.{s.param}' is already constrained by "
                                f"{seen[key]}; a weight may be selected by one spec only "
                                f"(use exclude= or Sum(...) to combine constraints)")
            seen[key] = f"spec[{i}]"
            wkey = f"{name}.{s.param}" if name else s.param
            tid = _storage_key(module, s.param)
            if tid in tensors and tensors[tid][0] != i:
                j, other, o = tensors[tid]
                raise SpecError(f"tied weight: '{wkey}' and '{other}' are one tensor (the same Parameter), "
                                f"but '{other}' is constrained by spec[{j}] {o.label} (view {o.view!r}) and "
                                f"'{wkey}' by spec[{i}] {s.label} (view {s.view!r}); two different constraints "
                                f"on one tensor cannot both hold. Constrain both names with one spec, or "
                                f"exclude= one of them (use Sum(...) to combine sets)")
            tensors.setdefault(tid, (i, wkey, s))
            view = _natural_view(s, module, p, where)
            if check_export:
                why = refusal(module, s.param, s.constraint, view)
                if why:
                    if s.skip_unexportable:
                        bindings.skipped.append((name, why))
                        continue
                    vname = view.name if getattr(view, "layout", None) is None else f"{view.name}:{view.layout}"
                    raise SpecError(f"{where} (view {vname!r}): {why}")
            try:
                check_module(view, module, where)
                view.check(tuple(p.shape), where)
                s.constraint.check_shape(tuple(view.viewed_shape(tuple(p.shape))), where)
            except (ValueError, TypeError) as e:  # a shape the set/view cannot take: a user error
                raise SpecError(str(e) if where in str(e) else f"{where}: {e}") from None
            if check_export and warn:
                msg = shrink_warning(module, s.constraint, view, tuple(p.shape))
                if msg:
                    log.warning("%s: %s", where, msg)
            bindings.append(Binding(name, module, s.param, s, i, view))
        if len(bindings.skipped) - n_skipped == len(selected):
            name, why = bindings.skipped[-1]
            raise SpecError(f"{s.label} (spec[{i}]) selects {len(selected)} layer(s) of {type(model).__name__} "
                            f"and export could compress none of them (e.g. layer '{name}': {why})")
    if bindings.skipped and warn:
        names = [n for n, _ in bindings.skipped]
        log.warning("left unconstrained, %d layer(s) export could not compress: %s (e.g. '%s': %s); "
                    "describe() lists every reason", len(names),
                    ", ".join(names[:6]) + (", ..." if len(names) > 6 else ""), names[0],
                    bindings.skipped[0][1])
    return bindings


def exact_glob(name: str) -> str:
    """A glob (:class:`Constrain` target) matching exactly the module called ``name``
    (fnmatch's special characters ``*``, ``?``, ``[`` bracketed)."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


class Bindings(list):
    """The list of :class:`Binding` of :func:`resolve`, with ``skipped``: ``(layer, reason)`` pairs
    of layers a ``skip_unexportable`` spec selected but left unconstrained."""

    def __init__(self, *args):
        super().__init__(*args)
        self.skipped: list[tuple[str, str]] = []


def _natural_view(s: Constrain, module: nn.Module, p: torch.Tensor, where: str) -> View:
    """The view of ``s`` on ``module``'s weight; a ``Cardinality`` sees a conv weight as stored.

    Structured sparsity (``group_dim``) on a conv means its output (0) / input (1) channels
    whatever the view (a matrix view would group kernel taps); unstructured sparsity with
    ``view="auto"`` is reshape-invariant and uses the weight as stored, so grouped convs work.
    """
    from .sets import Cardinality
    from .views import VIEWS

    c = s.constraint
    if isinstance(c, Cardinality) and isinstance(module, nn.modules.conv._ConvNd) and isinstance(s.view, str):
        if c.group_dim is not None or s.view == "auto":
            return VIEWS["identity"]
    if isinstance(c, Cardinality) and s.view == "auto":
        return VIEWS["identity"]
    try:
        return get_view(s.view, tuple(p.shape))
    except (ValueError, TypeError) as e:
        raise SpecError(str(e) if where in str(e) else f"{where}: {e}") from None


def describe(bindings: Sequence[Binding]) -> str:
    """A readable table of the bound weights: layer, shape, view, viewed shape, constraint, size."""
    rows = [("layer", "shape", "view", "viewed", "constraint", "dense", "compressed")]
    for b in bindings:
        vs = b.viewed_shape
        dense = int(torch.Size(b.shape).numel())
        try:
            comp = str(b.constraint.num_params(vs))
        except (ValueError, TypeError, NotImplementedError):  # data-dependent size
            comp = "-"
        rows.append((b.key, "x".join(map(str, b.shape)), b.view.name, "x".join(map(str, vs)),
                     repr(b.constraint), str(dense), comp))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
