"""Multiply-accumulates, parameters and latency of a model.

MACs are counted with `ptflops <https://github.com/sovrasov/flops-counter.pytorch>`_ and the
backend is always named explicitly (``ptflops.get_model_complexity_info(..., backend=...)``):

``"aten"``
    Counts the ATen matrix products and convolutions dispatched while the model runs one
    input of batch size 1 (``aten.mm / matmul / addmm / bmm / convolution``, bias included).
    Normalization, activations and pooling cost nothing.  This reproduces the ResNet baselines
    of LRPET, LoRITa and TRP (ResNet-56: 125.49 M MACs).  Works for any module made of standard
    ops, custom ones included.
``"pytorch"``
    Module hooks: ``nn.Conv*``, ``nn.Linear``, BatchNorm / LayerNorm (2 MACs per element when
    affine), activations, pooling, plus patched functionals (``F.relu``, ``torch.matmul``, ...).
    This reproduces LoRITa's VGG-16 figure (314.59 M; ptflops 0.7.5 gives 314.83 M).  With
    ``count_functional=True`` (the ptflops default) the functional calls made *inside*
    ``nn.ReLU`` / ``nn.MaxPool2d`` / ... modules are counted a second time, on top of the module
    hook (ptflops issue #139); ``count_functional=False`` counts module hooks only, but then
    ``torch.matmul`` in attention is not counted either.  A module type ptflops does not know
    counts 0 MACs: :func:`complexity` therefore raises for any module that owns parameters it
    *multiplies* (they reach a matrix product or convolution, seen by a
    :class:`~torch.utils._python_dispatch.TorchDispatchMode` during the count) but received no
    count, instead of returning a silently wrong number.  Parameters that are only added,
    concatenated or looked up (a ViT's class token and position embedding, an embedding
    table) cost no MACs and raise nothing.  Register a counter for such a type with
    :func:`register_counter`.  ``nn.MultiheadAttention`` is counted by ptflops' hook (products,
    q scaling, softmax); the functionals its unfused path calls are not counted again.

Attention: in eval mode PyTorch runs ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer``
through fused kernels and ``F.scaled_dot_product_attention`` through fused SDPA kernels, whose
products no ATen counter sees.  The ``"aten"`` backend and :func:`torch_macs` therefore count
with the MHA fast path disabled and SDPA on its math backend (same function, every product an
``addmm`` / ``bmm``); ``baddbmm`` and the fused SDPA ops get counters as well.

Parametrized modules (:mod:`torch.nn.utils.parametrize`, e.g. a LoRITa factor product or a
masked weight) are counted as the layer they parametrize, with the **dense** weight shape
(``in_features x out_features`` or ``out x in x kh x kw``): that is the cost of the layer at
inference once the parametrization is collapsed.  The parametrized tensors are computed once
inside :func:`torch.nn.utils.parametrize.cached` before counting, so the cost of building the
weight (e.g. the factor product) is not counted by either backend.  Parameters are counted as
they are stored (the factors of a parametrization, not the dense weight).

Parameters are all the distinct parameters of the model (ptflops counts only those with
``requires_grad``; the two agree unless something is frozen), except that a registered counter
may give the parameter count of its module type (``params_fn``), e.g. the nonzeros of a sparse
layer.

Counting runs one forward pass on a zero input of shape ``(1, *input_size)`` with the model's
dtype and device (``input_dtype=torch.long`` for token ids, or ``input_constructor`` for
several or keyword inputs), in eval mode; the train/eval flags of all modules are restored
afterwards.
The ptflops ``pytorch`` backend patches ``torch.nn.functional`` globally while it runs, so do
not count in several threads at once.  Nothing is printed: ptflops output is captured and sent
to this module's logger at DEBUG level.

Size (~710 lines, half of it this docstring and the per-backend notes): one public function over
two ptflops backends whose helpers share the counter registry and the dispatch-mode probe that
refuses silent zero counts; latency and input building live in :mod:`.latency` / :mod:`._model_io`.
"""
from __future__ import annotations

import contextlib
import fnmatch
import io
import logging
import numbers
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize

from ._model_io import (_build_input, _call, _check_input_options, _check_input_size, _check_model,
                        _dtype_device, _runner)
from ._validation import check_choice
from .latency import Latency, latency  # noqa: F401  (re-exported: admm_compress.complexity.latency)

__all__ = ["Complexity", "Latency", "complexity", "latency", "register_counter",
           "unregister_counter", "registered_counters", "torch_macs", "BACKENDS"]

logger = logging.getLogger(__name__)

BACKENDS = ("pytorch", "aten")

MacsFn = Callable[[nn.Module, tuple, Any], int]
ParamsFn = Callable[[nn.Module], int]


@dataclass(frozen=True)
class _Counter:
    macs_fn: MacsFn
    params_fn: ParamsFn | None = None


_COUNTERS: dict[type, _Counter] = {}


# ----------------------------------------------------------------------------- registry
def register_counter(module_cls: type, macs_fn: MacsFn, params_fn: ParamsFn | None = None) -> None:
    """Teach :func:`complexity` (``backend="pytorch"``) the cost of a custom module type.

    Parameters
    ----------
    module_cls : type
        A subclass of :class:`torch.nn.Module`.  Subclasses of ``module_cls`` use the same
        counter unless they are registered themselves.
    macs_fn : callable
        ``macs_fn(module, inputs, output) -> int``: the multiply-accumulates of one forward call
        (``inputs`` is the tuple of positional inputs; :func:`complexity` uses batch size 1).
        The module's children are **not** counted separately: the counter covers its subtree.
    params_fn : callable, optional
        ``params_fn(module) -> int``: parameter count of the module and its subtree (e.g. the
        nonzeros of a sparse layer).  Default: its stored parameters.

    Registering a type again replaces its counter.
    """
    if not (isinstance(module_cls, type) and issubclass(module_cls, nn.Module)):
        raise TypeError(f"module_cls must be a subclass of torch.nn.Module, got {module_cls!r}")
    if not callable(macs_fn):
        raise TypeError(f"macs_fn must be callable (module, inputs, output) -> int, got {macs_fn!r}")
    if params_fn is not None and not callable(params_fn):
        raise TypeError(f"params_fn must be callable (module) -> int or None, got {params_fn!r}")
    _COUNTERS[module_cls] = _Counter(macs_fn, params_fn)


def unregister_counter(module_cls: type) -> None:
    """Remove the counter registered for ``module_cls`` (``KeyError`` if there is none)."""
    if module_cls not in _COUNTERS:
        raise KeyError(f"no counter registered for {module_cls!r}; registered: "
                       f"{sorted(c.__name__ for c in _COUNTERS)}")
    del _COUNTERS[module_cls]


def registered_counters() -> dict[type, tuple[MacsFn, ParamsFn | None]]:
    """A copy of the registry: ``{module_cls: (macs_fn, params_fn)}``."""
    return {k: (v.macs_fn, v.params_fn) for k, v in _COUNTERS.items()}


# ----------------------------------------------------------------------------- results
@dataclass(frozen=True)
class Complexity:
    """MACs and parameters of one model for one input size.

    Attributes
    ----------
    macs : int
        Multiply-accumulates of one forward pass on one sample.
    params : int
        Number of parameters (see module docstring).
    backend : str
        ptflops backend used (``"pytorch"`` or ``"aten"``).
    input_size : tuple of int
        Input shape without the batch dimension.
    per_module : dict
        ``{module name: MACs}`` for every module ptflops counted with a hook
        (``"pytorch"`` backend only; empty for ``"aten"``).
    unattributed_macs : int
        MACs ptflops counted outside module hooks (patched functionals and tensor ops such as
        ``torch.matmul`` in attention); ``macs = sum(per_module) + unattributed_macs``.
    """

    macs: int
    params: int
    backend: str
    input_size: tuple
    per_module: dict = field(default_factory=dict, compare=False, repr=False)
    unattributed_macs: int = 0

    def reduction(self, baseline: "Complexity") -> dict:
        """Percent drop of MACs and parameters relative to ``baseline``:
        ``{"macs": 100 (1 - macs / baseline.macs), "params": ...}``."""
        if not isinstance(baseline, Complexity):
            raise TypeError(f"baseline must be a Complexity, got {type(baseline).__name__}")
        if baseline.backend != self.backend:
            raise ValueError(f"baseline was counted with backend={baseline.backend!r}, this with "
                             f"backend={self.backend!r}; compare counts of the same backend")
        if baseline.macs <= 0 or baseline.params <= 0:
            raise ValueError(f"baseline must have positive macs and params, got {baseline}")
        return {"macs": 100.0 * (1.0 - self.macs / baseline.macs),
                "params": 100.0 * (1.0 - self.params / baseline.params)}

    def __str__(self) -> str:
        return (f"{self.macs / 1e6:.2f} M MACs, {self.params / 1e6:.3f} M params "
                f"(ptflops backend={self.backend!r}, input {tuple(self.input_size)})")


# ----------------------------------------------------------------------------- helpers
def _allowed(name: str, module: nn.Module, allow_zero) -> bool:
    for a in allow_zero:
        if isinstance(a, str):
            if fnmatch.fnmatchcase(name, a):
                return True
        elif isinstance(module, a):
            return True
    return False


def _check_allow_zero(allow_zero) -> tuple:
    if allow_zero is None:
        return ()
    if isinstance(allow_zero, (str, type)):
        allow_zero = (allow_zero,)
    out = tuple(allow_zero)
    for a in out:
        if not (isinstance(a, str) or (isinstance(a, type) and issubclass(a, nn.Module))):
            raise TypeError(f"allow_zero entries must be module-name globs (str) or nn.Module "
                            f"subclasses, got {a!r}")
    return out


def _registry_lookup(cls: type, registry: Mapping[type, _Counter]) -> _Counter | None:
    for c in cls.__mro__:
        if c in registry:
            return registry[c]
    return None


def _base_of_parametrized(module: nn.Module) -> type:
    """Original class of a module that ``torch.nn.utils.parametrize`` re-classed."""
    cls = type(module)
    return cls.__bases__[0] if parametrize.is_parametrized(module) else cls


def _count_params(model: nn.Module, registry: Mapping[type, _Counter]) -> int:
    seen: set[int] = set()
    total = 0

    def walk(m: nn.Module) -> None:
        nonlocal total
        counter = _registry_lookup(_base_of_parametrized(m), registry)
        if counter is not None and counter.params_fn is not None:
            n = counter.params_fn(m)
            if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
                raise ValueError(f"params_fn for {type(m).__name__} returned {n!r}; "
                                 f"it must return an int >= 0")
            total += int(n)
            seen.update(id(p) for p in m.parameters())
            return
        for p in m.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
        for c in m.children():
            walk(c)

    walk(model)
    return total


@contextlib.contextmanager
def _counting_state(model: nn.Module):
    """Eval mode, cached parametrizations (computed here, outside any counter), restore after."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        with parametrize.cached():
            for m in model.modules():
                if parametrize.is_parametrized(m):
                    for tensor_name in m.parametrizations:
                        getattr(m, tensor_name)
            model.eval()
            yield
    finally:
        for m, flag in flags:
            m.training = flag


@contextlib.contextmanager
def _unfused_attention():
    """Run attention as plain matrix products while counting (restored afterwards).

    ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` take a fused inference kernel in
    eval mode (``aten._native_multi_head_attention``, ``aten._transformer_encoder_layer_fwd``)
    and ``F.scaled_dot_product_attention`` a fused CPU/GPU kernel; the ATen counters (ptflops'
    and :class:`torch.utils.flop_counter.FlopCounterMode`) see none of their products and count
    0.  Here the MHA fast path is disabled and SDPA runs its math backend, so every product is
    an ``aten.addmm`` / ``aten.bmm`` (same function, same MACs).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fast = torch.backends.mha.get_fastpath_enabled()
    try:
        torch.backends.mha.set_fastpath_enabled(False)
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)


def _fused_attention_macs(op):
    """An ATen counter (ptflops' ``fn(inputs, outputs)``) for a fused attention op: MACs =
    FLOPs / 2 of :mod:`torch.utils.flop_counter`'s formula (products only)."""
    from torch.utils.flop_counter import flop_registry

    flops_fn = flop_registry[op]

    def macs(inputs, outputs):
        out = outputs[0] if len(outputs) == 1 else outputs
        return int(flops_fn(*inputs, out_val=out)) // 2
    return macs


def _default_aten_hooks() -> dict:
    """ATen ops ptflops 0.7.x does not count: ``baddbmm`` (``nn.MultiheadAttention`` with a mask
    and ``need_weights``) and the fused SDPA kernels (in case one runs despite
    :func:`_unfused_attention`, e.g. called directly)."""
    from torch.utils.flop_counter import flop_registry

    aten = torch.ops.aten
    hooks = {}
    for name in ("baddbmm", "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention",
                 "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu"):
        op = getattr(aten, name, None)
        if op is not None and op in flop_registry:
            hooks[op] = _fused_attention_macs(op)
    return hooks


# ops whose inputs are multiplied (an owned parameter feeding one costs MACs somewhere)
def _mac_ops() -> frozenset:
    from ptflops.aten_ops import ATEN_OPS_MAPPING
    from torch.utils.flop_counter import flop_registry

    aten = torch.ops.aten
    extra = [getattr(aten, n, None) for n in ("addmv", "mv", "dot", "vdot", "addbmm", "linear", "einsum",
                                              "_native_multi_head_attention", "conv_tbc",
                                              "_scaled_dot_product_flash_attention_for_cpu")]
    return frozenset([*ATEN_OPS_MAPPING, *flop_registry, *(o for o in extra if o is not None)])


class _MacInputs:
    """Storages of the tensors that reach a multiplying ATen op during a forward pass.

    A parameter that only enters additions, concatenations or look-ups (a class token, a
    position embedding, an embedding table) costs no MACs; one that is multiplied does.  Used
    by the pytorch backend's "parameters but 0 counted MACs" check.
    """

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        ops = _mac_ops()
        seen = self.storages = set()

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func._overloadpacket in ops:
                    for a in list(args) + list((kwargs or {}).values()):
                        for t in (a if isinstance(a, (list, tuple)) else (a,)):
                            if isinstance(t, torch.Tensor):
                                seen.add(_storage_key(t))
                return func(*args, **(kwargs or {}))

        self.mode = Mode()

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


def _storage_key(t: torch.Tensor):
    try:
        return (t.device, t.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):  # tensors without storage (nested, functional)
        return (t.device, id(t))


@contextlib.contextmanager
def _captured_output(what: str):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        yield buf
    text = buf.getvalue().strip()
    if text:
        logger.debug("ptflops output while counting %s:\n%s", what, text)


def _first_layer_hint(model: nn.Module, input_size: tuple) -> str:
    """What the first Linear / conv layer of ``model`` expects, when ``input_size`` looks wrong."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            return (f"; its first layer '{name}' is an nn.Linear with in_features={m.in_features} (give the "
                    f"input shape without the batch dimension, e.g. ({m.in_features},) for flat inputs)")
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            d = m.weight.dim() - 2
            return (f"; its first layer '{name}' is an nn.{type(m).__name__} with in_channels={m.in_channels}, "
                    f"expecting input_size=({m.in_channels}, {', '.join(['H', 'W', 'D'][:d])}) without the "
                    f"batch dimension")
    return ""


def _ptflops_failed(model: nn.Module, input_size: tuple, backend: str, text: str):
    lines = text.strip().splitlines()
    tail = "\n".join(lines[-8:])
    last = lines[-1].strip() if lines else "(no message)"
    return RuntimeError(f"ptflops ({backend} backend) could not count {type(model).__name__} "
                        f"with input_size={input_size}: the forward pass on a zero input of "
                        f"shape (1, *input_size) = {(1, *input_size)} failed with {last!r}"
                        f"{_first_layer_hint(model, input_size)}.\nptflops' report ends with:\n{tail}")


# ----------------------------------------------------------------------------- counting
_LINEAR_ALIASES = {nn.modules.linear.NonDynamicallyQuantizableLinear: nn.Linear}

# module types whose ptflops hook counts everything they compute; the functionals ptflops
# patches (softmax, bmm, baddbmm, matmul, mul, add...) and that their unfused path calls must
# not be counted a second time
_WHOLE_COUNT = (nn.MultiheadAttention,)


@contextlib.contextmanager
def _unpatched_inside(model: nn.Module, types: tuple):
    """While a module of ``types`` runs, undo ptflops' patching of functionals / tensor ops.

    ``nn.MultiheadAttention`` off its fused path calls ``torch.baddbmm`` / ``torch.bmm`` /
    ``F.softmax``, which ``count_functional=True`` counts on top of the module's hook (the MHA
    hook already counts the products, the scaling and the softmax).
    """
    import torch.nn.functional as F

    from ptflops.pytorch_ops import FUNCTIONAL_MAPPING, TENSOR_OPS_MAPPING

    tensor_ops = {op.__name__ for op in TENSOR_OPS_MAPPING}
    patched = ([(F, fn.__name__) for fn in FUNCTIONAL_MAPPING]
               + [(torch, n) for n in tensor_ops] + [(torch.Tensor, n) for n in tensor_ops])
    saved: list = []

    def pre(module, args):
        undone = []
        for owner, name in patched:
            value = getattr(owner, name, None)
            original = getattr(value, "op", None)
            if original is not None:  # patched by ptflops: the wrapper keeps the original as .op
                undone.append((owner, name, value))
                setattr(owner, name, original)
        saved.append(undone)

    def post(module, args, output):
        for owner, name, value in saved.pop():
            setattr(owner, name, value)

    handles = []
    for m in model.modules():
        if isinstance(m, types):
            handles.append(m.register_forward_pre_hook(pre))
            handles.append(m.register_forward_hook(post))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        while saved:  # a forward that raised inside the module
            for owner, name, value in saved.pop():
                setattr(owner, name, value)


def _count_pytorch(model, input_size, registry, allow_zero, make_input, count_functional, runner=None):
    from ptflops import get_model_complexity_info
    from ptflops.pytorch_ops import MODULES_MAPPING

    names = {}
    for name, m in model.named_modules():
        names.setdefault(id(m), name or "<model>")
    per_module: dict[str, int] = defaultdict(int)
    called: set[int] = set()
    errors: list[BaseException] = []

    def wrap_ptflops(hook):
        def counted(module, inputs, output):
            try:
                before = module.__flops__
                hook(module, inputs, output)
                name = names.get(id(module), type(module).__name__)
                per_module[name] += int(module.__flops__ - before)
                called.add(id(module))
            except Exception as exc:  # noqa: BLE001 - re-raised after ptflops returns
                errors.append(exc)
                raise
        return counted

    def wrap_ours(fn, cls):
        def counted(module, inputs, output):
            try:
                macs = fn(module, inputs, output)
                if isinstance(macs, bool) or not isinstance(macs, numbers.Integral) or macs < 0:
                    raise ValueError(f"counter registered for {cls.__name__} returned {macs!r}; "
                                     f"it must return an int >= 0 (MACs of the call)")
                module.__flops__ += int(macs)
                name = names.get(id(module), type(module).__name__)
                per_module[name] += int(macs)
                called.add(id(module))
            except Exception as exc:  # noqa: BLE001 - re-raised after ptflops returns
                errors.append(exc)
                raise
        return counted

    hooks: dict[type, Callable] = {}
    for m in model.modules():
        cls = type(m)
        if cls in hooks:
            continue
        base = _base_of_parametrized(m)
        counter = _registry_lookup(base, registry)
        # nn.MultiheadAttention's out_proj is a NonDynamicallyQuantizableLinear, an nn.Linear in
        # all but name (a marker for quantization); ptflops looks types up exactly
        base = _LINEAR_ALIASES.get(base, base)
        if counter is not None:
            hooks[cls] = wrap_ours(counter.macs_fn, base)
        elif base in MODULES_MAPPING:
            hooks[cls] = wrap_ptflops(MODULES_MAPPING[base])

    what = type(model).__name__
    with _captured_output(what) as buf, _MacInputs() as multiplied, _unpatched_inside(model, _WHOLE_COUNT):
        macs, _ = get_model_complexity_info(
            runner if runner is not None else model, input_size, print_per_layer_stat=False,
            as_strings=False, input_constructor=make_input, ost=buf, verbose=False,
            custom_modules_hooks=hooks, backend="pytorch",
            backend_specific_config={"count_functional": count_functional})
    if errors:
        raise errors[0]
    if macs is None:
        raise _ptflops_failed(model, input_size, "pytorch", buf.getvalue())

    problems = []
    # a parameter shared with a counted module (a language model's head tied to its embedding
    # table) is multiplied there, and counted there
    covered = {id(p) for m in model.modules() if type(m) in hooks for p in m.parameters()}

    def walk(m: nn.Module, name: str) -> None:
        label = name or "<model>"
        if type(m) in hooks:
            # a counter that ran decides (0 is a legitimate answer of a registered counter)
            n_params = sum(p.numel() for p in m.parameters())
            if n_params and id(m) not in called and not _allowed(label, m, allow_zero):
                problems.append(f"'{label}' ({type(m).__name__}, {n_params} parameters) was never "
                                f"called in forward (its parameters are still counted)")
            return
        if parametrize.is_parametrized(m):
            n_params = sum(p.numel() for p in m.parameters())
            if n_params and not _allowed(label, m, allow_zero):
                problems.append(f"'{label}' (parametrized {_base_of_parametrized(m).__name__}, "
                                f"{n_params} parameters) has no MAC counter for the ptflops "
                                f"pytorch backend, which counts it as 0")
            return
        # only parameters that are *multiplied* cost MACs: a class token, a position embedding or
        # an embedding table (added, concatenated, looked up) is rightly counted 0
        own = [(n, p) for n, p in m.named_parameters(recurse=False)
               if _storage_key(p) in multiplied.storages and id(p) not in covered]
        if own and not _allowed(label, m, allow_zero):
            problems.append(f"'{label}' ({type(m).__name__}) multiplies parameters of its own "
                            f"({', '.join(n for n, _ in own)}: {sum(p.numel() for _, p in own)} numbers) "
                            f"but has no MAC counter for the ptflops pytorch backend, which counts it as 0")
        for child_name, child in m.named_children():
            walk(child, f"{name}.{child_name}" if name else child_name)

    walk(model, "")
    if problems:
        raise ValueError(
            "complexity(backend='pytorch'): modules with parameters but 0 counted MACs:\n  "
            + "\n  ".join(problems)
            + "\nRegister a counter with admm_compress.complexity.register_counter(<module class>, "
              "macs_fn), pass custom_hooks={<module class>: macs_fn}, count with backend='aten', "
              "or list the module in allow_zero=[...] if it truly costs no MACs.")
    per = dict(per_module)
    return int(macs), per, int(macs) - sum(per.values())


def _count_aten(model, input_size, custom_hooks, make_input, runner=None):
    from ptflops import get_model_complexity_info

    hooks = _default_aten_hooks()
    hooks.update(custom_hooks or {})
    model = runner if runner is not None else model
    # ptflops' aten engine registers forward (pre-)hooks on the model's children and never
    # removes them; remember the existing ones and remove the new ones afterwards.
    children = list(model.children())
    before = [(set(c._forward_pre_hooks), set(c._forward_hooks)) for c in children]
    what = type(model).__name__
    try:
        with _captured_output(what) as buf, _unfused_attention():
            macs, _ = get_model_complexity_info(
                model, input_size, print_per_layer_stat=False, as_strings=False,
                input_constructor=make_input, ost=buf, verbose=False,
                custom_modules_hooks=hooks, backend="aten")
    finally:
        for c, (pre, post) in zip(children, before):
            for k in set(c._forward_pre_hooks) - pre:
                del c._forward_pre_hooks[k]
            for k in set(c._forward_hooks) - post:
                del c._forward_hooks[k]
    if macs is None:
        raise _ptflops_failed(model, input_size, "aten", buf.getvalue())
    return int(macs), {}, int(macs)


def complexity(model: nn.Module, input_size, backend: str = "pytorch",
               custom_hooks: Mapping | None = None,
               allow_zero: Iterable | None = None,
               count_functional: bool = True, *,
               input_constructor: Callable | None = None,
               input_dtype: torch.dtype | None = None) -> Complexity:
    """Count the MACs and parameters of ``model`` on one input of shape ``input_size``.

    Parameters
    ----------
    model : torch.nn.Module
        Counted as is (eval mode during the count; all train/eval flags restored after).
    input_size : tuple of int
        Input shape without the batch dimension, e.g. ``(3, 32, 32)`` or ``(64,)``.
    backend : {"pytorch", "aten"}
        ptflops backend, passed explicitly (see module docstring for what each counts).
    custom_hooks : mapping, optional
        ``"pytorch"``: ``{module_cls: macs_fn}`` counters for this call only (same signature as
        :func:`register_counter`, taking precedence over the registry).  ``"aten"``: passed to
        ptflops unchanged, ``{aten op: fn(inputs, outputs) -> int}``.
    allow_zero : iterable of str or type, optional
        Module-name globs or module classes that may own parameters and count 0 MACs under the
        ``"pytorch"`` backend (e.g. ``nn.Embedding``).  Every other such module raises.
    count_functional : bool
        ``"pytorch"`` backend only: also count patched functionals and tensor ops
        (ptflops ``backend_specific_config={"count_functional": ...}``; see module docstring).
    input_constructor : callable, optional
        ``input_constructor((1, *input_size))`` returns the model's input: a tensor
        (``model(x)``), a tuple of tensors (``model(*x)``) or a dict (``model(**x)``); tensors
        are moved to the model's device.  E.g. ``lambda s: torch.randint(0, vocab, s)``.
    input_dtype : torch.dtype, optional
        Shortcut for a zero input of this dtype, e.g. ``torch.long`` for a model that starts
        with an ``nn.Embedding`` (``complexity(lm, (seq_len,), input_dtype=torch.long)``).
        Default: the model's floating dtype.

    Returns
    -------
    Complexity
        ``.macs``, ``.params`` and, for the pytorch backend, ``.per_module``.

    Raises
    ------
    ValueError
        Bad arguments; or (pytorch backend) a module owns parameters but got 0 MACs.
    RuntimeError
        The forward pass failed (the message carries ptflops' report).

    Notes
    -----
    Cost: one forward pass with batch size 1.
    """
    model = _check_model(model)
    input_size = _check_input_size(input_size)
    backend = check_choice("backend", backend, BACKENDS)
    if custom_hooks is not None and not isinstance(custom_hooks, Mapping):
        raise TypeError(f"custom_hooks must be a mapping or None, got {type(custom_hooks).__name__}")
    allow_zero = _check_allow_zero(allow_zero)
    if not isinstance(count_functional, bool):
        raise TypeError(f"count_functional must be a bool, got {count_functional!r}")
    registry = dict(_COUNTERS)
    if backend == "aten" and custom_hooks:
        bad = [k for k in custom_hooks if isinstance(k, type) and issubclass(k, nn.Module)]
        if bad:
            raise TypeError(f"custom_hooks for backend='aten' map ATen ops (torch.ops.aten.*) to "
                            f"counters; module classes {[c.__name__ for c in bad]} only work with "
                            f"backend='pytorch'")
    if backend == "pytorch" and custom_hooks:
        for cls, fn in custom_hooks.items():
            if not (isinstance(cls, type) and issubclass(cls, nn.Module)) or not callable(fn):
                raise TypeError("custom_hooks for backend='pytorch' must map nn.Module subclasses "
                                f"to callables (module, inputs, output) -> int, got {cls!r}: {fn!r}")
            registry[cls] = _Counter(fn, registry[cls].params_fn if cls in registry else None)

    _check_input_options(input_constructor, input_dtype, "complexity")
    dtype, device = _dtype_device(model)
    example = _build_input((1, *input_size), dtype, device, input_constructor, input_dtype,
                           "complexity", random=False)
    runner, example = _runner(model, example)

    def make_input(res):
        return example

    with _counting_state(model), torch.no_grad():
        if backend == "pytorch":
            macs, per_module, rest = _count_pytorch(model, input_size, registry, allow_zero,
                                                    make_input, count_functional, runner)
        else:
            macs, per_module, rest = _count_aten(model, input_size, custom_hooks, make_input, runner)
    params = _count_params(model, registry)
    result = Complexity(macs=macs, params=params, backend=backend, input_size=input_size,
                        per_module=per_module, unattributed_macs=rest)
    logger.info("complexity of %s: %s", type(model).__name__, result)
    return result


def torch_macs(model: nn.Module, input_size, *, input_constructor: Callable | None = None,
               input_dtype: torch.dtype | None = None) -> int:
    """MACs of one forward pass by :class:`torch.utils.flop_counter.FlopCounterMode`.

    PyTorch counts ``2 m n k`` FLOPs for a product of an ``m x k`` and a ``k x n`` matrix (and
    the equivalent for convolutions), without biases, normalization or activations; this
    returns FLOPs / 2.  Used to cross-check ptflops on plain convolution / linear networks and
    on attention (run unfused, as for ``complexity(backend="aten")``).  ``input_constructor`` /
    ``input_dtype`` as in :func:`complexity`.
    """
    from torch.utils.flop_counter import FlopCounterMode

    model = _check_model(model)
    input_size = _check_input_size(input_size)
    _check_input_options(input_constructor, input_dtype, "torch_macs")
    dtype, device = _dtype_device(model)
    x = _build_input((1, *input_size), dtype, device, input_constructor, input_dtype, "torch_macs",
                     random=False)
    with _counting_state(model), torch.no_grad(), _unfused_attention():
        counter = FlopCounterMode(display=False)
        with counter:
            _call(model, x)
    return int(counter.get_total_flops()) // 2
