"""How much of its tolerance each numerical assertion uses, under each XLA:CPU ISA cap.

Runs the given tests (default: the numerics-heavy files, slow tests included) once per ISA with
bench/noise_plugin.py recording every `rel_err(a, b) < TOL` and `np.testing.assert_allclose`, then prints
one line per assertion site: its tolerance, the worst fraction of it used under each ISA (> 1 fails)
and the headroom (1 / worst used, over all ISAs and parametrizations).

    .venv/bin/python bench/tolerance_report.py                                # all ISAs, numerics files
    .venv/bin/python bench/tolerance_report.py --isas default,SSE4_2 -- tests/test_sharding.py
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ISAS = ("default", "SSE4_2", "AVX", "AVX2", "AVX512")
NUMERICS = [
    "tests/test_parity_dense.py",
    "tests/test_moe.py",
    "tests/test_moe_block.py",
    "tests/test_sharding.py",
    "tests/test_generate.py",
    "tests/test_train_loss.py",
    "tests/test_model_options.py",
    "tests/test_convert.py",
]


def run(isa, tests, marker, log):
    env = dict(os.environ, NOISE_LOG=log, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "bench")]))
    if isa != "default":
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_cpu_max_isa={isa}").strip()
    start = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "noise_plugin", "-m", marker, "-p", "no:cacheprovider", *tests],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-500:]
    print(f"# {isa:8s} exit {proc.returncode}  {time.time() - start:6.0f}s  {summary}", flush=True)
    if proc.returncode:
        print("\n".join(line for line in proc.stdout.splitlines() if line.startswith("FAILED")), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--isas", default=",".join(ISAS))
    ap.add_argument("-m", dest="marker", default="", help="pytest -m expression (default '': slow tests too)")
    ap.add_argument("--json", help="also write the per-site table here")
    ap.add_argument("tests", nargs="*", default=NUMERICS)
    args = ap.parse_args()
    isas = args.isas.split(",")
    worst = collections.defaultdict(dict)  # site -> isa -> (used, value, tol, test)
    with tempfile.TemporaryDirectory() as tmp:
        for isa in isas:
            log = os.path.join(tmp, f"{isa}.jsonl")
            run(isa, args.tests, args.marker, log)
            if not os.path.exists(log):
                continue
            with open(log) as f:
                for line in f:
                    r = json.loads(line)
                    if r.get("used") is None:
                        continue
                    best = worst[r["site"]].get(isa)
                    if best is None or r["used"] > best[0]:
                        worst[r["site"]][isa] = (r["used"], r["value"], r.get("tol"), r["test"])
    print(f"\n{'site':34s} {'tolerance':>10s} " + " ".join(f"{i:>8s}" for i in isas) + "  headroom  worst case")
    table = {}
    for site in sorted(worst, key=lambda s: (s.split(":")[0], int(s.split(":")[1]))):
        per = worst[site]
        top = max(per.values(), key=lambda v: v[0])
        cols = " ".join(f"{per[i][0]:8.3f}" if i in per else f"{'-':>8s}" for i in isas)
        headroom = 1 / top[0] if top[0] > 0 else float("inf")
        tol = f"{top[2]:10.2e}" if top[2] is not None else f"{'?':>10s}"
        print(f"{site:34s} {tol} {cols}  {headroom:8.1f}  {top[3].split('::', 1)[-1]}")
        table[site] = {i: dict(zip(("used", "value", "tol", "test"), per[i])) for i in per}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(table, f, indent=1)


if __name__ == "__main__":
    main()
