"""``admm-compress bench``: several solvers (or one solver's parameter grid) on one problem and
seeds, sharing the dense pretraining; writes ``bench.md``, ``bench.csv`` and ``tradeoff.png``."""
from __future__ import annotations

import csv
import itertools
import json
import logging
import shlex
import sys
from pathlib import Path

from ._io import (BENCH_FILES, BENCH_HEADERS, CLIError, _check_finite_assignments, _check_output_dir,
                  _check_run_numbers, _default_out, _load, _problem_entry, _solver_entry,
                  _split_assignments, _Writer, _write)
from .run import (_build_problem, _check_solver_builds, _fmt, _jsonable, _markdown,
                  _params_text, _slug, run_one)

log = logging.getLogger("admm_compress.cli")


def _bench_row(res: dict, shown: dict) -> list:
    if "answer" in res:
        return [res["solver"], _params_text(shown), res["seed"], "-", "-", "-", "-", "-", "-", "-", "-", "-", "-", "-",
                _fmt(res["wall_s"], ".1f")]
    m = lambda v: None if v is None else v / 1e6  # noqa: E731
    return [res["solver"], _params_text(shown), res["seed"], _fmt(res["acc_before"]), _fmt(res["acc_after"]),
            _fmt(res["acc_drop"], "+.2f"), _fmt(m(res["macs_after"]), ".3f"), _fmt(res["macs_drop"], ".1f"),
            _fmt(m(res["params_after"]), ".4f"), _fmt(res["params_drop"], ".1f"), _fmt(res.get("state_dict_bytes")),
            _fmt(res["latency_ratio"], ".2f"), _fmt(res.get("ort_latency_ratio"), ".2f", none="n/a"),
            _fmt(res["time_ratio"], ".2f"), _fmt(res["fit_wall_s"], ".1f")]


def _grid(entry, fixed: dict) -> list[dict]:
    """Every combination of the solver's ``PARAMS`` values, the ``fixed`` (``--set``) keys left out."""
    keys = [k for k in entry.params if k not in fixed]
    return [dict(zip(keys, vals)) for vals in itertools.product(*(entry.params[k] for k in keys))] or [{}]


def _cmd_bench(args) -> int:
    from .registry import RegistryError, parse_assignments
    from ..training import resolve_device

    problems, solvers = _load(args)
    pentry = _problem_entry(problems, args.problem)
    if args.solvers:
        chosen = [_solver_entry(solvers, s) for s in args.solvers]  # typos stop everything here
    else:
        chosen = [e for _, e in sorted(solvers.items()) if e.available]
        skipped = [n for n, e in sorted(solvers.items()) if not e.available]
        if skipped:
            log.warning("skipping unavailable solver(s): %s", ", ".join(skipped))
    assign = parse_assignments(args.assign)
    _check_finite_assignments(assign)
    pparams, sparams = _split_assignments(assign, pentry.defaults, {e.name: e.defaults for e in chosen}, pentry.name)
    _check_run_numbers(args)
    resolve_device(args.device)
    # exact problems: keep the solvers that apply (explicitly named ones that do not apply -> error)
    probe = None
    if getattr(pentry.module, "build", None) is not None:
        probe_params = dict(pparams)
        probe = _build_problem(pentry, args.seeds[0], "cpu", probe_params)
    if probe is not None and probe.is_exact:
        ok = [e for e in chosen if e.kind == "admm" and e.constraint in probe.accepts]
        if args.solvers and len(ok) != len(chosen):
            bad = [e.name for e in chosen if e not in ok]
            raise RegistryError(f"solver(s) {bad} do not apply to the exact problem {pentry.name!r}; "
                                f"applicable: {[e.name for e in ok]}")
        chosen = ok
    jobs = [(e, combo) for e in chosen for combo in (_grid(e, sparams[e.name]) if args.grid else [{}])]
    if probe is not None:  # bad solver parameter values stop the bench before any training
        for e, combo in jobs:
            _check_solver_builds(e, probe, e.resolve({**combo, **sparams[e.name]}, probe))
    del probe
    out = Path(args.out) if args.out else _default_out("bench", pentry.name)
    # every output location is created and probed before the first training starts
    report_prefix = None
    if args.report:
        report_prefix = Path(args.report)
        if not report_prefix.name or report_prefix.name in (".", ".."):
            raise CLIError(f"--report {args.report!r} must end with a file-name prefix (e.g. docs/results/bench)")
        _check_output_dir(report_prefix.parent, "--report folder",
                          [report_prefix.name + ext for ext in (".md", ".csv", ".png")])
    _check_output_dir(out, "--out", BENCH_FILES)
    cache: dict = {}
    rows, results, failures = [], [], []
    run_write_failures: list[dict] = []
    for seed in args.seeds:
        for e, combo in jobs:
            tag = e.name + "".join(f"_{_slug(k)}-{_slug(v)}" for k, v in combo.items())
            _write(f"[bench] {pentry.name} / {e.name}{' ' + _params_text(combo) if combo else ''} / seed {seed}",
                   sys.stderr)
            try:
                res = run_one(pentry, e, pparams, {**combo, **sparams[e.name]}, seed, args.device,
                              out / f"{tag}_seed{seed}",
                              args.epochs, progress=not args.no_progress, latency_batch=args.latency_batch,
                              latency_repeats=args.latency_repeats, pretrained=cache, plots=True,
                              ort=not args.no_ort)
            except Exception as exc:  # one failing solver must not lose the others' results
                log.error("%s failed: %s: %s", e.name, type(exc).__name__, exc, exc_info=args.verbose > 0)
                failures.append((e.name, seed, f"{type(exc).__name__}: {exc}"))
                continue
            run_write_failures.extend(res.get("write_failures", []))
            keys = list(e.params) + [k for k in sparams[e.name] if k not in e.params]
            shown = {k: res["solver_params"][k] for k in keys if k in res["solver_params"]}
            results.append(res)
            rows.append(_bench_row(res, shown))
    command = "admm-compress " + " ".join(shlex.quote(a) for a in args._argv)
    title = args.title or f"admm-compress bench {pentry.name}"
    md = [f"# {title}", "", f"Command: `{command}`", ""]
    if results and "answer" not in results[0]:
        r0 = results[0]
        md += [f"Problem parameters: {_params_text(r0['problem_params'])}; seeds {args.seeds}; device {r0['device']}.",
               f"Dense reference (seed {r0['seed']}): accuracy {r0['acc_before']:.2f} %, "
               f"{(r0['macs_before'] or 0) / 1e6:.3f} M MACs, {(r0['params_before'] or 0) / 1e6:.4f} M params "
               f"(ptflops, pytorch backend).",
               "Every row starts from that dense model and trains `epochs` more epochs (plus `finetune_epochs`); "
               "the `dense` row is the unconstrained run at the same budget. "
               "Drops are relative to the dense model; saved = bytes of the exported model's state-dict file "
               f"(dense: {r0.get('state_dict_bytes_before')} bytes); latency ratio = compressed / dense median latency "
               f"({r0.get('latency_note', '')}); ORT latency ratio = the same in ONNX Runtime "
               f"({r0.get('ort_note') or 'n/a'}); train-time ratio = median solver epoch time / "
               "median dense epoch time.",
               ""]
        md.append(_markdown(BENCH_HEADERS, rows))
    elif results:
        erows = [[r["solver"], r["seed"], ", ".join(f"{k}: {v:.2e}" for k, v in r["answer"]["errors"].items()),
                  f"{r['answer']['tolerance']:.1e}", "yes" if r["answer"]["ok"] else "NO", _fmt(r["wall_s"], ".2f")]
                 for r in results]
        md.append(_markdown(["solver", "seed", "relative error to known answer", "tolerance", "reached", "wall (s)"],
                            erows))
    if failures:
        md += ["", "Failed runs:", ""] + [f"- {n} (seed {s}): {msg}" for n, s, msg in failures]
    has_plot = bool(results) and "answer" not in results[0]
    targets = [(out / "bench.md", out / "bench.csv", out / "tradeoff.png")]
    if report_prefix is not None:
        prefix = report_prefix
        targets.append((prefix.with_name(prefix.name + ".md"), prefix.with_name(prefix.name + ".csv"),
                        prefix.with_name(prefix.name + ".png")))
    writer = _Writer()
    writer.failed = run_write_failures  # the runs' own files first, then the tables
    written = []
    for md_path, csv_path, png_path in targets:
        img = [f"![trade-off]({png_path.name})"] if has_plot else []
        written.append(writer.text(md_path, "\n".join(md + [""] + img) + "\n"))
        written.append(writer(csv_path, lambda p: _write_csv(Path(p), results)))
        if has_plot:
            from .. import plots as P

            rows_ = ([{"solver": r["solver"], "macs_drop": r["macs_drop"], "acc_after": r["acc_after"],
                       "setting": json.dumps(_jsonable(r["solver_params"]), sort_keys=True)} for r in results]
                     + [{"solver": "dense (pretrained, before)", "macs_drop": 0.0, "acc_after": r["acc_before"]}
                        for r in results])
            written.append(writer(png_path, lambda p: P.tradeoff(rows_, p, title)))
    _write("\n".join(md))
    _write("wrote " + ", ".join(str(p) for p in written))
    writer.report()
    return 1 if failures or not results or writer.failed else 0


def _write_csv(path: Path, results: list) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["problem", "solver", "seed", "solver_params", "acc_before", "acc_after", "acc_drop",
                    "macs_before", "macs_after", "macs_drop", "params_before", "params_after", "params_drop",
                    "latency_before_ms", "latency_after_ms", "latency_ratio", "time_ratio", "fit_wall_s",
                    "max_error", "ok", "state_dict_bytes_before", "state_dict_bytes", "ort_latency_before_ms",
                    "ort_latency_after_ms", "ort_latency_ratio"])
        for r in results:
            w.writerow([r["problem"], r["solver"], r["seed"], json.dumps(_jsonable(r["solver_params"])),
                        r.get("acc_before"), r.get("acc_after"), r.get("acc_drop"), r.get("macs_before"),
                        r.get("macs_after"), r.get("macs_drop"), r.get("params_before"), r.get("params_after"),
                        r.get("params_drop"), r.get("latency_before_ms"), r.get("latency_after_ms"),
                        r.get("latency_ratio"), r.get("time_ratio"), r.get("fit_wall_s", r.get("wall_s")),
                        r.get("answer", {}).get("max_error"), r.get("answer", {}).get("ok"),
                        r.get("state_dict_bytes_before"), r.get("state_dict_bytes"), r.get("ort_latency_before_ms"),
                        r.get("ort_latency_after_ms"), r.get("ort_latency_ratio")])


