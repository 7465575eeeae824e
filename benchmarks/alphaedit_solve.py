"""AlphaEdit's per-layer solve at real widths: the published form against the null-space form this project runs.

The published code (``AlphaEdit_main.py``, EasyEdit's ``AlphaEdit``) solves, per edited layer and batch,

    (P (K Kᵀ + K_p K_pᵀ) + α I) X = P K                 P: d_k × d_k, a product of two d_k × d_k matrices and an LU

while ``methods/alphaedit.py`` solves the same system as X = U₀ (U₀ᵀMU₀ + αI)⁻¹ U₀ᵀK with the record
G = U₀ᵀK_pK_pᵀU₀ kept up to date (an r × r Cholesky, ``null_space_solve``). Both are timed here on random inputs of
the real shapes (float64, as both run on this project; the published code runs it in float32 on its GPU), with the
same r, n and α, and their results compared::

    OMP_NUM_THREADS=1 python benchmarks/alphaedit_solve.py --widths 1600:6400 --batch 10 --repeats 3
    OMP_NUM_THREADS=1 python benchmarks/alphaedit_solve.py --widths 4096:14336 --batch 100 --repeats 1

r is the null space's dimension: ``--null-share`` of d_k (default 0.68: a covariance over 2,048 tokens, as the
real-width proxies use, has rank at most 2,048, so at GPT2-XL width r >= 4,352 of 6,400). Rows go to
``benchmarks/results/alphaedit_solve.json`` (a width measured again replaces its row).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from eac_lightning.methods.alphaedit import null_space_solve

RESULTS = REPO / "benchmarks" / "results" / "alphaedit_solve.json"


def inputs(d_k: int, r: int, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(d_k, r, dtype=torch.float64, generator=g))
    past = torch.randn(d_k, 4 * n, dtype=torch.float64, generator=g)  # four earlier batches
    keys = torch.randn(d_k, n, dtype=torch.float64, generator=g)
    return basis, past @ past.T, keys


def published(P: torch.Tensor, past_kkt: torch.Tensor, keys: torch.Tensor, l2: float) -> torch.Tensor:
    """AlphaEdit_main.py: torch.linalg.solve(P @ (K Kᵀ + cache_c) + L2·I, P @ K)."""
    eye = torch.eye(P.shape[0], dtype=P.dtype)
    return torch.linalg.solve(P @ (keys @ keys.T + past_kkt) + l2 * eye, P @ keys)


def timed(fn, repeats: int) -> tuple[list[float], torch.Tensor]:
    seconds, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        seconds.append(time.perf_counter() - t0)
    return seconds, out


def measure(d: int, d_k: int, n: int, share: float, l2: float, repeats: int, skip_published: bool) -> dict:
    r = round(share * d_k)
    basis, past_kkt, keys = inputs(d_k, r, n)
    null_kkt = basis.T @ past_kkt @ basis
    ours_s, ours = timed(lambda: null_space_solve(basis, null_kkt, keys, l2), repeats)
    # keeping G up to date after the write: G += (U₀ᵀK)(U₀ᵀK)ᵀ
    acc_s, _ = timed(lambda: (basis.T @ keys) @ (basis.T @ keys).T, repeats)
    row = {"width": f"{d}:{d_k}", "d_k": d_k, "r": r, "batch": n, "l2": l2, "repeats": repeats,
           "ours_s": ours_s, "accumulate_s": acc_s,
           "ours_flops": r ** 3 / 3 + 2 * r * r * n + 4 * d_k * r * n,
           "published_flops": 2 * d_k ** 3 + 2 * d_k ** 3 / 3 + 4 * d_k * d_k * n}
    if not skip_published:
        P = basis @ basis.T
        pub_s, pub = timed(lambda: published(P, past_kkt, keys, l2), repeats)
        row["published_s"] = pub_s
        row["max_rel_difference"] = ((ours - pub).abs().max() / pub.abs().max()).item()
    return row


def table(data: dict) -> str:
    head = ("| width (d : d_k) | null space r | batch n | published form (s) | null-space form (s) | speed-up "
            "| FLOP ratio | max relative difference |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in data["rows"]:
        ours = statistics.median(r["ours_s"]) + statistics.median(r["accumulate_s"])
        pub = statistics.median(r["published_s"]) if "published_s" in r else None
        diff = r.get("max_rel_difference")
        lines.append(
            f"| {r['width']} | {r['r']:,} | {r['batch']} | {'–' if pub is None else f'{pub:.2f}'} | {ours:.2f} "
            f"| {'–' if pub is None else f'{pub / ours:.1f}x'} | {r['published_flops'] / r['ours_flops']:.1f}x "
            f"| {'–' if diff is None else f'{diff:.1e}'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--widths", nargs="+", default=["1600:6400"], help="d:d_k of each shape")
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--null-share", type=float, default=0.68)
    ap.add_argument("--l2", type=float, default=10.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-published", action="store_true", help="time the null-space form only")
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"rows": []}
    command = "python benchmarks/alphaedit_solve.py " + " ".join(sys.argv[1:] if argv is None else argv)
    for width in args.widths:
        d, d_k = (int(x) for x in width.split(":"))
        row = measure(d, d_k, args.batch, args.null_share, args.l2, args.repeats, args.skip_published)
        row.update(command=command, threads=torch.get_num_threads(), machine=platform.processor() or platform.machine(),
                   load_average=os.getloadavg()[0])
        data["rows"] = [x for x in data["rows"] if (x["width"], x["batch"]) != (width, args.batch)] + [row]
        RESULTS.write_text(json.dumps(data, indent=2) + "\n")
        print(table({"rows": [row]}), flush=True)


if __name__ == "__main__":
    main()
