"""Robust PCA with hard constraints: min_{L,S} 0.5 ||L + S - M||_F^2, rank(L) <= r, card(S) <= k.

``M = L0 + S0`` with ``L0`` a random rank-``r`` matrix and ``S0`` ``k`` spikes of magnitude up to
10 at random positions.  Known answer: ``(L0, S0)`` themselves — the objective is 0 there and,
for incoherent ``L0`` and spread-out ``S0``, the decomposition is unique (Candes et al. 2011;
GoDec, Zhou & Tao 2011).  This is RASPA's ``W = L + S`` splitting (Eq. 10-13) with a matrix
rank in place of the TT rank: one Z/U pair per component.
"""
import torch

import admm_compress as ac
from admm_compress.registry import MatrixProblemModel, Problem

NAME = "robust_pca"
DESCRIPTION = "exact: M = L0 + S0, rank(L) <= r, card(S) <= k; answer = (L0, S0)"
DEFAULTS = {"epochs": 150, "m": 40, "n": 40, "rank": 2, "density": 0.05, "steps_per_epoch": 10, "lr": 0.2,
            "tolerance": 1e-3}


def _loss(out, target):
    return 0.5 * (out - target).pow(2).sum()


def _components(model):
    from admm_compress.structure import additive_components

    comps = additive_components(model.x, "weight")
    if comps is None:
        raise RuntimeError("robust_pca: the model was not reparameterized as L + S (use an admm solver)")
    return {"L": comps[0], "S": comps[1]}


def build(seed, device, epochs, m, n, rank, density, steps_per_epoch, lr, tolerance):
    from admm_compress._validation import check_float

    check_float("density", density, low=0.0, high=1.0, low_open=True, where="robust_pca")
    g = torch.Generator().manual_seed(seed)
    L0 = torch.randn(m, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, n, generator=g,
                                                                              dtype=torch.float64)
    k = max(1, int(density * m * n))
    S0 = torch.zeros(m * n, dtype=torch.float64)
    idx = torch.randperm(m * n, generator=g)[:k]
    S0[idx] = (torch.rand(k, generator=g, dtype=torch.float64) * 2 - 1) * 10
    S0 = S0.reshape(m, n)
    M = L0 + S0
    batches = [(torch.zeros(1, dtype=torch.float64), M)] * steps_per_epoch
    model = MatrixProblemModel(m, n).to(device)
    return Problem(NAME, model, batches, batches, (1,), loss_fn=_loss, epochs=epochs, lr=lr,
                   optimizer=lambda p: torch.optim.SGD(p, lr=lr), task="exact",
                   known_answer={"L": L0.to(device), "S": S0.to(device)}, tolerance=tolerance,
                   spec=[ac.Constrain("x", ac.Sum(ac.LowRank(rank=rank), ac.Cardinality(k=k)))],
                   accepts=("lowrank", "sparse"), solver_defaults={"rho": 0.5, "rho_growth": 1.1, "rho_max": 2.0},
                   answer_fn=_components, meta={"m": m, "n": n, "rank": rank, "k": k})
