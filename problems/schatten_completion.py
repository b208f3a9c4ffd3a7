"""Schatten-p matrix completion (the LoRITa supplement's citation 1: "Low-Rank Matrix Recovery via
Efficient Schatten p-Norm Minimization", AAAI 2021, problem (8)).

    min_X  0.5 ||P_Omega(X - T)||_F^2 + lam * ||X||_{S_p}^p          (penalized form of (8))

``T`` is a random rank-``r`` matrix, ``Omega`` a Bernoulli(``observed``) sample of its entries.
Known answer: the planted ``T`` (exact recovery up to the penalty's bias, which is small for
``p < 1`` because ``d/ds s^p`` vanishes on large singular values — the reason the paper prefers
``p < 1`` to the nuclear norm).  Accepted: relative error <= ``tolerance`` and the numerical rank
of the solution equals ``r``.  ADMM: W-step = SGD on the data term + ``rho/2 ||X - Z + U||^2``,
Z-step = the exact Schatten-p prox (:class:`admm_compress.SchattenP`).
"""
import torch

import admm_compress as ac
from admm_compress.registry import MatrixProblemModel, Problem

NAME = "schatten_completion"
DESCRIPTION = "exact: Schatten-p (p=1/2) matrix completion of a rank-r matrix from 50% of its entries; answer = T"
DEFAULTS = {"epochs": 100, "m": 40, "n": 40, "rank": 2, "observed": 0.5, "p": 0.5, "lam": 2.0,
            "steps_per_epoch": 10, "lr": 0.5, "tolerance": 5e-2}


def build(seed, device, epochs, m, n, rank, observed, p, lam, steps_per_epoch, lr, tolerance):
    from admm_compress._validation import check_float

    check_float("observed", observed, low=0.0, high=1.0, low_open=True, where="schatten_completion")
    g = torch.Generator().manual_seed(seed)
    T = torch.randn(m, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, n, generator=g,
                                                                             dtype=torch.float64)
    mask = (torch.rand(m, n, generator=g, dtype=torch.float64) < observed).to(torch.float64).to(device)

    def loss(out, target):
        return 0.5 * ((out - target) * mask).pow(2).sum()

    batches = [(torch.zeros(1, dtype=torch.float64), T)] * steps_per_epoch
    model = MatrixProblemModel(m, n).to(device)
    return Problem(NAME, model, batches, batches, (1,), loss_fn=loss, epochs=epochs, lr=lr,
                   optimizer=lambda prm: torch.optim.SGD(prm, lr=lr), task="exact",
                   known_answer={"x.weight": T.to(device)}, tolerance=tolerance,
                   spec=[ac.Constrain("x", ac.SchattenP(p=p, weight=lam))], accepts=("lowrank",),
                   solver_defaults={"rho": 1.0, "rho_growth": 1.0},
                   answer_fn=lambda mdl: {"x.weight": mdl.x.weight},
                   answer_checks=lambda mdl: {f"rank == {rank}": int(torch.linalg.matrix_rank(mdl.x.weight.detach())) == rank},
                   meta={"m": m, "n": n, "rank": rank, "observed": int(mask.sum()), "p": p, "lam": lam})
