"""Runs the test suite once per Keras flavour and prints every flavour's result.

    python tests/run_flavours.py [PYTEST ARGS...]

Each flavour runs in its own process (the flavour is fixed when keras_parallel
is first imported), with TensorFlow's oneDNN CPU kernels forced on for one and
off for the other, since they behave differently (a convolution on 0 rows,
CPU allocator statistics) and which one a machine uses by default depends on
its CPU (on with AVX-512):

- Keras 3, TensorFlow backend, oneDNN on  (TF_ENABLE_ONEDNN_OPTS=1)
- tf-keras,                    oneDNN off (TF_ENABLE_ONEDNN_OPTS=0)
- Keras 3, JAX backend, 3 host devices    (when jax is installed: `.[jax]`)
- Keras 3, torch backend                  (when torch is installed: `.[torch]`)

On JAX and torch only the backend-neutral tests run (tests/conftest.py lists
them); the rest exercise TensorFlow itself.

Every flavour runs even when an earlier one fails; the exit status is non-zero
when any failed. The last line sums them up. `--flavour NAME` (repeatable:
`tensorflow`, `tf_keras`, `jax`, `torch`) runs only those flavours; `--neutral`
runs only the backend-neutral tests on TensorFlow too (CI's run at the oldest
versions pyproject.toml allows). Other arguments go to pytest (`-x`, `-k name`, a
test file).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_KERAS3 = ["TF_USE_LEGACY_KERAS", "KERAS_BACKEND"]
FLAVOURS = [
    ("Keras 3 (TensorFlow), oneDNN on", {"TF_ENABLE_ONEDNN_OPTS": "1"}, _KERAS3, "tensorflow"),
    (
        "tf-keras, oneDNN off",
        {"TF_ENABLE_ONEDNN_OPTS": "0", "TF_USE_LEGACY_KERAS": "1"},
        ["KERAS_BACKEND"],
        "tf_keras",
    ),
    (
        "Keras 3 (JAX)",
        {"KERAS_BACKEND": "jax", "XLA_FLAGS": "--xla_force_host_platform_device_count=3"},
        ["TF_USE_LEGACY_KERAS"],
        "jax",
    ),
    ("Keras 3 (torch)", {"KERAS_BACKEND": "torch"}, ["TF_USE_LEGACY_KERAS"], "torch"),
]


def _counts(junit: Path) -> dict[str, int]:
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    if not junit.exists():
        return counts
    root = ET.parse(junit).getroot()
    for suite in [root] if root.tag == "testsuite" else root.iter("testsuite"):
        tests = int(suite.get("tests", 0))
        failed = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
        skipped = int(suite.get("skipped", 0))
        counts["failed"] += failed
        counts["skipped"] += skipped
        counts["passed"] += tests - failed - skipped
    return counts


def _chosen(argv: list[str]) -> tuple[set[str] | None, list[str]]:
    """(the flavours named by `--flavour NAME`, or None for all; pytest's arguments)."""
    names = {needs for *_, needs in FLAVOURS}
    chosen: set[str] = set()
    rest = []
    args = iter(argv)
    for arg in args:
        if arg == "--flavour" or arg.startswith("--flavour="):
            name = arg.split("=", 1)[1] if "=" in arg else next(args, "")
            if name not in names:
                raise SystemExit(
                    f"Invalid value for `--flavour`. Expected one of {sorted(names)}. "
                    f"Received: {name!r}"
                )
            chosen.add(name)
        else:
            rest.append(arg)
    return (chosen or None), rest


def main(argv: list[str]) -> int:
    chosen, argv = _chosen(argv)
    neutral = "--neutral" in argv
    argv = [a for a in argv if a != "--neutral"]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for index, (label, set_env, unset, needs) in enumerate(FLAVOURS):
            if chosen is not None and needs not in chosen:
                continue
            if importlib.util.find_spec(needs) is None:
                print(f"\n===== {label}: not run ({needs} is not installed) =====", flush=True)
                continue
            env = {k: v for k, v in os.environ.items() if k not in unset}
            env.update(set_env)
            if neutral:
                env["KERAS_PARALLEL_NEUTRAL_ONLY"] = "1"
            junit = Path(tmp) / f"flavour{index}.xml"
            print(f"\n===== {label} =====", flush=True)
            code = subprocess.call(
                [sys.executable, "-m", "pytest", f"--junitxml={junit}", *argv],
                cwd=ROOT,
                env=env,
            )
            counts = _counts(junit)
            if code not in (0, 5) and counts["failed"] == 0:
                counts["failed"] = 1  # pytest itself failed (collection, usage)
            results.append((label, code, counts))
    print("\n===== every flavour =====")
    total = {"passed": 0, "failed": 0, "skipped": 0}
    for label, _code, counts in results:
        print(
            f"{label:34s} {counts['passed']} passed, {counts['failed']} failed, "
            f"{counts['skipped']} skipped"
        )
        for key in total:
            total[key] += counts[key]
    print(
        f"flavours: {total['passed']} passed, {total['failed']} failed, {total['skipped']} skipped"
    )
    return 1 if total["failed"] or total["passed"] == 0 else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
