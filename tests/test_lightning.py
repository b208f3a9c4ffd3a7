"""The Lightning callback runs a compressor inside a real ``lightning.Trainer`` exactly like the
hand-written loop (prepare, loss + penalty, step after each optimizer step, epoch_end, finalize),
and a run resumed from a Lightning checkpoint ends where the uninterrupted one does."""
import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

L = pytest.importorskip("lightning")

import admm_compress as ac  # noqa: E402
from admm_compress import data, methods, models  # noqa: E402
from admm_compress.integrations.lightning import CompressionCallback  # noqa: E402


def _loader():
    train, _ = data.digits(batch_size=128)
    # fixed order: a resumed run must see the same batches as the uninterrupted one in epoch 2
    return DataLoader(train.dataset, batch_size=128, shuffle=False)


def _net(seed=0):
    torch.manual_seed(seed)
    return models.fcn(depth=3, width=32)


class Lit(L.LightningModule):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.5)


def _solver():
    # every=3: Z/U updates between epoch boundaries (via step), rho growing after each
    return ac.Solver([ac.Constrain(nn.Linear, ac.LowRank(rank=4))], rho=0.1, every=3, rho_growth=1.1)


def _trainer(epochs, **kw):
    return L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, enable_progress_bar=False, logger=False,
                     enable_model_summary=False, **kw)


def _hand_loop(net, solver, loader, epochs):
    solver.prepare(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.5)
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(net(x), y) + solver.penalty()
            loss.backward()
            opt.step()
            solver.step()
        solver.epoch_end()
    return solver.finalize(net)


def test_callback_equals_the_hand_written_loop():
    loader = _loader()
    ref_net, ref_solver = _net(), _solver()
    ref_feasible = _hand_loop(ref_net, ref_solver, loader, epochs=2)

    lit = Lit(_net())
    cb = CompressionCallback(_solver(), module="net")
    _trainer(2, enable_checkpointing=False, callbacks=[cb]).fit(lit, loader)
    n_batches = len(loader)
    assert cb.solver.steps == 2 * n_batches and cb.solver.epochs_done == 2
    assert cb.solver.n_updates == ref_solver.n_updates == (2 * n_batches) // 3
    assert cb.feasible == ref_feasible and all(cb.feasible.values())
    # same float operations in the same order: identical weights
    for (k, a), (_, b) in zip(lit.net.state_dict().items(), ref_net.state_dict().items()):
        assert torch.equal(a, b), k
    assert "training_step" not in lit.__dict__  # the wrapper is removed at teardown
    compact = cb.export()
    assert ac.complexity(compact, (64,)).params < ac.complexity(lit.net, (64,)).params


def test_resume_from_a_lightning_checkpoint_equals_uninterrupted(tmp_path):
    loader = _loader()
    full = Lit(_net())
    cb_full = CompressionCallback(_solver(), module="net", finalize=False)
    _trainer(2, enable_checkpointing=False, callbacks=[cb_full]).fit(full, loader)

    first = Lit(_net())  # one epoch, checkpointed at its end
    cb1 = CompressionCallback(_solver(), module="net", finalize=False)
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "run", save_last=True, save_top_k=0)
    _trainer(1, callbacks=[cb1, ckpt]).fit(first, loader)
    last = tmp_path / "run" / "last.ckpt"
    assert last.exists()
    state = torch.load(last, weights_only=True)
    assert any(k.startswith("CompressionCallback") for k in state["callbacks"])

    resumed = Lit(_net(seed=123))  # other initial weights: everything comes from the checkpoint
    cb2 = CompressionCallback(_solver(), module="net", finalize=False)
    _trainer(2, enable_checkpointing=False, callbacks=[cb2]).fit(resumed, loader, ckpt_path=str(last))
    assert cb2.solver.steps == cb_full.solver.steps and cb2.solver.epochs_done == 2
    assert cb2.solver.rhos == cb_full.solver.rhos
    for k in cb_full.solver.Z:
        assert torch.equal(cb2.solver.Z[k], cb_full.solver.Z[k]) and torch.equal(cb2.solver.U[k], cb_full.solver.U[k])
    for (k, a), (_, b) in zip(resumed.net.state_dict().items(), full.net.state_dict().items()):
        assert torch.equal(a, b), k


def test_reparameterizing_method_and_manual_penalty():
    """LoRITa reparameterizes at prepare (before configure_optimizers: its factors are trained)."""
    loader = _loader()
    lit = Lit(_net())
    solver = methods.lorita(n_factors=2, rank=4)
    cb = CompressionCallback(solver, module="net")
    before = copy.deepcopy(lit.net)
    _trainer(1, enable_checkpointing=False, callbacks=[cb]).fit(lit, loader)
    assert all(cb.feasible.values())
    compact = cb.export()
    x = next(iter(loader))[0]
    with torch.no_grad():
        torch.testing.assert_close(compact(x), lit.net(x), rtol=1e-4, atol=1e-4)
    assert ac.complexity(compact, (64,)).params < ac.complexity(before, (64,)).params


def test_bad_input_and_unsupported_method():
    with pytest.raises(TypeError, match="solver must be"):
        CompressionCallback(object())
    with pytest.raises(TypeError, match="module must be"):
        CompressionCallback(_solver(), module="")
    with pytest.raises(TypeError, match="add_penalty must be a bool"):
        CompressionCallback(_solver(), add_penalty=1)
    dn = methods.decomposable_net()
    with pytest.raises(ValueError, match="automatic_optimization"):
        _trainer(1, enable_checkpointing=False, callbacks=[CompressionCallback(dn, module="net")]).fit(
            Lit(_net()), _loader())
    with pytest.raises(ValueError, match="no sub-module 'body'"):
        _trainer(1, enable_checkpointing=False, callbacks=[CompressionCallback(_solver(), module="body")]).fit(
            Lit(_net()), _loader())
