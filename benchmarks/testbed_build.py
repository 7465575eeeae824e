"""Testbed build time and quality (issue 3: the ``small`` preset must build in under 30 minutes on a 2-core CPU).

Builds one preset from scratch and reports wall time (corpus + tokenizer + training + measurements), training
time, the process's CPU time, the machine's load average before and after (the CPU may be shared: a load above
the core count slows the build proportionally) and the testbed's measured figures. The result is printed and
written to ``benchmarks/results/testbed_build_<preset>.json``.

Usage::

    nice python benchmarks/testbed_build.py --preset small            # build into a temporary folder
    nice python benchmarks/testbed_build.py --preset small --install  # ... and install it as the cached testbed
    python benchmarks/testbed_build.py --preset tiny --out /tmp/tb

``--install`` moves the build into the cache folder that ``testbed:<preset>`` resolves to (unless one is already
there), so the measured build is the one every later run uses.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

LIMITS_SECONDS = {"tiny": 60, "small": 30 * 60}
FIGURES = (
    "n_parameters",
    "train_seconds",
    "build_seconds",
    "fact_accuracy",
    "trained_prompt_accuracy",
    "heldout_paraphrase_accuracy",
    "neighbourhood_accuracy",
    "attribute_accuracy",
    "sst2_heldout_accuracy",
    "wikitext2_test_perplexity",
    "edit_layer",
    "memit_layers",
)


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="build folder (default: a temporary folder)")
    ap.add_argument("--install", action="store_true", help="install the build as the cached testbed:<preset>")
    ap.add_argument("--results", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)

    import torch

    from eac_lightning.testbed.build import build_testbed, testbed_dir

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix=f"testbed-{args.preset}-"))
    load_before = os.getloadavg()
    t0, c0 = time.time(), cpu_seconds()
    info = build_testbed(out, args.preset, seed=args.seed)
    wall, cpu = time.time() - t0, cpu_seconds() - c0
    load_after = os.getloadavg()

    report = {
        "preset": args.preset,
        "seed": args.seed,
        "wall_seconds": round(wall, 1),
        "process_cpu_seconds": round(cpu, 1),
        "limit_seconds": LIMITS_SECONDS.get(args.preset),
        "within_limit": wall < LIMITS_SECONDS[args.preset] if args.preset in LIMITS_SECONDS else None,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_1_5_15_before": [round(x, 2) for x in load_before],
        "loadavg_1_5_15_after": [round(x, 2) for x in load_after],
        "platform": platform.platform(),
        "processor": platform.processor(),
        "figures": {k: info.get(k) for k in FIGURES},
        "by_source": info.get("by_source"),
        "corpus": info.get("corpus"),
        "train_tokens": info.get("train_tokens"),
        "out": str(out),
    }
    if args.install:
        final = testbed_dir(args.preset, args.seed)
        if (final / "testbed.json").exists():
            report["installed"] = f"not installed: {final} already holds a testbed"
        else:
            final.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(out), str(final))
            report["installed"] = str(final)
            report["out"] = str(final)

    print(json.dumps(report, indent=2))
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / f"testbed_build_{args.preset}.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
