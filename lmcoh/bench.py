"""Benchmarks: ``python -m lmcoh.bench [--exact] [--lm] [--selftrain] [--json]``.

Each section is a function returning a dict of measurements and printing a small table; with
no flag every section runs. Performance targets of the issues are checked here, not in tests.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


def bench_exact(depths=(6, 7, 8, 9, 10), steps: int = 8) -> dict:
    """All five sequences, ``steps`` steps, on random-tree:T=...,A=4,stochastic=1,seed=0.

    Target (issue 3): T = 10 (about 1.4 million states) in under 30 s and 4 GB.
    """
    from . import exact
    from .generators import generate

    rows = []
    print(f"exact oracle: all {len(exact.SEQUENCES)} sequences, {steps} steps, summaries of every policy")
    print(f"{'task':<42} {'states':>9} {'build s':>8} {'oracle s':>9} {'cpu s':>7} {'peak GB':>8}")
    for T in depths:
        spec = f"random-tree:T={T},A=4,stochastic=1,seed=0"
        t0 = time.perf_counter()
        task = generate(spec)
        task.layers
        t1, c1 = time.perf_counter(), time.process_time()
        exact.analyse(task, steps=steps, policies=False)
        t2, c2 = time.perf_counter(), time.process_time()
        row = {"task": spec, "states": task.n_states, "build_seconds": t1 - t0,
               "oracle_seconds": t2 - t1, "oracle_cpu_seconds": c2 - c1, "peak_rss_gb": _peak_rss_gb()}
        rows.append(row)
        print(f"{spec:<42} {task.n_states:>9} {row['build_seconds']:>8.2f} {row['oracle_seconds']:>9.2f} "
              f"{row['oracle_cpu_seconds']:>7.2f} {row['peak_rss_gb']:>8.2f}")
    for a, b in zip(rows, rows[1:]):
        b["growth_vs_previous"] = b["oracle_seconds"] / max(a["oracle_seconds"], 1e-9)
    if len(rows) > 1:
        growth = ", ".join(f"{r['growth_vs_previous']:.1f}x" for r in rows[1:])
        print(f"time per extra level of depth: {growth} (states grow 4x per level)")
    last = rows[-1]
    ok = last["build_seconds"] + last["oracle_seconds"] < 30 and last["peak_rss_gb"] < 4
    print(f"target T=10 under 30 s and 4 GB: {'met' if ok else 'NOT met'} "
          "(wall clock; 'cpu s' is the process's own CPU time, a steadier figure on a busy machine)")
    return {"rows": rows, "target_met": ok}


SECTIONS = {"exact": bench_exact}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmcoh.bench", description=__doc__.splitlines()[0])
    for name, fn in SECTIONS.items():
        parser.add_argument(f"--{name}", action="store_true", help=fn.__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="FILE", help="also write the measurements as JSON to FILE")
    args = parser.parse_args(argv)
    chosen = [n for n in SECTIONS if getattr(args, n)] or list(SECTIONS)
    results = {}
    for name in chosen:
        results[name] = SECTIONS[name]()
        print()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
