"""The results tables of README.md and docs/*.md, generated from ``benchmarks/results/``.

A generated table sits between two markers in the markdown::

    <!-- table: method_table_small -->
    ...the table, and a line naming its results file and the command that made its rows...
    <!-- /table -->

and :data:`TABLES` maps its name to its results files and the benchmark script's own function that prints it.
Measured numbers are changed in the results files (by running the benchmark), never in the docs::

    python benchmarks/tables.py                  # rewrite every generated table from its results file
    python benchmarks/tables.py --check          # exit 1, naming each table that differs from its results file
    python benchmarks/tables.py --list           # every table: its results files and where it is placed
    python benchmarks/tables.py --commands NAME  # the commands recorded in a table's results files

``tests/test_tables.py`` runs ``--check``. A table whose results file is still being measured (``pending``) holds
a line saying so until the file is complete; ``python benchmarks/tables.py`` then fills it in.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))  # the benchmark scripts, whose table functions render the tables

BLOCK = re.compile(r"^(?P<indent>[ \t]*)<!-- table: (?P<name>[\w.-]+) -->\n(?P<body>.*?)^(?P=indent)<!-- /table -->",
                   re.MULTILINE | re.DOTALL)
RESULTS = "benchmarks/results/"


@dataclass
class Table:
    """One generated table: its results files (relative to the repository), the function that turns their loaded
    contents (in that order) into markdown, and the script's documented command, named where a results file records
    no command of its own."""

    results: tuple[str, ...]
    render: Callable[[list[Any]], str]
    usage: str
    pending: Callable[[list[Any]], bool] | None = None  # True while the results are being measured
    what: str = ""  # what the placeholder of a pending table says will be here
    docs: list[str] = field(default_factory=list)  # filled by find_blocks, for --list


# ----------------------------------------------------------------------------------------------------- helpers
# Selection and layout only: every number is formatted by the benchmark's own table function.


def cells(line: str) -> list[str]:
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def row(values: list[str]) -> str:
    return "| " + " | ".join(values) + " |"


def rule(align: list[str]) -> str:
    return "|" + "|".join(align) + "|"


def parse(md: str) -> tuple[list[str], list[str], list[list[str]]]:
    """A markdown table's header, alignment row and body rows (as cells); text around it is dropped."""
    lines = [ln for ln in md.splitlines() if ln.strip().startswith("|")]
    return cells(lines[0]), cells(lines[1]), [cells(ln) for ln in lines[2:]]


def columns(md: str, keep: list[str], rename: dict[str, str] | None = None) -> str:
    """The table with only the columns ``keep`` (by header, in that order), headers renamed by ``rename``."""
    head, align, body = parse(md)
    idx = [head.index(k) for k in keep]
    rename = rename or {}
    return "\n".join([row([rename.get(head[i], head[i]) for i in idx]), rule([align[i] for i in idx]),
                      *(row([r[i] for i in idx]) for r in body)])


def stack(parts: list[tuple[str, str]], name: str) -> str:
    """Tables of the same columns one under the other, each row led by its part's value in a new first column."""
    out = []
    for value, md in parts:
        head, align, body = parse(md)
        if not out:
            out = [row([name, *head]), rule(["---", *align])]
        out += [row([value, *r]) for r in body]
    return "\n".join(out)


def pick(rows: list[dict], methods: dict[str, str], key: str = "method") -> list[dict]:
    """``rows`` (dicts with a ``key``) selected and ordered by ``methods`` = {label: name}, relabelled."""
    by_name = {r[key]: r for r in rows}
    return [{**by_name[name], key: label} for label, name in methods.items()]


def pick_runs(runs: dict[str, dict], methods: dict[str, str]) -> dict[str, dict]:
    return {label: runs[name] for label, name in methods.items()}


def same(*names: str) -> dict[str, str]:
    return {n: n for n in names}


# ---------------------------------------------------------------------------------------------- the tables


def _method_table(data):
    from method_table import table

    return table(data[0]["rows"])


def _stopping_rule(data):
    from stopping_rule import table

    return table(*data)


def _edit_speed(data):
    from edit_speed import markdown

    return markdown(data[0]["results"])


def _target_grouping(data):
    from target_grouping import table

    return table(data)


def _long_stream(order: dict[str, str] | None = None):
    def render(data):
        from long_stream import table

        rows = data[0]["rows"]
        return table(pick(rows, order) if order else rows)

    return render


def _insertion_leakage(data):
    from insertion_leakage import table

    return table(data[0]["rows"])


def _sequential(labels: dict[str, str] | None = None):
    def render(data):
        from sequential_edits import table

        results = {m: {"summary": s} for m, s in data[0].items()}
        return table(pick_runs(results, labels) if labels else results)

    return render


def _memory(data):
    from memory_scale import markdown

    return markdown(data[0])


def _eval_throughput(data):
    # the file is the script's own printed output; its table is the table
    return "\n".join(ln for ln in data[0].splitlines() if ln.startswith("|"))


def _live_cost(data):
    from live_cost import table

    return table(data[0])


def _shipped_precision(data):
    from shipped_precision import table

    return table(data[0])


def _trace(data):
    from testbed_build import trace_table

    return trace_table(data[0]["trace"])


def _edit_log(data):
    from edit_log_cost import table

    return table(data[0])


def _real_width(data):
    from real_width import table

    return table(data[0])


def _alphaedit_solve(data):
    from alphaedit_solve import table

    return table(data[0])


def _easyedit_quality(data):
    from reference.easyedit_compare import quality_table

    return quality_table(data[0]["quality"])


def _easyedit_cost(data):
    from reference.easyedit_compare import cost_table

    return cost_table(data[0]["cost"])


def _edit_log_pending(data) -> bool:
    return data[0] is None or not all(k in data[0] for k in ("steps", "editor", "fit"))


# B-EAC, beac_small-s12*.json: "B-EAC" there is the beac preset (over AlphaEdit's solve)
S12 = tuple(f"{RESULTS}beac_small-s12{s}.json" for s in ("", "-seed1", "-seed2"))
S13_PAIRS = tuple(f"{RESULTS}beac_small-s13-pairs{s}.json" for s in ("", "-seed1", "-seed2"))
E20_LAS = tuple(f"{RESULTS}beac_small-e20-las{s}.json" for s in ("", "-seed1", "-seed2"))
BEAC_METHODS = {**same("MEMIT", "MEMIT-EAC", "UltraEdit", "AlphaEdit", "B-EAC w/o refresh"),
                "**B-EAC** (`beac`)": "B-EAC"}
BEAC_USAGE = "python benchmarks/beac_batches.py --model testbed:small --schedules 10x50 20x25 --order-seed N ..."
BEAC_COLUMNS = ["method", "rel", "gen", "loc", "GA ret.", "mean4"]


def _beac_orders(sched: str, methods: dict[str, str], mean: bool = True):
    def render(data):
        from beac_tables import orders_table

        return orders_table(data, sched, methods, mean=mean)

    return render


def _beac_summary(data):
    from beac_tables import orders_summary

    return orders_summary(data, BEAC_METHODS)


def _beac_ablations(data):
    from beac_tables import schedule_table

    methods = {
        "**B-EAC**": "B-EAC",
        "B-EAC, refresh 0.5": "B-EAC, refresh 0.5",
        "B-EAC w/o refresh": "B-EAC w/o refresh",
        "B-EAC w/o usage penalty (refresh kept)": "B-EAC w/o usage penalty",
        "B-EAC w/o LAS (identical to B-EAC: same anchors, same L1 growth to 4 digits)": "B-EAC w/o LAS",
        "B-EAC, LAS's bound binding (`overlap_slack` 1)": "B-EAC, LAS bound binding",
        "B-EAC w/o EAC: every dimension an anchor, no elastic net (≈ AlphaEdit with the refresh)":
            "B-EAC w/o EAC (every dimension, no elastic net)",
        "B-EAC w/o RAR (no usage penalty, no refresh), identical to AlphaEdit-EAC P50 (= w/o LAS, w/o RAR)":
            "B-EAC w/o RAR",
        "AlphaEdit": "AlphaEdit",
    }
    md = schedule_table(pick_runs(data[0]["results"]["10x50"], methods))
    return columns(md, [*BEAC_COLUMNS, "L1 growth"])


def _beac_rar_parts(data):
    from beac_tables import seed_schedule_table

    methods = {"**B-EAC**": "B-EAC", "B-EAC w/o usage penalty (refresh only)": "B-EAC w/o usage penalty",
               "B-EAC w/o refresh (usage penalty only)": "B-EAC w/o refresh",
               "B-EAC w/o RAR (= AlphaEdit-EAC P50)": "B-EAC w/o RAR"}
    md = seed_schedule_table(data, "10x50", methods)
    return columns(md, ["method", "mean4 (per seed)", "Δmean4 vs B-EAC (per seed)"],
                   {"mean4 (per seed)": "mean4, orders 0 / 1 / 2", "Δmean4 vs B-EAC (per seed)": "Δ against B-EAC"})


def _beac_long_streams(data):
    from long_stream import table

    keep = ["method", "z stops on", "mean4", "rel", "gen", "loc", "fact ret.", "ppl ratio", "L1 growth", "s/edit"]
    parts = [("2,000", pick(data[0]["rows"], {"**beac**": "beac", **same("beac, record weight 1", "beac, record weight 4", "beac, refresh 0.5", "beac, refresh replaces key", "alphaedit")}))]
    return stack([(n, columns(table(rows), keep)) for n, rows in parts], "edits")


def _beac_memit_order0(data):
    from beac_tables import schedule_table

    # In beac_small-e20-*.json "B-EAC" is the B-EAC over MEMIT's solve (today's "B-EAC (MEMIT)", beac-memit)
    methods = {
        "MEMIT-EAC": "MEMIT-EAC",
        "**B-EAC (MEMIT)**": "B-EAC",
        "B-EAC (MEMIT) w/o LAS": "B-EAC w/o LAS",
        "B-EAC (MEMIT) w/o RAR": "B-EAC w/o RAR",
        "B-EAC (MEMIT) w/o overlap bound": "B-EAC w/o overlap bound",
        "B-EAC (MEMIT), key record in every row": "B-EAC, key record in every row",
        "B-EAC (MEMIT), `overlap_slack` 1 (c = 8)": "B-EAC, overlap_slack 1",
        "B-EAC (MEMIT), usage penalty off (β = 0)": "B-EAC, usage penalty off (β = 0)",
        "B-EAC (MEMIT), `layers_per_anchor` 2": "B-EAC, layers_per_anchor 2",
    }
    md = schedule_table(pick_runs(data[0]["results"]["10x50"], methods))
    return stack([("10×50", columns(md, [*BEAC_COLUMNS, "fact ret.", "ppl", "L1 growth"]))], "schedule")


def _key_similarity(data):
    from beac_tables import similarity_table

    return similarity_table(data)


def _beac_memit_contributions(data):
    from beac_tables import contrast_table

    return contrast_table(data, "B-EAC", {
        "B-EAC (MEMIT) − MEMIT-EAC": "MEMIT-EAC",
        "LAS: − B-EAC (MEMIT) w/o LAS": "B-EAC w/o LAS",
        "RAR: − B-EAC (MEMIT) w/o RAR": "B-EAC w/o RAR",
        "overlap bound: − w/o overlap bound": "B-EAC w/o overlap bound",
    })


TABLES: dict[str, Table] = {
    "method_table_small": Table(
        (f"{RESULTS}method_table_small.json",), _method_table,
        "python benchmarks/method_table.py --methods rome rome-eac memit memit-eac alphaedit nas beac beac-memit ft "
        "ft-en alphaedit-eac ultraedit --out benchmarks/results/method_table_small.json"),
    "stopping_rule_small": Table(
        (f"{RESULTS}stopping_rule_small_nll.json", f"{RESULTS}stopping_rule_small_published.json"), _stopping_rule,
        "OMP_NUM_THREADS=1 python benchmarks/stopping_rule.py (published) and the method table at commit a6cd86a"),
    "edit_speed_small": Table(
        (f"{RESULTS}edit_speed-testbed-small.json",), _edit_speed,
        "python benchmarks/edit_speed.py --model testbed:small ..."),
    "target_grouping_small": Table(
        (f"{RESULTS}target_grouping-small.json", f"{RESULTS}target_grouping-small-write-aware.json"),
        _target_grouping,
        "python benchmarks/target_grouping.py --model testbed:small --requests 1 4 100 --contexts 10 5 --rounds 5 "
        "--threads 1, and the same with --requests 100 --contexts 5 2 --write-aware"),
    "long_stream_2000": Table(
        (f"{RESULTS}long_stream_2000.json",), _long_stream(),
        "python benchmarks/long_stream.py --methods <m> --edits 2000 --batch-size 100 --context 5 2 --tag 2000"),
    "long_stream_10000": Table(
        (f"{RESULTS}long_stream_10000.json",), _long_stream(),
        "python benchmarks/long_stream.py --methods <m> --edits 20000 --batch-size 100 --context 5 2 "
        "--eval-every 5000 --tag 20000 --rows-at 10000"),
    "long_stream_20000": Table(
        (f"{RESULTS}long_stream_20000.json",), _long_stream(),
        "python benchmarks/long_stream.py --methods <m> --edits 20000 --batch-size 100 --context 5 2 "
        "--eval-every 5000 --tag 20000 --rows-at 10000"),
    "insertion_leakage": Table(
        (f"{RESULTS}insertion_leakage.json",), _insertion_leakage,
        "python benchmarks/insertion_leakage.py runs/long_stream_2000/<m> --at 1000 1900"),
    "sequential_tiny": Table(
        (f"{RESULTS}sequential_tiny/results.json",), _sequential(),
        "python benchmarks/sequential_edits.py --model testbed:tiny --methods rome rome-eac memit memit-eac "
        "--num-edits 500 --eval-every 50 --out /tmp/s3/seq500"),
    "sequential_small60": Table(
        (f"{RESULTS}sequential_small60/results.json",), _sequential(),
        "OMP_NUM_THREADS=1 python benchmarks/sequential_edits.py --model testbed:small --methods rome rome-eac memit "
        "memit-eac --num-edits 60 --eval-every 0 --out runs/seq_small60/all"),
    "sequential_tiny60": Table(
        (f"{RESULTS}sequential_tiny60/results.json",), _sequential(),
        "OMP_NUM_THREADS=1 python benchmarks/sequential_edits.py --model testbed:tiny --methods rome rome-eac memit "
        "memit-eac --num-edits 60 --eval-every 0 --out /tmp/seq_tiny60"),
    "sequential_tiny_overlay": Table(
        (f"{RESULTS}sequential_tiny_overlay/results.json",),
        _sequential({"ROME, published": "rome", "ROME + testbed overlay": "rome+testbed",
                     "ROME-EAC, published": "rome-eac", "ROME-EAC + testbed overlay": "rome-eac+testbed"}),
        "python benchmarks/sequential_edits.py --model testbed:tiny --methods rome rome-eac --num-edits 100 "
        "--eval-every 25 --testbed-overlay --out benchmarks/results/sequential_tiny_overlay"),
    "memory_scale_cpu": Table(
        (f"{RESULTS}memory_scale_cpu.json",), _memory,
        "OMP_NUM_THREADS=1 python benchmarks/memory_scale.py --models gpt2-medium"),
    "eval_throughput_small": Table(
        (f"{RESULTS}eval_throughput-testbed-small.txt",), _eval_throughput,
        "python benchmarks/eval_throughput.py --model testbed:small --runs 3"),
    "live_cost_small": Table(
        (f"{RESULTS}live_cost_small.json",), _live_cost,
        "OMP_NUM_THREADS=1 python benchmarks/live_cost.py --out benchmarks/results/live_cost_small.json"),
    "shipped_precision_small": Table(
        (f"{RESULTS}shipped_precision_small.json",), _shipped_precision,
        "python benchmarks/shipped_precision.py --build /tmp/tb/small --shipped eac_lightning/assets/testbeds/small "
        "--out benchmarks/results/shipped_precision_small.json"),
    "trace_tiny": Table(
        (f"{RESULTS}testbed_tiny.json",), _trace,
        "python benchmarks/testbed_build.py --model testbed:tiny --rome-edits 16 --rome-layers 0,1 --trace-facts 40 "
        "--trace-out docs/img/trace_tiny"),
    "trace_small": Table(
        (f"{RESULTS}testbed_small-trace-e20.json",), _trace,
        "python benchmarks/testbed_build.py --model testbed:small --trace-facts 30 --trace-out docs/img/trace_small "
        "--tag trace-e20"),
    "edit_log_cost": Table(
        (f"{RESULTS}edit_log_cost.json",), _edit_log,
        "OMP_NUM_THREADS=1 python benchmarks/edit_log_cost.py --part steps (then --part editor, --part fit)",
        pending=_edit_log_pending, what="the edit log's cost per step, per edit in Python and per run folder"),
    "real_width": Table(
        (f"{RESULTS}real_width.json",), _real_width,
        "OMP_NUM_THREADS=1 python benchmarks/real_width.py --shapes <shape> --methods <method> ..."),
    "alphaedit_solve": Table(
        (f"{RESULTS}alphaedit_solve.json",), _alphaedit_solve,
        "OMP_NUM_THREADS=1 python benchmarks/alphaedit_solve.py --widths <d:d_k> --batch <n>"),
    "easyedit_quality": Table(
        (f"{RESULTS}easyedit_compare.json",), _easyedit_quality,
        "OMP_NUM_THREADS=1 python benchmarks/reference/easyedit_compare.py --easyedit-python <venv>/bin/python "
        "--easyedit-src <EasyEdit tree> --part quality --earlier-rule"),
    "easyedit_cost": Table(
        (f"{RESULTS}easyedit_compare.json",), _easyedit_cost,
        "OMP_NUM_THREADS=1 python benchmarks/reference/easyedit_compare.py --easyedit-python <venv>/bin/python "
        "--easyedit-src <EasyEdit tree> --part cost",
        pending=lambda data: data[0] is None or "cost" not in data[0],
        what="seconds per AlphaEdit edit at GPT2-XL width, EasyEdit against ours"),
    "beac_summary": Table(S12, _beac_summary, BEAC_USAGE),
    "beac_10x50": Table(S12, _beac_orders("10x50", BEAC_METHODS), BEAC_USAGE),
    "beac_20x25": Table(S12, _beac_orders("20x25", BEAC_METHODS), BEAC_USAGE),
    "beac_ablations": Table(S12[:1], _beac_ablations, BEAC_USAGE),
    "beac_rar_parts": Table(S12, _beac_rar_parts, BEAC_USAGE),
    "beac_pairs": Table(
        S13_PAIRS,
        _beac_orders("10x50", {"AlphaEdit": "AlphaEdit", "B-EAC w/o separation": "B-EAC w/o separation",
                               "B-EAC w/o separation, LAS bound binding": "B-EAC w/o separation, LAS bound binding",
                               "**B-EAC** (`beac`)": "B-EAC"}, mean=False),
        "python benchmarks/beac_batches.py --model testbed:small --schedules 10x50 --pairs batch --order-seed N ..."),
    "beac_long_streams": Table(
        (f"{RESULTS}long_stream_2000.json",),
        _beac_long_streams,
        "python benchmarks/long_stream.py --methods <m> --edits N --batch-size 100 --context 5 2 --tag N"),
    "beac_memit_10x50": Table(E20_LAS[:1], _beac_memit_order0, BEAC_USAGE),
    "beac_memit_contributions": Table(E20_LAS, _beac_memit_contributions, BEAC_USAGE),
    "key_similarity": Table(
        (f"{RESULTS}batch_key_similarity_small-e20.json", f"{RESULTS}batch_key_similarity_small-e20-pairs.json"),
        _key_similarity,
        "python benchmarks/batch_key_similarity.py --model testbed:small --batch 50 --batches 3 --out "
        "benchmarks/results/batch_key_similarity_small-e20.json, and the same with --pairs"),
}


# ------------------------------------------------------------------------------------------- the machinery


def load(path: Path) -> Any:
    if not path.exists():
        return None
    return json.loads(path.read_text()) if path.suffix == ".json" else path.read_text()


def recorded_commands(data: Any) -> tuple[list[str], int]:
    """The commands a results file records (a top-level ``command``/``commands``, each ``meta`` entry's, each row's)
    and how many of its rows or runs record none."""
    if not isinstance(data, dict):
        return [], 1
    found: list[str] = []
    missing = 0
    if isinstance(data.get("command"), str):
        found.append(data["command"])
    cmds = data.get("commands")
    found += list(cmds.values()) if isinstance(cmds, dict) else list(cmds or [])
    meta = data.get("meta")
    for m in ([meta] if isinstance(meta, dict) else meta or []):
        if m.get("command"):
            found.append(m["command"])
        else:
            missing += 1
    rows = data.get("rows")
    if not found and isinstance(rows, list) and any(isinstance(r, dict) and r.get("command") for r in rows):
        for r in rows:
            if r.get("command"):
                found.append(r["command"])
            else:
                missing += 1
    elif not found:
        missing += 1
    return found, missing


def provenance(name: str, table: Table, data: list[Any]) -> str:
    files = ", ".join(f"`{p}`" for p in table.results)
    found: list[str] = []
    missing = 0
    for d in data:
        f, m = recorded_commands(d)
        found += f
        missing += m
    distinct = list(dict.fromkeys(found))
    if not distinct:
        rows = (f"command not recorded in the results file; the script's documented usage: `{table.usage}`")
    else:
        rows = (f"rows made by {'; '.join(f'`{c}`' for c in distinct)}" if sum(map(len, distinct)) <= 300 else
                f"rows made by the {len(distinct)} commands recorded in the results "
                f"file{'s' if len(table.results) > 1 else ''} (`python benchmarks/tables.py --commands {name}` "
                f"lists them)")
        if missing:
            rows += (f"; for {missing} of its rows or runs the command is not recorded in the results file (the "
                     f"script's documented usage: `{table.usage}`)")
    return f"Generated by `python benchmarks/tables.py` from {files}: {rows}."


def render(name: str, root: Path = REPO) -> str:
    """The block's text between its markers: the table and its provenance line (or, while its results are being
    measured, a line saying so)."""
    table = TABLES[name]
    data = [load(root / p) for p in table.results]
    if table.pending and table.pending(data):
        return textwrap.fill(f"Not measured yet: {table.what} will be here once `{table.results[0]}` is complete "
                             f"(`{table.usage}`); `python benchmarks/tables.py` then writes the table.", 118,
                             break_long_words=False, break_on_hyphens=False) + "\n"
    absent = [p for p, d in zip(table.results, data) if d is None]
    if absent:
        raise FileNotFoundError(f"table {name}: results file {', '.join(absent)} not found")
    line = textwrap.fill(provenance(name, table, data), 118, break_long_words=False, break_on_hyphens=False)
    return f"{table.render(data).strip()}\n\n{line}\n"


def docs(root: Path) -> list[Path]:
    return [p for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))] if p.exists()]


def indent(text: str, prefix: str) -> str:
    return "".join(prefix + ln if ln.strip() else ln for ln in text.splitlines(keepends=True))


def process(root: Path = REPO, check: bool = False, out=sys.stdout) -> int:
    """Rewrite (or, with ``check``, compare) every generated block under ``root``; returns the number of blocks that
    differ (check) or were rewritten, and raises on an unknown table name or a missing results file."""
    differing = 0
    placed: set[str] = set()
    errors = []
    for doc in docs(root):
        text = doc.read_text()
        rel = doc.relative_to(root)

        def replace(m: re.Match, rel: Path = rel) -> str:
            nonlocal differing
            name, prefix = m["name"], m["indent"]
            placed.add(name)
            if name not in TABLES:
                errors.append(f"{rel}: unknown table '{name}' (benchmarks/tables.py TABLES names the tables)")
                return m[0]
            try:
                body = indent(render(name, root), prefix)
            except (FileNotFoundError, KeyError, ValueError) as e:
                errors.append(f"{rel}: table '{name}': {type(e).__name__}: {e}")
                return m[0]
            if body != m["body"]:
                differing += 1
                files = ", ".join(TABLES[name].results)
                if check:
                    print(f"{rel}: table '{name}' differs from {files}; run python benchmarks/tables.py",
                          file=out)
                    diff = difflib.unified_diff(m["body"].splitlines(), body.splitlines(), "doc", "results",
                                                lineterm="", n=0)
                    for ln in list(diff)[2:14]:
                        print("    " + ln[:160], file=out)
                else:
                    print(f"{rel}: table '{name}' rewritten from {files}", file=out)
            return f"{prefix}<!-- table: {name} -->\n{body}{prefix}<!-- /table -->"

        new = BLOCK.sub(replace, text)
        if not check and new != text:
            doc.write_text(new)
    if root == REPO:
        errors += [f"table '{n}' is registered but placed in no doc" for n in TABLES if n not in placed]
    if errors:
        raise SystemExit("\n".join(errors))
    return differing


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table differs from its results")
    ap.add_argument("--list", action="store_true", help="list the tables, their results files and docs")
    ap.add_argument("--commands", metavar="NAME", help="print the commands recorded in a table's results files")
    ap.add_argument("--root", type=Path, default=REPO, help="the repository whose docs and results are read")
    args = ap.parse_args(argv)
    if args.list:
        where: dict[str, list[str]] = {}
        for doc in docs(args.root):
            for m in BLOCK.finditer(doc.read_text()):
                where.setdefault(m["name"], []).append(str(doc.relative_to(args.root)))
        for name, t in TABLES.items():
            print(f"{name}: {', '.join(t.results)} -> {', '.join(where.get(name, ['(not placed)']))}")
        return 0
    if args.commands:
        t = TABLES[args.commands]
        for p in t.results:
            found, missing = recorded_commands(load(args.root / p))
            print(f"{p}:")
            for c in dict.fromkeys(found):
                print(f"  {c}")
            if missing:
                print(f"  ({missing} rows or runs without a recorded command; documented usage: {t.usage})")
        return 0
    n = process(args.root, check=args.check)
    if args.check:
        if n:
            print(f"{n} generated table(s) differ from their results files", file=sys.stderr)
            return 1
        print("every generated table matches its results files")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
