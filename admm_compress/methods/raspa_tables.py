"""RASPA's published per-layer settings (papers/003, Appendix C, Tables 8-10) as arguments of
:func:`admm_compress.methods.raspa`.

``paper_setting("resnet20", "I")`` returns ``(tt_ranks, density)`` mappings keyed by the layer
names of :mod:`admm_compress.models` (``layer{g}.{b-1}.conv{c}`` for the paper's ``1{g}b{b}.conv{c}``,
``dense{g}.{l}.conv1`` for ``b{g}l{l}.conv1``), to be passed as
``raspa(tt_ranks=..., density=..., targets=list(tt_ranks))``.  The paper's "sparsity" ``s`` is
the pruned fraction of ``S``; ``density = 1 - s``.  Table 1's parameter reductions follow from
counting (``examples/raspa_table1.py``).
"""
from __future__ import annotations

__all__ = ["paper_setting", "TABLE1", "table1_flops_reduction"]

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
    less: ptflops on the exported model, ``examples/raspa_table1.py``.  (DenseNet-40's rows are
    not reproduced by this convention nor by the parameter count: Table 10's settings give
    58.1 / 68.9 % against 61.3 / 74.5 %.)
    """
    params = sum(int(r["params"]) for r in layer_costs)
    dense = sum(int(r["dense_params"]) for r in layer_costs)
    if dense <= 0:
        raise ValueError("table1_flops_reduction: no compressed layer in layer_costs")
    return 100.0 * (1.0 - params / dense)
