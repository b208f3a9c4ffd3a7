"""Time ONNX models in ONNX Runtime and DeepSparse (the worker of ``benchmarks/sparse_engine.py``).

Run by ``sparse_engine.py`` with an interpreter that has ``deepsparse`` (it cannot share an
environment with this project: DeepSparse 1.8 needs ``onnx < 1.15`` and Python < 3.12), so it
imports neither torch nor ``admm_compress``: only numpy, onnxruntime and deepsparse.

Input: a JSON manifest ``{"models": [{"key", "path"}], "batches": [..], "inputs": {batch: npy},
"refs": {key: {batch: npy}}, "rounds", "threads", "rtol", "atol"}``.  For each batch, every model
is opened in both engines (``deepsparse.compile_model(path, batch_size, num_cores=threads)``;
``onnxruntime.InferenceSession`` with ``threads`` intra-op threads, one inter-op thread), its
output compared with the eager PyTorch reference (``|out - ref| <= atol * max(1, max |ref|) + rtol
|ref|``, else the run stops), then ``rounds`` interleaved rounds (the model order reversed every
other round; per model and engine 2 untimed and ``n`` timed calls, ``n = 10`` at batch 1, 3
above): median process CPU time and wall time per call.  Output: JSON ``{key: {batch: {engine:
{cpu_ms, wall_ms, max_rel_diff}}}}`` plus the engines' versions.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")  # no network calls from the engine

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402


def _open(path: str, batch: int, threads: int) -> dict:
    from deepsparse import compile_model

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    eng = compile_model(path, batch_size=batch, num_cores=threads)
    return {"ort": lambda x: sess.run(None, {name: x})[0], "deepsparse": lambda x: eng([x])[0]}


def main(manifest_path: str, out_path: str) -> None:
    import deepsparse

    man = json.load(open(manifest_path))
    threads, rounds = int(man["threads"]), int(man["rounds"])
    res: dict = {}
    for b in man["batches"]:
        x = np.load(man["inputs"][str(b)])
        runs = {}
        for m in man["models"]:
            key = m["key"]
            runs[key] = _open(m["path"], b, threads)
            ref = np.load(man["refs"][key][str(b)])
            scale = max(1.0, float(np.abs(ref).max()))
            for eng, run in runs[key].items():
                out = run(x)
                bad = np.abs(out - ref) > man["atol"] * scale + man["rtol"] * np.abs(ref)
                if bad.any():
                    raise SystemExit(f"{key} batch {b} {eng}: output differs from eager "
                                     f"(max |diff| {float(np.abs(out - ref).max()):.3g}, scale {scale:.3g})")
                res.setdefault(key, {}).setdefault(str(b), {})[eng] = {
                    "max_rel_diff": float(np.abs(out - ref).max()) / scale, "cpu": [], "wall": []}
        n = 10 if b == 1 else 3
        keys = list(runs)
        for r in range(rounds):
            for key in (keys if r % 2 == 0 else keys[::-1]):
                for eng, run in runs[key].items():
                    cell = res[key][str(b)][eng]
                    for _ in range(2):
                        run(x)
                    for _ in range(n):
                        c, w = time.process_time(), time.perf_counter()
                        run(x)
                        cell["cpu"].append(1e3 * (time.process_time() - c))
                        cell["wall"].append(1e3 * (time.perf_counter() - w))
        for key in keys:
            for eng, cell in res[key][str(b)].items():
                cell["cpu_ms"] = statistics.median(cell.pop("cpu"))
                cell["wall_ms"] = statistics.median(cell.pop("wall"))
            print(f"b={b} {key}: " + ", ".join(f"{e} {c['cpu_ms']:.2f} ms" for e, c in res[key][str(b)].items()),
                  flush=True)
        del runs
    res["_versions"] = {"deepsparse": deepsparse.__version__, "onnxruntime": ort.__version__,
                        "python": sys.version.split()[0]}
    tmp = out_path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(res, fh)
    os.replace(tmp, out_path)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: _engine_timer.py MANIFEST.json OUT.json")
    main(sys.argv[1], sys.argv[2])
