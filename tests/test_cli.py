"""The ``admm-compress`` CLI, the problem / solver registry, and the exact problems.

End-to-end: the console script and ``python -m admm_compress`` run as subprocesses from the
repository root on a tiny budget (exit code, files written, table printed).  Typos and
misuse: in-process ``main(argv)`` (exit code 2, the valid names listed, nothing written).
Exact problems: the admm solvers must reach each problem's known answer (Eckart-Young
truncation, the planted L0 + S0 of robust PCA, the planted matrix of Schatten-p completion).
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from admm_compress.cli import main
from admm_compress.registry import (Problem, RegistryError, check_params, load_problems, load_solvers,
                                    parse_assignments, parse_value)

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--epochs", "1", "--set", "pretrain_epochs=1", "--set", "finetune_epochs=1", "--no-progress",
        "--threads", "1", "--latency-repeats", "3", "--latency-batch", "4"]


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    """The CLI finds problems/ and solvers/ relative to the working directory."""
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("ADMM_COMPRESS_PATH", raising=False)


def _cli(*args, timeout=300):
    exe = shutil.which("admm-compress")
    cmd = [exe, *args] if exe else [sys.executable, "-m", "admm_compress", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


# ------------------------------------------------------------------ end to end (subprocess)
def test_run_end_to_end_subprocess(tmp_path):
    out = tmp_path / "run"
    p = _cli("run", "digits_fcn", "lrpet", "--set", "pruning_ratio=0.75", "--seed", "1", "--out", str(out), *TINY)
    assert p.returncode == 0, p.stderr
    for f in ("results.json", "model_state_dict.pt", "accuracy_vs_macs.png", "spectra.png", "residuals.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    res = json.loads((out / "results.json").read_text())
    assert res["problem"] == "digits_fcn" and res["solver"] == "lrpet" and res["seed"] == 1
    assert res["solver_params"]["pruning_ratio"] == 0.75
    # LRPET rank int(n - n P) on the 7 hidden Linear layers (classifier dense): params drop is exact
    dense = 64 * 96 + 96 + 6 * (96 * 96 + 96) + 96 * 10 + 10
    r0, r = 64 - int(64 * 0.75), 96 - int(96 * 0.75)
    compressed = r0 * (64 + 96) + 96 + 6 * (r * 192 + 96) + 96 * 10 + 10
    assert res["params_before"] == dense and res["params_after"] == compressed
    assert res["params_drop"] == pytest.approx(100 * (1 - compressed / dense))
    assert 0 <= res["acc_after"] <= 100 and res["latency_after_ms"] > 0
    # the state dict written is the exported (factored) model's
    sd = torch.load(out / "model_state_dict.pt", weights_only=True)
    assert sum(v.numel() for k, v in sd.items()) == compressed
    assert "accuracy (%)" in p.stdout and "MACs (M)" in p.stdout and "latency (ms)" in p.stdout


def test_run_with_two_processes(tmp_path):
    """--nproc 2: two gloo processes, each with half of every global batch (DistributedSampler);
    rank 0 measures and writes.  (That 2 processes equal 1 over the same global batches is
    tests/test_distributed.py.)"""
    args = ("digits_fcn", "lrpet", "--set", "pruning_ratio=0.75", "--seed", "0", "--no-progress", "--epochs", "2",
            "--set", "pretrain_epochs=2", "--set", "finetune_epochs=1", "--latency-repeats", "2")
    p2 = _cli("run", *args, "--nproc", "2", "--out", str(tmp_path / "two"))
    assert p2.returncode == 0, p2.stderr
    res = json.loads((tmp_path / "two" / "results.json").read_text())
    assert res["nproc"] == 2 and "accuracy (%)" in p2.stdout
    assert res["params_after"] < res["params_before"]
    assert res["acc_after"] > 60  # a trained model (10 classes: chance is 10 %)
    bad = _cli("run", *args, "--nproc", "0", "--out", str(tmp_path / "bad"))
    assert bad.returncode == 2 and "--nproc=0" in bad.stderr


def test_python_m_list_subprocess():
    p = subprocess.run([sys.executable, "-m", "admm_compress", "list"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    for name in ("digits_fcn", "digits32_resnet20", "digits32_vgg16", "cifar10_resnet20", "cifar10_resnet56",
                 "cifar10_vgg16", "best_rank_r", "robust_pca", "schatten_completion", "lrpet", "lorita", "raspa",
                 "decomposable_net", "admm_lowrank", "admm_sparse", "admm_channels", "admm_tt", "dense", "svd_truncation",
                 "magnitude_pruning", "trp"):
        assert name in p.stdout, name
    assert "pruning_ratio" in p.stdout  # parameters are listed


# ------------------------------------------------------------------ typos and misuse (in-process)
@pytest.mark.parametrize("argv, expected", [
    (["run", "digits_fnc", "lrpet"], ["unknown problem 'digits_fnc'", "did you mean 'digits_fcn'", "robust_pca"]),
    (["run", "digits_fcn", "lrpt"], ["unknown solver 'lrpt'", "did you mean 'lrpet'", "magnitude_pruning"]),
    (["run", "digits_fcn", "lrpet", "--set", "pruning_ration=0.5"],
     ["unknown parameter 'pruning_ration'", "did you mean 'pruning_ratio'", "batch_size"]),
    (["run", "digits_fcn", "lrpet", "--set", "oops"], ["--set expects key=value"]),
    (["bench", "digits_fcn", "--solvers", "dense", "svd_trunc"], ["unknown solver 'svd_trunc'"]),
    (["run", "best_rank_r", "lrpet"], ["does not apply to the exact problem", "admm_lowrank"]),
])
def test_typos_list_valid_names_and_run_nothing(argv, expected, tmp_path, capsys):
    out = tmp_path / "never"
    code = main(argv + ["--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    for e in expected:
        assert e in err, (e, err)
    assert not out.exists()


def test_cuda_requested_without_cuda_is_a_clear_error(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    out = tmp_path / "never"
    assert main(["run", "digits_fcn", "dense", "--device", "cuda", "--out", str(out)]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
    assert not out.exists()


def test_a_bench_row_equals_a_lone_run_whatever_ran_before(tmp_path, capsys):
    """Each solver of a bench sees the same data order as `run` of that solver alone (the dense
    model is pretrained once and cached; the loader's shuffling generator is reset per solver)."""
    args = [*TINY, "--set", "epochs=2", "--latency-repeats", "1"]
    assert main(["bench", "digits_fcn", "--solvers", "lrpet", "admm_lowrank", "--out", str(tmp_path / "b"),
                 *args]) == 0, capsys.readouterr().err
    for name in ("lrpet", "admm_lowrank"):
        assert main(["run", "digits_fcn", name, "--out", str(tmp_path / name), *args]) == 0
        lone = json.loads((tmp_path / name / "results.json").read_text())
        row = json.loads((tmp_path / "b" / f"{name}_seed0" / "results.json").read_text())
        losses = [[e["loss"] for e in r["history"]["epochs"]] for r in (row, lone)]
        assert len(losses[0]) >= 2 and losses[0] == losses[1], name  # bit-identical training
        assert row["acc_after"] == lone["acc_after"], name


def test_bench_grid_sweeps_each_solvers_params_except_the_fixed_ones(tmp_path, capsys):
    out = tmp_path / "grid"
    code = main(["bench", "digits_fcn", "--grid", "--solvers", "svd_truncation", "magnitude_pruning",
                 "--set", "magnitude_pruning.density=0.2", "--out", str(out), *TINY])
    assert code == 0, capsys.readouterr().err
    rows = list(csv.DictReader(io.StringIO((out / "bench.csv").read_text())))
    params = [(r["solver"], json.loads(r["solver_params"])) for r in rows]
    svd = sorted((p["ratio"], float(r["macs_drop"])) for (n, p), r in zip(params, rows) if n == "svd_truncation")
    assert [q for q, _ in svd] == [0.2, 0.4, 0.6]                      # the whole PARAMS grid
    assert svd[0][1] > svd[1][1] > svd[2][1] > 0                        # fewer kept ranks, more MACs saved
    mag = [p for n, p in params if n == "magnitude_pruning"]
    assert sorted(p["scope"] for p in mag) == ["global", "layer"] and all(p["density"] == 0.2 for p in mag)
    assert (out / "svd_truncation_ratio-0.2_seed0" / "results.json").is_file()
    assert (out / "tradeoff.png").stat().st_size > 0


def test_pareto_front():
    from admm_compress.plots import pareto_front

    pts = [(10, 90), (20, 85), (15, 80), (30, 70), (20, 86), (5, 95)]
    assert pareto_front(pts) == [(5, 95), (10, 90), (20, 86), (30, 70)]


def test_bench_writes_table_csv_and_plot(tmp_path, capsys):
    out = tmp_path / "bench"
    code = main(["bench", "digits_fcn", "--solvers", "dense", "svd_truncation", "magnitude_pruning",
                 "--set", "ratio=0.25", "--set", "density=0.2", "--out", str(out), *TINY])
    assert code == 0, capsys.readouterr().err
    md = (out / "bench.md").read_text()
    rows = (out / "bench.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 3 and (out / "tradeoff.png").stat().st_size > 0
    assert "Command: `admm-compress bench digits_fcn" in md
    for s in ("dense", "svd_truncation", "magnitude_pruning"):
        assert f"| {s} |" in md
    by = {json.loads(json.dumps(r))["solver"]: r for r in (json.loads((out / f"{s}_seed0" / "results.json")
                                                                        .read_text())
                                                            for s in ("dense", "svd_truncation", "magnitude_pruning"))}
    assert by["dense"]["params_drop"] == pytest.approx(0.0)
    # same pretrained dense model for every solver (shared per seed)
    assert len({r["acc_before"] for r in by.values()}) == 1
    # magnitude pruning at density 0.2 over the 7 pruned layers: non-zeros counted exactly
    pruned = 64 * 96 + 6 * 96 * 96
    kept = round(0.2 * pruned)
    assert by["magnitude_pruning"]["params_before"] - by["magnitude_pruning"]["params_after"] == pruned - kept


def test_user_folders_and_unavailable_solver(tmp_path, capsys):
    pdir, sdir = tmp_path / "myproblems", tmp_path / "mysolvers"
    pdir.mkdir()
    sdir.mkdir()
    (pdir / "my_rank1.py").write_text(textwrap.dedent('''
        import torch, admm_compress as ac
        from admm_compress.registry import MatrixProblemModel, Problem
        NAME = "my_rank1"
        DEFAULTS = {"epochs": 60}
        def build(seed, device, epochs):
            A = torch.outer(torch.arange(1., 6.), torch.ones(4, dtype=torch.float64)).double()
            A = A + 0.1 * torch.eye(5, 4, dtype=torch.float64)
            U, S, Vh = torch.linalg.svd(A)
            batches = [(torch.zeros(1), A)] * 10
            return Problem(NAME, MatrixProblemModel(5, 4), batches, batches, (1,),
                           loss_fn=lambda o, t: 0.5 * (o - t).pow(2).sum(), epochs=epochs,
                           optimizer=lambda p: torch.optim.SGD(p, lr=0.2), task="exact",
                           known_answer={"x.weight": S[0] * torch.outer(U[:, 0], Vh[0])}, tolerance=1e-4,
                           spec=[ac.Constrain("x", ac.LowRank(rank=1))], accepts=("lowrank",),
                           solver_defaults={"rho": 0.5, "rho_growth": 1.2, "rho_max": 5.0},
                           answer_fn=lambda m: {"x.weight": m.x.weight})
    '''))
    (sdir / "future.py").write_text('REQUIRES = ["admm_compress.methods.not_written_yet"]\nNAME = "future"\n'
                                    'PARAMS = {}\nDEFAULTS = {}\ndef build(problem):\n    raise AssertionError\n')
    dirs = ["--problems-dir", str(pdir), "--solvers-dir", str(sdir)]
    assert main(["list", *dirs]) == 0
    listed = capsys.readouterr().out
    assert "my_rank1" in listed and "digits_fcn" in listed  # user folder + repository folder
    assert "future" in listed and "UNAVAILABLE" in listed
    out = tmp_path / "r"
    assert main(["run", "my_rank1", "admm_lowrank", "--out", str(out), "--no-progress", *dirs]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["answer"]["ok"] and res["answer"]["max_error"] < 1e-4
    assert main(["run", "my_rank1", "future", *dirs]) == 2
    assert "unavailable" in capsys.readouterr().err


# ------------------------------------------------------------------ parameters
def test_parse_values_and_check_params():
    assert parse_value("3") == 3 and parse_value("0.5") == 0.5 and parse_value("true") is True
    assert parse_value("none") is None and parse_value("4,6") == (4, 6) and parse_value("lsvt") == "lsvt"
    assert parse_assignments(["a=1", "b=x=y"]) == {"a": 1, "b": "x=y"}
    with pytest.raises(RegistryError, match="valid: a, b"):
        check_params("s", "solver", {"c": 1}, {"a": 0, "b": 0})


def test_every_solver_file_declares_a_consistent_grid():
    solvers = load_solvers()
    problems = load_problems()
    for name, e in solvers.items():  # a `bench --grid` sweep always contains the default run
        for k, values in e.params.items():
            assert e.defaults[k] in values, (name, k, e.defaults[k], values)
    assert {"lrpet", "lorita", "raspa", "decomposable_net", "admm_lowrank", "admm_sparse", "admm_channels", "admm_tt", "dense",
            "svd_truncation", "magnitude_pruning", "trp"} <= set(solvers)
    for name, e in solvers.items():
        assert e.module is not None, (name, e.error)
        assert set(e.params) <= set(e.defaults), name
    for name, e in problems.items():
        assert e.module is not None and "epochs" in e.defaults, name


def test_every_solver_builds_with_its_defaults_and_every_grid_value():
    """`bench` builds every solver with its DEFAULTS before anything runs (and `--grid` every
    PARAMS value): a default its own build refuses (trp's view='vh' once) stops the whole bench.
    Built on the digits FCN problem (tiny; admm_tt needs a model to choose its TT views)."""
    prob = load_problems()["digits_fcn"].build(seed=0, device="cpu", epochs=1, pretrain_epochs=0)
    for name, e in load_solvers().items():
        if not e.available:
            continue
        e.build(prob)
        for k, values in e.params.items():
            for v in values:
                e.build(prob, **{k: v})


# ------------------------------------------------------------------ exact problems, known answers
def _solve(problem_name, solver_name, **pparams):
    torch.manual_seed(0)
    pe, se = load_problems()[problem_name], load_solvers()[solver_name]
    prob = pe.build(seed=0, device="cpu", **pparams)
    assert isinstance(prob, Problem) and prob.is_exact
    solver = se.build(prob)
    solver.fit(prob.model, prob.train_loader, epochs=prob.epochs, optimizer=prob.optimizer, loss_fn=prob.loss_fn,
               progress=False)
    return prob


def test_best_rank_r_reaches_eckart_young():
    prob = _solve("best_rank_r", "admm_lowrank")
    ans = prob.check_answer()
    assert ans["ok"], ans
    # independent check of the known answer itself: residual energy = sum of the dropped sigma_i^2
    A = prob.train_loader[0][1]
    s = torch.linalg.svdvals(A)
    X = prob.model.x.weight.detach()
    r = prob.meta["rank"]
    assert float((A - X).pow(2).sum()) == pytest.approx(float(s[r:].pow(2).sum()), rel=1e-4)


@pytest.mark.parametrize("solver", ["admm_lowrank", "admm_sparse"])
def test_robust_pca_recovers_planted_components(solver):
    prob = _solve("robust_pca", solver)
    ans = prob.check_answer()
    assert ans["ok"], ans
    L, S = prob.solution()["L"], prob.solution()["S"]
    assert int(torch.linalg.matrix_rank(L)) == prob.meta["rank"]
    assert int(torch.count_nonzero(S)) <= prob.meta["k"]


def test_schatten_half_completion_recovers_and_beats_nuclear_norm():
    half = _solve("schatten_completion", "admm_lowrank")
    ans = half.check_answer()
    assert ans["ok"], ans
    nuclear = _solve("schatten_completion", "admm_lowrank", **{**load_problems()["schatten_completion"].defaults,
                                                               "p": 1.0, "lam": 1.0})
    # the cited paper's point: p < 1 is a better surrogate of rank than the nuclear norm (less bias)
    assert nuclear.check_answer()["max_error"] > 2 * ans["max_error"]


def test_wrong_answer_is_detected():
    """The known-answer check can fail: a feasible but suboptimal rank-r point is rejected."""
    pe = load_problems()["best_rank_r"]
    prob = pe.build(seed=0, device="cpu", **pe.defaults)
    with torch.no_grad():
        A = prob.train_loader[0][1]
        U, S, Vh = torch.linalg.svd(A, full_matrices=False)
        r = prob.meta["rank"]
        prob.model.x.weight.copy_((U[:, 1:r + 1] * S[1:r + 1]) @ Vh[1:r + 1])  # rank r, wrong subspace
    ans = prob.check_answer()
    assert not ans["ok"] and ans["checks"][f"rank <= {r}"]


def test_search_path_env_var_and_shadowing(tmp_path, monkeypatch, capsys):
    """ADMM_COMPRESS_PATH folders come before ./problems; the first file defining a name wins."""
    (tmp_path / "problems").mkdir()
    (tmp_path / "problems" / "digits_fcn.py").write_text(
        'NAME = "digits_fcn"\nDESCRIPTION = "shadowed by the user"\nDEFAULTS = {"epochs": 1}\n'
        'def build(seed, device, epochs):\n    raise RuntimeError("not built in this test")\n')
    monkeypatch.setenv("ADMM_COMPRESS_PATH", str(tmp_path))
    problems = load_problems()
    assert problems["digits_fcn"].description == "shadowed by the user"
    assert "robust_pca" in problems  # the repository's others are still found


# ------------------------------------------------------------------ late I/O errors lose nothing
def test_a_late_write_error_keeps_the_results_in_a_rescue_folder(tmp_path, monkeypatch, capsys):
    """The output folder turns unwritable after training (simulated: every move into it fails):
    each file is written to one rescue folder instead, the command says which path failed and
    where its content is, and exits 1."""
    import tempfile

    from admm_compress.bench import _io

    out = tmp_path / "run"
    rescue_root = tmp_path / "tmp"
    rescue_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(rescue_root))
    real = _io._commit

    def commit(tmp, path):
        if Path(path).parent == out:
            raise OSError(28, "No space left on device (simulated)")
        real(tmp, path)

    monkeypatch.setattr(_io, "_commit", commit)
    code = main(["run", "digits_fcn", "lrpet", "--out", str(out), *TINY])
    err = capsys.readouterr().err
    assert code == 1, err
    rescue = [p for p in rescue_root.iterdir() if p.name.startswith("admm-compress-rescue-")]
    assert len(rescue) == 1
    for name in ("results.json", "model_state_dict.pt", "accuracy_vs_macs.png", "spectra.png", "residuals.png"):
        assert f"could not write {out / name}" in err and f"its content is in {rescue[0] / name}" in err, (name, err)
        assert (rescue[0] / name).stat().st_size > 0
        assert not (out / name).exists()
    assert not [p for p in out.iterdir()], "no temporary file may be left behind"
    res = json.loads((rescue[0] / "results.json").read_text())
    assert res["files"]["state_dict"] == str(rescue[0] / "model_state_dict.pt")
    state = torch.load(rescue[0] / "model_state_dict.pt", weights_only=True)
    assert set(state) and all(isinstance(v, torch.Tensor) for v in state.values())
    assert math.isfinite(res["acc_after"])


# ------------------------------------------------------------------ saved bytes and ONNX Runtime latency
def _table_row(stdout: str, label: str) -> list[str]:
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in stdout.splitlines()
            if line.startswith(f"| {label} |")]
    assert len(rows) == 1, f"no single '{label}' row in:\n{stdout}"
    return rows[0]


def test_run_table_reports_saved_file_bytes_and_ort_latency(tmp_path, capsys):
    """The run table has the exported state-dict file's size (= the file written) next to the
    params, and ONNX Runtime latency when onnxruntime is importable (n/a otherwise)."""
    out = tmp_path / "run"
    assert main(["run", "digits_fcn", "magnitude_pruning", "--set", "density=0.2", "--out", str(out),
                 *TINY]) == 0, capsys.readouterr().err
    stdout = capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    file_bytes = os.path.getsize(out / "model_state_dict.pt")
    row = _table_row(stdout, "saved state dict (bytes)")
    assert int(row[2]) == file_bytes == res["state_dict_bytes"]
    # the dense model's bytes: torch.save of a state dict with the dense FCN's tensors (float32)
    dense_tensor_bytes = 4 * res["params_before"]
    assert dense_tensor_bytes < int(row[1]) == res["state_dict_bytes_before"] < dense_tensor_bytes + 20_000
    # compact sparse storage: density 0.2 of the 7 pruned layers (values + bitmask/CSR), well under dense
    assert file_bytes < 0.5 * res["state_dict_bytes_before"]
    assert row[3] == f"x{file_bytes / res['state_dict_bytes_before']:.2f}"
    sd = torch.load(out / "model_state_dict.pt", weights_only=True)  # the library's compact sparse form
    assert sum(k.endswith("weight_values") for k in sd) == 7 and not any(k.endswith(".mask") for k in sd)
    ort = _table_row(stdout, "latency ONNX Runtime (ms)")
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        assert ort[1:3] == ["n/a", "n/a"] and "onnxruntime not installed" in ort[3]
        return
    before, after = float(ort[1]), float(ort[2])
    assert before == pytest.approx(res["ort_latency_before_ms"], rel=1e-3, abs=1e-3) and before > 0
    assert after == pytest.approx(res["ort_latency_after_ms"], rel=1e-3, abs=1e-3) and after > 0
    assert ort[3] == f"x{res['ort_latency_after_ms'] / res['ort_latency_before_ms']:.2f}"
    assert "outputs equal eager" in res["ort_note"]


def test_ort_latency_is_marked_na_without_onnxruntime(monkeypatch):
    from admm_compress import cli

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    prob = type("P", (), {"input_size": (8,)})()
    ms, note = cli._ort_latency(torch.nn.Linear(8, 2), prob, batch=2, repeats=2)
    assert ms is None and note.startswith("n/a") and "onnxruntime not installed" in note
    res = {"acc_before": 90.0, "acc_after": 89.0, "acc_drop": 1.0, "macs_before": 16, "macs_after": 16,
           "macs_drop": 0.0, "params_before": 18, "params_after": 18, "params_drop": 0.0, "state_dict_bytes": 1000,
           "state_dict_bytes_before": 2000, "latency_before_ms": 1.0, "latency_after_ms": 0.5, "latency_ratio": 0.5,
           "ort_latency_before_ms": None, "ort_latency_after_ms": None, "ort_latency_ratio": None, "ort_note": note,
           "time_ratio": None, "fit_wall_s": 1.0, "before": {}, "after": {}, "solver": "s"}
    table = cli._run_table(res)
    assert _table_row(table, "latency ONNX Runtime (ms)") == ["latency ONNX Runtime (ms)", "n/a", "n/a", note]
    assert _table_row(table, "saved state dict (bytes)") == ["saved state dict (bytes)", "2000", "1000", "x0.50"]



def test_no_ort_skips_the_onnx_export(tmp_path, monkeypatch, capsys):
    """``--no-ort``: no ONNX export at all (it takes seconds per model), the row says why."""
    import admm_compress.bench.run as run_mod

    def boom(*a, **k):
        raise AssertionError("the ONNX Runtime latency was measured despite --no-ort")

    monkeypatch.setattr(run_mod, "_ort_latency", boom)
    out = tmp_path / "run"
    assert main(["run", "digits_fcn", "magnitude_pruning", "--set", "density=0.5", "--out", str(out),
                 "--no-ort", *TINY]) == 0, capsys.readouterr().err
    row = _table_row(capsys.readouterr().out, "latency ONNX Runtime (ms)")
    res = json.loads((out / "results.json").read_text())
    assert row[1:3] == ["n/a", "n/a"] and res["ort_note"] == "n/a: skipped (--no-ort)"


def test_admm_sparse_bench_solver_takes_the_global_scope():
    prob = load_problems()["digits_fcn"].build(seed=0, device="cpu", epochs=1, pretrain_epochs=0)
    s = load_solvers()["admm_sparse"].build(prob, density=0.1, scope="global")
    s.prepare(prob.model)
    assert len(s.global_groups) == 1 and len(s.global_groups[0]) == len(s.bindings) > 1
    s.finalize(prob.model)
    ws = [b.param for b in s.bindings]
    assert sum(int(torch.count_nonzero(w)) for w in ws) == round(0.1 * sum(w.numel() for w in ws))


def test_tt_bench_solvers_use_the_layout_they_are_given():
    """Every named TT layout reaches the views of the bench solvers (a layout the check accepts but
    the builder maps to another view would train and report the wrong tensorization)."""
    from admm_compress.views import TT_LAYOUTS

    prob = load_problems()["digits_fcn"].build(seed=0, device="cpu", epochs=1, pretrain_epochs=0)
    solvers = load_solvers()
    for layout in TT_LAYOUTS:
        for name in ("admm_tt", "raspa"):
            s = solvers[name].build(prob, layout=layout)
            s.prepare(prob.model)
            got = {getattr(b.view, "layout", "eq9") if not hasattr(b.view, "for_shape") else "eq9"
                   for b in s.bindings}
            assert got == {layout}, (name, layout, got)
