"""The markdown tables of ``benchmarks/beac_batches.py``'s results files (``beac_<tag>.json``), apart from the
benchmark itself so that they load without torch: ``beac_batches.py`` prints them, and ``benchmarks/tables.py``
writes them into docs/beac.md and docs/benchmarks.md.

A results file holds ``results[schedule][method]`` with each run's figures (``reliability``, ``generalization``,
``locality``, ``general_ability_retention``, ``mean4``, ``fact_retention``, ``wikitext2_ppl``, ``l1_growth``, the
per-batch ``trace``); one file per ``--order-seed`` makes the "parts" of the tables over edit orders. Where a table
takes ``methods``, it is ``{label: method name in the files}``: the rows, in that order, under that label.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path


def signed(x: float) -> str:
    """+0.012 / −0.012 (a minus sign, as the docs write it)."""
    return f"{x:+.3f}".replace("-", "−")


def sched_label(sched: str) -> str:
    return sched.replace("x", "×")


def order_seed(part: dict) -> int:
    meta = part["meta"]
    return meta["order_seed"] if isinstance(meta, dict) else meta[0].get("order_seed", 0)


def schedule_table(runs: dict[str, dict]) -> str:
    """One schedule's runs: every figure of each method after its last batch."""
    cols = ["reliability", "generalization", "locality", "general_ability_retention", "mean4", "fact_retention",
            "wikitext2_ppl", "l1_growth", "edit_seconds"]
    lines = [("| method | rel | gen | loc | GA ret. | mean4 | fact ret. | ppl | L1 growth | max collisions | "
              "ROME efficacy | s |"), "|---" * 12 + "|"]
    for name, r in runs.items():
        coll = max(t["collisions"] for t in r["trace"])
        vals = [r[c] for c in cols]
        lines.append(
            f"| {name} | " + " | ".join(
                f"{v:.3f}" if i < 6 else (f"{v:.1f}" if i == 6 else (f"{v:.4f}" if i == 7 else f"{v:.0f}"))
                for i, v in enumerate(vals[:-1])
            ) + f" | {coll} | {r['metrics'].get('rome_efficacy_score', float('nan')):.3f} | {vals[-1]:.0f} |"
        )
    return "\n".join(lines)


def table(results) -> str:
    """Every schedule of one results file (what ``beac_batches.py`` prints after a run or ``--merge``)."""
    return "\n".join(f"\n{sched}\n{schedule_table(runs)}" for sched, runs in results.items())


def seed_schedule_table(parts: list[dict], sched: str, methods: dict[str, str] | None = None) -> str:
    """One schedule over several results files (one per ``--order-seed``): each method's figures per order, their
    mean and sample standard deviation, and its mean4 difference to the first method and to "B-EAC", paired by
    order. ``methods`` defaults to every method all files hold."""
    if methods is None:
        methods = {m: m for m in parts[0]["results"][sched] if all(m in p["results"][sched] for p in parts)}
    first = next(iter(methods.values()))
    lines = ["| method | " + " | ".join(f"{c} (per seed)" for c in ("rel", "GA ret.", "mean4", "L1 growth"))
             + f" | mean4 mean ± sd | Δmean4 vs {next(iter(methods))} (per seed) | Δmean4 vs B-EAC (per seed) |",
             "|---" * 8 + "|"]
    cols = ["reliability", "general_ability_retention", "mean4", "l1_growth"]
    ref = [p["results"][sched][first]["mean4"] for p in parts]
    full = ([p["results"][sched]["B-EAC"]["mean4"] for p in parts]
            if all("B-EAC" in p["results"][sched] for p in parts) else None)
    for label, m in methods.items():
        rows = [p["results"][sched][m] for p in parts]
        cells = [" / ".join(f"{r[c]:.3f}" if c != "l1_growth" else f"{r[c]:.2f}" for r in rows) for c in cols]
        m4 = [r["mean4"] for r in rows]
        sd = statistics.stdev(m4) if len(m4) > 1 else float("nan")
        diff = " / ".join(f"{a - b:+.3f}" for a, b in zip(m4, ref))
        diff_full = " / ".join(f"{a - b:+.3f}" for a, b in zip(m4, full)) if full else "-"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {statistics.mean(m4):.3f} ± {sd:.3f} | {diff} | "
                     f"{diff_full} |")
    return "\n".join(lines)


def seed_table(files: list[str]) -> str:
    """Per schedule and method: each results file's figures (one file per ``--order-seed``), their mean and sample
    standard deviation, and each method's mean4 difference to the first method and to B-EAC, paired by seed."""
    parts = [json.loads(Path(f).read_text()) for f in files]
    seeds = [order_seed(p) for p in parts]
    return "\n".join(f"\n{sched}, order seeds {seeds}\n{seed_schedule_table(parts, sched)}"
                   for sched in parts[0]["results"] if all(sched in p["results"] for p in parts))


def orders_table(parts: list[dict], sched: str, methods: dict[str, str], mean: bool = True) -> str:
    """One schedule over edit orders, a column per order: mean4 (rel / gen / loc / GA ret.), L1 growth; and the mean
    of mean4 over the orders. A method a file does not hold leaves its cell empty."""
    lines = ["| method | " + " | ".join(f"order {order_seed(p)}" for p in parts) + (" | mean4 mean |" if mean else " |"),
             "|---" * (len(parts) + 1 + mean) + "|"]
    for label, m in methods.items():
        runs = [p["results"].get(sched, {}).get(m) for p in parts]
        cells = [f"{r['mean4']:.3f} ({r['reliability']:.3f} / {r['generalization']:.3f} / {r['locality']:.3f} / "
                 f"{r['general_ability_retention']:.3f}), {r['l1_growth']:.2f}" if r else "" for r in runs]
        if mean:
            cells.append(f"{statistics.mean(r['mean4'] for r in runs):.3f}" if all(runs) else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def orders_summary(parts: list[dict], methods: dict[str, str], schedules: tuple[str, ...] = ("10x50", "20x25")) -> str:
    """mean4 per edit order for each schedule, and the range of L1 growth over the orders of the first schedule."""
    seeds = " / ".join(str(order_seed(p)) for p in parts)
    lines = ["| method | " + " | ".join(f"{sched_label(s)}, orders {seeds}" for s in schedules)
             + f" | L1 growth, {sched_label(schedules[0])} |", "|---" * (len(schedules) + 2) + "|"]
    for label, m in methods.items():
        cells = [" / ".join(f"{p['results'][s][m]['mean4']:.3f}" for p in parts) for s in schedules]
        l1 = [p["results"][schedules[0]][m]["l1_growth"] for p in parts]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {min(l1):.2f}-{max(l1):.2f} |")
    return "\n".join(lines)


def contrast_table(parts: list[dict], reference: str, methods: dict[str, str],
                   schedules: tuple[str, ...] = ("10x50", "20x25")) -> str:
    """The reference method's mean4 minus each method's, per schedule and edit order (what each ablated component
    contributes)."""
    seeds = " / ".join(str(order_seed(p)) for p in parts)
    lines = ["| | " + " | ".join(f"{sched_label(s)}, orders {seeds}" for s in schedules) + " |",
             "|---" * (len(schedules) + 1) + "|"]
    for label, m in methods.items():
        cells = [" / ".join(signed(p["results"][s][reference]["mean4"] - p["results"][s][m]["mean4"]) for p in parts)
                 for s in schedules]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _span(values, places: int) -> str:
    lo, hi = f"{min(values):.{places}f}", f"{max(values):.{places}f}"
    return lo if lo == hi else f"{lo}-{hi}"


def similarity_table(reports: list[dict]) -> str:
    """``benchmarks/batch_key_similarity.py``'s reports: |cos| between the keys of a batch's edits, in the C⁻¹ metric
    of the solve and plain, each figure as its range over the edited (MEMIT) layers."""
    lines = ["| batches | \\|cos\\| in C⁻¹ over the three MEMIT layers: median / p90 / max | plain \\|cos\\|: median |",
             "|---|---|---|"]
    for rep in reports:
        layers = list(rep["layers"].values())

        def fig(key: str, stat: str, layers: list[dict] = layers) -> list[float]:
            return [layer[key][stat] for layer in layers]

        label = "two corrections per subject: other pairs" if rep.get("pairs") else f"CounterFact, {rep['batch']} edits"
        lines.append(f"| {label} | {_span(fig('cos_cinv', 'median'), 3)} / {_span(fig('cos_cinv', 'p90'), 3)} / "
                     f"{_span(fig('cos_cinv', 'max'), 2)} | {_span(fig('cos_plain', 'median'), 2)} |")
        if rep.get("pairs"):
            lines.append(f"| two corrections per subject: the same subject's pair | "
                         f"{_span(fig('cos_cinv_same_subject', 'median'), 3)} (minimum "
                         f"{_span(fig('cos_cinv_same_subject', 'min'), 2)}) | |")
    return "\n".join(lines)
