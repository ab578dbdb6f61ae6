"""pytest plugin: records how much of its tolerance every numerical assertion of the suite uses.

Loaded by bench/tolerance_report.py (`-p noise_plugin`, with bench/ on PYTHONPATH); writes one JSON
line per check to $NOISE_LOG. It wraps the two forms the suite's tolerances take:
  * `rel_err(a, b) < TOL` (tests/hf_utils.py): records rel_err's value and, where the comparison is on
    the calling line, the tolerance it is compared with;
  * `np.testing.assert_allclose(a, b, rtol, atol)`: records max |a - b| / (atol + rtol |b|), the fraction
    of the tolerance used (> 1 fails), before the real assertion runs.
It changes no outcome: the wrapped functions return and raise exactly as before. Never import it from
the tests; it must not import jax (conftest sets XLA_FLAGS first).
"""

from __future__ import annotations

import ast
import json
import linecache
import os
import sys

import numpy as np

_TESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
_LOG = os.environ.get("NOISE_LOG")


def _write(record):
    if _LOG:
        with open(_LOG, "a") as f:
            f.write(json.dumps(record) + "\n")


def _site(frame):
    name = os.path.relpath(frame.f_code.co_filename, os.path.dirname(_TESTS))
    return f"{name}:{frame.f_lineno}", os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0]


def _compared_with(frame, func_name):
    """The right-hand side of `func_name(...) < X` on the caller's line, evaluated in its frame."""
    line = linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip()
    try:
        tree = ast.parse(line)
    except SyntaxError:
        return None
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Compare)
            and isinstance(node.left, ast.Call)
            and getattr(node.left.func, "id", None) == func_name
            and isinstance(node.ops[0], (ast.Lt, ast.LtE))
        ):
            try:
                return float(
                    eval(compile(ast.Expression(node.comparators[0]), "<tol>", "eval"), frame.f_globals, frame.f_locals)
                )
            except Exception:
                return None
    return None


def _install():
    sys.path.insert(0, _TESTS)
    import hf_utils

    real_rel_err = hf_utils.rel_err

    def rel_err(a, b):
        value = real_rel_err(a, b)
        frame = sys._getframe(1)
        site, test = _site(frame)
        if site.startswith("tests/"):
            tol = _compared_with(frame, "rel_err")
            _write(dict(site=site, test=test, kind="rel_err", value=value, tol=tol, used=value / tol if tol else None))
        return value

    hf_utils.rel_err = rel_err

    real_allclose = np.testing.assert_allclose

    def assert_allclose(actual, desired, rtol=1e-7, atol=0, *args, **kwargs):
        frame = sys._getframe(1)
        site, test = _site(frame)
        if site.startswith("tests/"):
            try:
                a = np.asarray(actual, np.float64)
                b = np.asarray(desired, np.float64)
                diff = np.abs(a - b)
                allowed = atol + rtol * np.abs(b)
                used = float(np.max(diff / np.maximum(allowed, 1e-300))) if diff.size else 0.0
                _write(
                    dict(
                        site=site,
                        test=test,
                        kind="allclose",
                        value=float(diff.max()) if diff.size else 0.0,
                        tol=float(np.max(allowed)) if np.size(allowed) else None,
                        used=used,
                        rtol=float(rtol),
                        atol=float(atol),
                    )
                )
            except Exception as e:  # never let the recorder change an outcome
                _write(dict(site=site, test=test, kind="allclose", error=repr(e)))
        return real_allclose(actual, desired, rtol, atol, *args, **kwargs)

    np.testing.assert_allclose = assert_allclose


_install()
