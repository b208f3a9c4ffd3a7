"""RASPA's published per-layer settings (papers/003, Appendix C, Tables 8-10) as arguments of
:func:`admm_compress.methods.raspa`.

``paper_setting("resnet20", "I")`` returns ``(tt_ranks, density)`` mappings keyed by the layer
names of :mod:`admm_compress.models` (``layer{g}.{b-1}.conv{c}`` for the paper's ``1{g}b{b}.conv{c}``,
``dense{g}.{l}.conv1`` for ``b{g}l{l}.conv1``), to be passed as
``raspa(tt_ranks=..., density=..., targets=list(tt_ranks))``.  The paper's "sparsity" ``s`` is
the pruned fraction of ``S``; ``density = 1 - s``.  Table 1's parameter reductions follow from
counting (``examples/raspa_table1.py``).

Which tensor the tables' ranks ``(1, r_1, r_2, 1)`` belong to is not stated; their values fix it
(:func:`table1_count`).  Both TT ranks exceed ``kh*kw = 9`` (Table 8: 10, 16, 20), so the kernel
mode is not an end mode of the tensor (Eq. 9 puts it first, which caps ``r_1`` at 9): it is the
middle mode.  Table 10's ranks for DenseNet-40 (``O = 12``) go up to 30, so the outer modes are not
``O`` and ``I`` (the ``"oki"`` layout ``(O, kh*kw, I)`` caps ``r_1`` at 12) but Eq. 9's paired
channel modes ``o_1 i_1`` and ``o_2 i_2`` (``O = o_1 o_2``, ``I = i_1 i_2``, ``d = 2``): the
``"paired"`` layout ``(o_1 i_1, kh*kw, o_2 i_2)`` with the two mode sizes as equal as the
factorizations allow (:func:`paired_modes`).  On ResNet-20/56 (square layers, and ``(2c, c)``
ones) its mode sizes are ``(O, I)``, so it counts exactly what ``"oki"`` counts; on DenseNet-40
it reproduces Table 1's FLOPs column (61.4 / 74.6 % against 61.3 / 74.5 %) and Model I's
parameter reduction (52.8 % against 52.4 %), and the first layers' ranks sit at or near
the full ranks of their modes (``b1l0``: modes ``(18, 16)``, ranks ``(18, 16)``; ``b1l3``:
``(30, 24)``, ranks ``(30, 24)``).  Model II's 65.3 % is 1.3 points above what any count of
these 36 layers can give together with its own 74.5 % FLOPs (see :func:`table1_count`).
"""
from __future__ import annotations

import math

from ..functional import tt_effective_ranks
from ..views import paired_split

__all__ = ["paper_setting", "TABLE1", "table1_flops_reduction", "paired_modes", "tt_layer_params",
           "table1_count", "TT_COUNT_LAYOUTS"]

TT_COUNT_LAYOUTS = ("oki", "paired")

# Table 1 (CIFAR-10): (params reduction %, FLOPs reduction %) of the models of Tables 8-10's
# "Model I" / "Model II" columns (matched by the accuracy both tables report, in the comments).
TABLE1 = {
    ("resnet20", "I"): (85.3, 86.1),   # 92.13 % accuracy
    ("resnet20", "II"): (70.4, 71.1),  # 92.50 %
    ("resnet56", "I"): (37.5, 39.3),   # 94.29 %
    ("resnet56", "II"): (65.6, 66.0),  # 93.91 %
    ("densenet40", "I"): (52.4, 61.3),   # 94.97 %
    ("densenet40", "II"): (65.3, 74.5),  # 94.88 %
}

_R20 = {  # Table 8, rows 11b1.conv1 .. 13b3.conv2
    "I": ([10, 8, 8, 5, 5, 5, 5, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5], 0.90),
    "II": ([16, 12, 12, 12, 10, 10, 10, (20, 16), 10, 10, 10, 10, (20, 15), 10, 10, 10, 10, 10], 0.85),
}
_R56 = {  # Table 9, rows 11b1.conv1 .. 13b9.conv2
    "I": ([16] * 18 + [(32, 20)] * 4 + [20] * 9 + [16] * 5 + [(40, 30)] * 8 + [20] + [(30, 20)] * 9, 0.8),
    "II": ([16] * 4 + [10] * 14 + [(25, 20)] * 2 + [16] * 8 + [10] * 8 + [10] * 4 + [16] * 7 + [20] * 7,
           0.85),
}
_D40 = {  # Table 10, rows b1l0.conv1 .. b3l11.conv1
    "I": ([(18, 16), (20, 18), (30, 18), (30, 24), (30, 25)] + [15] * 5 + [25] * 2
          + [30] * 4 + [15] * 5 + [20] * 3
          + [30] * 4 + [25] * 8, 0.9),
    "II": ([(18, 16), (20, 18), (20, 18), 20, 20] + [15] * 5 + [10] * 2
           + [25] * 2 + [20] * 2 + [10] * 8
           + [20] * 2 + [15] * 8 + [20] * 2, 0.9),
}


def _resnet_names(blocks: int) -> list[str]:
    return [f"layer{g}.{b}.conv{c}" for g in (1, 2, 3) for b in range(blocks) for c in (1, 2)]


def paper_setting(model: str, which: str) -> tuple[dict, dict]:
    """``(tt_ranks, density)``: ``{layer: (r1, r2)}`` and ``{layer: 1 - sparsity}`` of RASPA
    Table 8 (``"resnet20"``), 9 (``"resnet56"``) or 10 (``"densenet40"``), ``which`` in
    ``{"I", "II"}``.  Ranks ``(1, r_1, r_2, 1)`` of the tables are ``(r_1, r_2)`` of the
    ``"oki"`` layout."""
    tables = {"resnet20": (_R20, _resnet_names(3)), "resnet56": (_R56, _resnet_names(9)),
              "densenet40": (_D40, [f"dense{g}.{l}.conv1" for g in (1, 2, 3) for l in range(12)])}
    if model not in tables:
        raise ValueError(f"paper_setting: model={model!r} is not one of {sorted(tables)}")
    tab, names = tables[model]
    if which not in tab:
        raise ValueError(f"paper_setting: which={which!r} is not one of {sorted(tab)}")
    ranks, sparsity = tab[which]
    assert len(ranks) == len(names), (model, which, len(ranks), len(names))
    tt = {n: (r, r) if isinstance(r, int) else tuple(r) for n, r in zip(names, ranks)}
    return tt, {n: round(1.0 - sparsity, 10) for n in names}


def table1_flops_reduction(layer_costs: list[dict]) -> float:
    """Table 1's "FLOPs reduction" (%) of a RASPA model, by the convention that reproduces it.

    ``100 * (1 - sum(params) / sum(dense_params))`` over the compressed layers only
    (:meth:`RaspaSolver.layer_costs` rows: TT core values + kept entries of ``S`` against
    ``O I K``): every compressed layer weighted as if it ran at one common spatial size, the
    stem, the classifier and BatchNorm left out.  With Tables 8-9's settings this gives 86.1 /
    71.1 % (ResNet-20 Model I / II) and 39.4 / 66.1 % (ResNet-56), Table 1's 86.1 / 71.1 and
    39.3 / 66.0 %.  A real count weights each layer by its output positions (ResNet-20's first
    stage runs at 16x the positions of its last, where the tables compress most) and gives far
    less: ptflops on the exported model, ``examples/raspa_table1.py``.  (DenseNet-40: Table 10's
    settings give 58.1 / 68.9 % against 61.3 / 74.5 % counted on the ``"oki"`` layout, and
    61.4 / 74.6 % on the ``"paired"`` one, :func:`table1_count`.)
    """
    params = sum(int(r["params"]) for r in layer_costs)
    dense = sum(int(r["dense_params"]) for r in layer_costs)
    if dense <= 0:
        raise ValueError("table1_flops_reduction: no compressed layer in layer_costs")
    return 100.0 * (1.0 - params / dense)


def paired_modes(O: int, I: int) -> tuple[int, int]:
    """Outer mode sizes ``(o_1 i_1, o_2 i_2)`` of the ``"paired"`` layout for ``O`` outputs and
    ``I`` inputs: ``O = o_1 o_2``, ``I = i_1 i_2`` with ``|o_1 i_1 - o_2 i_2|`` smallest (the
    larger mode first on a tie), i.e. the most balanced pair of RASPA Eq. 9's channel modes
    ``(O_1 x I_1), (O_2 x I_2)``; the split :meth:`TTView.paired` trains and exports
    (:func:`~admm_compress.views.paired_split`).  ``(16, 16) -> (16, 16)``, ``(32, 16) -> (32, 16)``,
    ``(12, 24) -> (18, 16)``, ``(12, 444) -> (74, 72)``."""
    O, I = int(O), int(I)
    if O < 1 or I < 1:
        raise ValueError(f"paired_modes: O={O}, I={I}; allowed: integers >= 1")
    (o1, o2), (i1, i2) = paired_split(O, I)
    return o1 * i1, o2 * i2


def tt_layer_params(shape, ranks, layout: str = "paired") -> int:
    """TT core values of a convolution weight ``shape = (O, I, kh, kw)`` with the tables' ranks
    ``(r_1, r_2)``: ``a r_1 + K r_1 r_2 + r_2 c`` for the 3-way tensor ``(a, K, c)``, ``K = kh kw``,
    ``(a, c) = (O, I)`` (``"oki"``) or :func:`paired_modes` (``"paired"``); ranks above what a
    mode allows are capped the way TT-SVD caps them (:func:`~admm_compress.functional.tt_effective_ranks`;
    Eq. 10 keeps ``C_j(1:gamma_{j-1}, :, :, 1:gamma_j)``, all of a smaller core)."""
    if layout not in TT_COUNT_LAYOUTS:
        raise ValueError(f"tt_layer_params: layout={layout!r} is not one of {TT_COUNT_LAYOUTS}")
    O, I = int(shape[0]), int(shape[1])
    K = math.prod(int(k) for k in shape[2:])
    a, c = (O, I) if layout == "oki" else paired_modes(O, I)
    r1, r2 = tt_effective_ranks((a, K, c), tuple(ranks))
    return a * r1 + r1 * K * r2 + r2 * c


def table1_count(net, model: str, which: str, layout: str = "paired") -> dict:
    """Table 1's two reductions (%) of a Table 8-10 setting counted from the shapes of ``net``
    (an unmodified ``admm_compress.models`` network of ``model``), no training or export.

    ``params_red``: ``1 - (P - sum dense + sum compressed) / P``, ``P`` all of ``net``'s
    parameters (BatchNorm included: this reproduces ResNet-20's 85.3 / 70.4 % exactly), a compressed
    layer storing :func:`tt_layer_params` TT values + ``round(density * O I K)`` entries of ``S``.
    ``flops_red``: :func:`table1_flops_reduction` of the same layers.  Also returns ``dense``
    (``sum O I K`` of the compressed layers), ``compressed``, ``total`` (``P``) and ``rows``.

    Both reductions are functions of one number, the compressed layers' count ``C``:
    ``params_red = flops_red * dense / total``.  So a published pair that breaks this relation is
    out of reach of any count of these layers: DenseNet-40 Model II's (65.3, 74.5) needs
    ``dense / total = 0.877``, ours (and the standard k = 12 net's) is 0.859, and 74.5 % of the
    compressed layers is 64.0 % of the model; Model I's (52.4, 61.3) needs 0.855.
    """
    tt, dens = paper_setting(model, which)
    total = sum(p.numel() for p in net.parameters())
    rows = []
    for name, r in tt.items():
        shape = tuple(net.get_submodule(name).weight.shape)
        dense = math.prod(shape)
        p_tt = tt_layer_params(shape, r, layout)
        s_kept = round(dens[name] * dense)
        rows.append({"layer": name, "shape": shape, "tt_params": p_tt, "s_kept": s_kept,
                     "params": p_tt + s_kept, "dense_params": dense})
    dense = sum(r["dense_params"] for r in rows)
    comp = sum(r["params"] for r in rows)
    return {"params_red": 100.0 * (dense - comp) / total, "flops_red": table1_flops_reduction(rows),
            "dense": dense, "compressed": comp, "total": total, "rows": rows}
