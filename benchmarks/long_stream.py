"""Long edit streams through the real CLI: AlphaEdit's protocol (2,000 CounterFact edits in batches of 100) and
10,000-edit streams on the offline testbed, one table per protocol with every metric, drift, time and memory.

Each method runs as a user would run it::

    eac-lightning fit --config configs/bench/long_stream.yaml --config configs/methods/<m>.yaml \\
        --data.num_edits N --data.batch_size B --data.insertions N-500 [--model.method.init_args.context ...]

The testbed knows 500 CounterFact facts; the stream edits them, then continues with insertions (real CounterFact
records about invented subjects, ``eac_lightning/data/insertions.py``). Prefix contexts: ``--context LENGTH COUNT``
replaces the presets' 21 for every locate-then-edit method alike (UltraEdit has none), to fit a CPU budget.

Interrupted runs resume: a method whose run folder holds ``checkpoints/last.ckpt`` but no ``summary.json`` is
continued with ``--ckpt_path last`` (the project's own resume), and its wall time adds up over the attempts. While a
run works, its resident memory is sampled every 2 s from ``/proc`` (Linux), so the table shows whether memory stays
flat along the stream.

    python benchmarks/long_stream.py --methods memit alphaedit ultraedit --edits 2000 --batch-size 100 \\
        --context 5 2 --tag 2000

A longer stream also gives the rows of the shorter ones: ``--rows-at 10000`` writes each method's row at 10,000 edits
(its evaluation of every edit so far there; the first N requests of a longer stream are a stream of N) into
``long_stream_10000.json``, wall time and memory left out (they are the whole run's)::

    python benchmarks/long_stream.py --methods alphaedit nas beac --edits 20000 --batch-size 100 --context 5 2 \\
        --eval-every 5000 --tag 20000 --rows-at 10000

A variant of a preset is its preset plus settings (``--set``, the method's init_args) under a row name of its own
(``--label``, also its run folder)::

    python benchmarks/long_stream.py --methods beac --label "beac, refresh 0.5" \
        --set 'beac={refresh: 0.5}' --edits 20000 --batch-size 100 \
        --context 5 2 --eval-every 5000 --tag 20000 --rows-at 10000

A stream whose later part must be run again (a change of the code or the data past some point) goes back there
with the project's rollback and continues (``--restart-at N``; what the run did after N is kept in its
``rolled_back/`` folder, and the row then leaves its wall time out).

Run folders (checkpoints included) go to ``runs/long_stream_<tag>/<method>``; the table and figures to
``benchmarks/results/long_stream_<tag>.json`` and ``docs/img/long_stream_<tag>.png``. The results file keeps the
rows of earlier invocations (each with its command, evaluation trace and memory samples) and a method run again
replaces its own row, so a table whose methods do not all fit one session is filled over several.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHIPPED_FACTS = 500  # CounterFact records in eac_lightning/assets/data/counterfact
NO_CONTEXT = {"ultraedit", "ft", "ft-en"}


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run_method(method: str, args, root: Path) -> dict:
    """Run (or resume) one method's stream; returns {"wall_s", "memory": [(seconds, MiB), ...], "attempts"}.
    ``method`` is a preset (configs/methods/<method>.yaml); ``args.set`` adds settings of the method to it."""
    log_file = root / "bench.json"
    done = json.loads(log_file.read_text()) if log_file.exists() else {"wall_s": 0.0, "memory": [], "attempts": 0}
    if (root / "summary.json").exists() and not args.force:
        return done
    cmd = [
        sys.executable, "-m", "eac_lightning.lightning.cli", "fit",
        "--config", str(REPO / "configs" / "bench" / "long_stream.yaml"),
        "--config", str(REPO / "configs" / "methods" / f"{method}.yaml"),
        "--model.model", args.model,
        "--data.num_edits", str(args.edits), "--data.batch_size", str(args.batch_size),
        "--data.insertions", str(max(0, args.edits - SHIPPED_FACTS)),
        "--eval.every", str(args.eval_every), "--norms.every", str(args.batch_size),
        "--trainer.default_root_dir", str(root),
    ]
    if args.context and method not in NO_CONTEXT:
        cmd += ["--model.method.init_args.context", f"{{length_count: [[{args.context[0]}, {args.context[1]}]]}}"]
    for setting in args.set:  # KEY=VALUE of the method's init_args, e.g. beac.refresh_window=null
        key, _, value = setting.partition("=")
        cmd += [f"--model.method.init_args.{key}", value]
    if (root / "checkpoints" / "last.ckpt").exists():
        cmd += ["--ckpt_path", "last"]
    root.mkdir(parents=True, exist_ok=True)
    print(" ".join(cmd), flush=True)
    t0 = time.time()
    with open(root / "bench.log", "a") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        samples: list[tuple[float, float]] = []

        def record() -> dict:
            """This attempt so far, added to the earlier ones', written whole or not at all (a stream killed while
            writing keeps the previous minute's record)."""
            so_far = {**done, "wall_s": done["wall_s"] + time.time() - t0, "memory": done["memory"] + samples,
                      "attempts": done["attempts"] + 1}
            part = log_file.with_suffix(".json.part")
            part.write_text(json.dumps(so_far) + "\n")
            os.replace(part, log_file)
            return so_far

        def sample() -> None:
            recorded = time.time()
            while proc.poll() is None:
                mib = rss_mib(proc.pid)
                if mib is not None:
                    samples.append((round(done["wall_s"] + time.time() - t0, 1), round(mib, 1)))
                if time.time() - recorded >= 60:  # every minute: a stream killed with its runner keeps its time
                    record()
                    recorded = time.time()
                time.sleep(2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        rc = proc.wait()
        sampler.join()
    done = record()
    if rc != 0:
        raise SystemExit(f"{method}: the run failed (exit {rc}); see {root / 'bench.log'}. Run again to resume.")
    return done


def restart(root: Path, edits: int) -> None:
    """Return a method's run folder to its state after ``edits`` edits with the project's rollback
    (``eac-lightning rollback``), so the stream goes on from there under today's code and data: what the run did
    after that point is kept in ``rolled_back/``, its wall time and memory samples (``bench.json``) with it. The
    row of the stream then leaves its wall time out (the time up to ``edits`` is not known apart) and its memory
    quarters are those of the part run since. Done once: a folder already restarted there is left alone."""
    from eac_lightning.lightning.rollback import rollback

    log_file = root / "bench.json"
    bench = json.loads(log_file.read_text()) if log_file.exists() else {}
    if bench.get("restarted_at") == edits or not (root / "checkpoints" / "last.ckpt").exists():
        return
    event = rollback(root, edits)
    if log_file.exists():
        os.replace(log_file, root / event["moved_to"] / "bench.json")
    log_file.write_text(json.dumps({"wall_s": 0.0, "memory": [], "attempts": 0, "restarted_at": edits}) + "\n")
    print(f"{root}: rolled back to {edits} edits ({len(event['removed'])} removed, kept in {event['moved_to']})",
          flush=True)


def stopping_rule(root: Path) -> str | None:
    """What the run's target optimisation stopped on (``target.early_stop_on`` in its config.yaml: ``total``, the
    published rule, or ``nll``); None for a method without one (UltraEdit)."""
    import yaml

    config = yaml.safe_load((root / "config.yaml").read_text()) if (root / "config.yaml").exists() else {}
    target = (((config or {}).get("model") or {}).get("method") or {}).get("init_args", {}).get("target")
    return target.get("early_stop_on", "total") if isinstance(target, dict) else None


def mean_norm(summary: dict, key: str) -> float:
    norms = summary["norms"]
    return sum(n[key] for n in norms.values()) / len(norms)


def thinned(samples: list, most: int = 300) -> list:
    """At most ``most`` evenly spaced samples (a 2-hour run samples its memory 3,600 times)."""
    step = max(1, -(-len(samples) // most))
    return samples[::step]


def batches(root: Path, edits: int | None = None) -> list[dict]:
    """Per edit step, from the ledger: the batch's own edits and how many the model predicts right after the write
    (teacher-forced), and the earlier edits the method wrote again with it (B-EAC's refresh) and how many of those
    hold; only steps within the first ``edits`` edits when given."""
    from eac_lightning.lightning.run_folder import read_ledger

    steps: dict[int, dict] = {}
    for r in read_ledger(root / "edits.jsonl"):
        if "step" not in r or (edits is not None and r.get("edit", -1) >= edits):
            continue
        s = steps.setdefault(int(r["step"]), {"step": int(r["step"]), "written": 0, "held": 0, "refreshed": 0,
                                              "refreshed_held": 0})
        kind = "refreshed" if r.get("refreshed") else "written"
        s[kind] += 1
        s[f"{kind}_held" if kind == "refreshed" else "held"] += bool(r.get("success"))
    last = max((s["step"] for s in steps.values() if s["written"]), default=0)
    return [steps[k] for k in sorted(steps) if k <= last]


def row(method: str, root: Path, bench: dict, command: str) -> dict:
    """The method's table row, with its evaluation trace and memory samples, so that the results file alone
    redraws the table and the plot (run folders need not outlive the session that made them)."""
    s = json.loads((root / "summary.json").read_text())
    m, v, g = s["edit_metrics"], s["edit_metrics_variants"], s["general"]
    memory = [mib for _, mib in bench["memory"]]
    quarter = len(memory) // 4
    return {
        "method": method, "edits": s["edits_applied"], "batch_size": s["batch_size"],
        "reliability": m["reliability"], "generalization": m["generalization"], "locality": m["locality"],
        # live decoding (WILD): absent from summaries written before the evaluator measured it
        "live_rel": m.get("live_rel"), "live_gen": m.get("live_gen"), "live_loc": m.get("live_loc"),
        "efficacy_score": v.get("rome_efficacy_score"), "paraphrase_score": v.get("rome_paraphrase_score"),
        "neighborhood_score": v.get("rome_neighborhood_score"), "gen_efficacy": v.get("gen_efficacy"),
        "fluency": v.get("fluency"),
        "fact_retention": g["fact_retention"]["after"] / g["fact_retention"]["before"],
        "ppl_ratio": g["wikitext2_ppl"]["before"] / g["wikitext2_ppl"]["after"],
        "sst2": [g["sst2"]["before"], g["sst2"]["after"]] if "sst2" in g else None,
        "l1_growth": mean_norm(s, "l1_rel_change"), "fro_growth": mean_norm(s, "fro_rel_change"),
        "seconds_per_edit": s["seconds_per_edit"],
        # a stream restarted part-way (--restart-at) knows only the time since
        "wall_s": None if bench.get("restarted_at") else bench["wall_s"], "attempts": bench["attempts"],
        "restarted_at": bench.get("restarted_at"),
        # resident memory in the second and the last quarter of the run (since a restart): flat when they agree
        "rss_mib_q2": max(memory[quarter:2 * quarter], default=None),
        "rss_mib_q4": max(memory[3 * quarter:], default=None),
        "method_settings": s.get("method_settings"), "stopping_rule": stopping_rule(root),
        "trace": [{"edits": float(t["edits"]), "reliability": float(t["edit/reliability"]),
                   "fact_retention": float(t["general/fact_retention"]) if t.get("general/fact_retention") else None}
                  for t in read_trace(root)],
        "memory": thinned(bench["memory"]),
        "batches": batches(root),
        "command": command,
    }


def row_at(method: str, root: Path, edits: int, command: str) -> dict | None:
    """The row a stream of ``edits`` edits ends with, read from a longer stream's evaluation at that point (every
    edit so far is evaluated there, general abilities included, and the first ``edits`` requests of a longer stream
    are those of a stream of that length: the facts, then insertions made in a fixed order). Wall time and memory
    are those of the whole longer run, so they are left out (None). None when the run has not evaluated there."""
    with open(next(root.rglob("metrics.csv"))) as fh:
        rows = list(csv.DictReader(fh))
    at = [r for r in rows if r.get("edit/reliability") and round(float(r["edits"])) == edits]
    base = [r for r in rows if r.get("general/fact_retention") and round(float(r["edits"])) == 0]
    if not at or not base:
        return None
    t, b = at[-1], base[0]
    num = lambda r, k: float(r[k]) if r.get(k) not in (None, "") else None  # noqa: E731
    with open(root / "norms.csv") as fh:
        norms = [r for r in csv.DictReader(fh) if round(float(r["edits"])) == edits]
    seconds = [r["seconds"] for r in map(json.loads, (root / "edits.jsonl").read_text().splitlines())
               if "seconds" in r and r.get("edit", edits) < edits]
    return {
        "method": method, "edits": edits, "batch_size": None,
        "reliability": num(t, "edit/reliability"), "generalization": num(t, "edit/generalization"),
        "locality": num(t, "edit/locality"),
        "live_rel": num(t, "edit/live_rel"), "live_gen": num(t, "edit/live_gen"), "live_loc": num(t, "edit/live_loc"),
        "efficacy_score": num(t, "edit/rome_efficacy_score"), "paraphrase_score": num(t, "edit/rome_paraphrase_score"),
        "neighborhood_score": num(t, "edit/rome_neighborhood_score"), "gen_efficacy": num(t, "edit/gen_efficacy"),
        "fluency": num(t, "edit/fluency"),
        "fact_retention": num(t, "general/fact_retention") / num(b, "general/fact_retention"),
        "ppl_ratio": num(b, "general/wikitext2_ppl") / num(t, "general/wikitext2_ppl"),
        "sst2": [num(b, "general/sst2"), num(t, "general/sst2")] if t.get("general/sst2") else None,
        "l1_growth": sum(float(r["l1_rel_change"]) for r in norms) / len(norms) if norms else None,
        "fro_growth": sum(float(r["fro_rel_change"]) for r in norms) / len(norms) if norms else None,
        "seconds_per_edit": sum(seconds) / len(seconds) if seconds else None, "wall_s": None, "attempts": None,
        "rss_mib_q2": None, "rss_mib_q4": None, "stopping_rule": stopping_rule(root),
        "trace": [{"edits": float(r["edits"]), "reliability": float(r["edit/reliability"]),
                   "fact_retention": num(r, "general/fact_retention")}
                  for r in rows if r.get("edit/reliability") and float(r["edits"]) <= edits],
        "batches": batches(root, edits),
        "from_stream": str(root.parent.name), "command": command,
    }


def mean4(r: dict) -> float:
    """The composite of the batch-sequential benchmark (docs/beac.md § 5): the mean of reliability, generalisation,
    locality and general-ability retention, the last being the mean of fact retention and the perplexity ratio."""
    return (r["reliability"] + r["generalization"] + r["locality"] + (r["fact_retention"] + r["ppl_ratio"]) / 2) / 4


def rule_cell(r: dict) -> str:
    """The row's stopping rule: rows recorded before it was stored ran the earlier NLL-only rule (UltraEdit has no
    target optimisation)."""
    if "stopping_rule" in r:
        return r["stopping_rule"] or "–"
    return "–" if r["method"].startswith("ultraedit") else "nll"


def table(rows: list[dict]) -> str:
    head = ("| method | z stops on | mean4 | rel | gen | loc | live rel | live gen | live loc | eff. score | para. score "
            "| nbhd score | gen. eff. | fluency | fact ret. | ppl ratio | L1 growth | Fro growth | s/edit | wall "
            "| RSS MiB (q2 / q4) |")
    lines = [head, "|---" * 21 + "|"]
    f = lambda x, p=3: "–" if x is None else f"{x:.{p}f}"  # noqa: E731
    for r in rows:
        wall = "–" if r.get("wall_s") is None else f"{r['wall_s'] / 60:.0f} min"  # rows read from a longer stream: –
        lines.append(
            f"| {r['method']} | {rule_cell(r)} | {f(mean4(r))} | {f(r['reliability'])} | {f(r['generalization'])} "
            f"| {f(r['locality'])} | {f(r.get('live_rel'))} | {f(r.get('live_gen'))} | {f(r.get('live_loc'))} "
            f"| {f(r['efficacy_score'])} | {f(r['paraphrase_score'])} | {f(r['neighborhood_score'])} "
            f"| {f(r['gen_efficacy'])} | {f(r['fluency'], 2)} | {f(r['fact_retention'])} | {f(r['ppl_ratio'])} "
            f"| {f(r['l1_growth'], 2)} | {f(r['fro_growth'], 2)} | {f(r['seconds_per_edit'], 2)} "
            f"| {wall} | {f(r['rss_mib_q2'], 0)} / {f(r['rss_mib_q4'], 0)} |")
    return "\n".join(lines)


def read_trace(root: Path) -> list[dict]:
    """Per evaluation point of metrics.csv: edits so far and the metrics logged there."""
    with open(next(root.rglob("metrics.csv"))) as fh:
        return [r for r in csv.DictReader(fh) if r.get("edit/reliability")]


def plot(rows: list[dict], img: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    for r in rows:
        trace = r.get("trace") or []
        retained = [t for t in trace if t["fact_retention"] is not None]
        axes[0].plot([t["edits"] for t in trace], [t["reliability"] for t in trace], marker="o", label=r["method"])
        axes[1].plot([t["edits"] for t in retained], [t["fact_retention"] for t in retained], marker="o",
                     label=r["method"])
        axes[2].plot([t / 60 for t, _ in r.get("memory") or []], [m for _, m in r.get("memory") or []],
                     label=r["method"])
        steps = [b for b in r.get("batches") or [] if b["written"]]
        written = axes[3].plot([b["step"] for b in steps], [b["held"] / b["written"] for b in steps],
                               label=r["method"])
        if any(b["refreshed"] for b in steps):  # the refresh's re-writes per batch, as a share of the batch
            axes[3].plot([b["step"] for b in steps], [b["refreshed"] / b["written"] for b in steps], linestyle=":",
                         color=written[0].get_color(), label=f"{r['method']}: re-written")
    for ax, title, ylabel in zip(axes, ["reliability of all edits so far", "unedited-fact retention",
                                        "resident memory", "edits holding right after their write"],
                                 ["reliability", "fact accuracy", "MiB", "share of the batch"]):
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].set_xlabel("edits")
    axes[1].set_xlabel("edits")
    axes[2].set_xlabel("minutes")
    axes[2].legend(fontsize=8)
    axes[3].set_xlabel("edit step (batch)")
    axes[3].legend(fontsize=7)
    fig.tight_layout()
    img.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(img, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", nargs="+", default=["memit", "memit-eac", "alphaedit", "alphaedit-eac", "beac",
                                                     "ultraedit"])
    ap.add_argument("--model", default="testbed:small")
    ap.add_argument("--edits", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--eval-every", type=int, default=1000, help="edits between evaluations of every edit so far")
    ap.add_argument("--context", type=int, nargs=2, default=None, metavar=("LENGTH", "COUNT"))
    ap.add_argument("--tag", required=True, help="names the run folder, results file and plot")
    ap.add_argument("--force", action="store_true", help="run again methods that already finished")
    ap.add_argument("--table-only", action="store_true", help="tabulate finished runs, run nothing")
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                    help="settings added to the preset (the method's init_args), e.g. beac.refresh_window=null; "
                         "name the variant with --label")
    ap.add_argument("--label", default=None,
                    help="the row's name and run folder for a variant made with --set (one method only)")
    ap.add_argument("--rows-at", type=int, nargs="+", default=[], metavar="N",
                    help="also write each method's row at N edits (its evaluation there) into long_stream_<N>.json")
    ap.add_argument("--restart-at", type=int, default=None, metavar="N",
                    help="first roll each method's run folder back to N edits (the project's rollback) and go on "
                         "from there: for a stream whose later part must be run again (a change of the data or "
                         "code past that point); done once per folder")
    args = ap.parse_args(argv)
    if args.label and len(args.methods) != 1:
        ap.error("--label names the variant of one method")
    if args.set and not args.label:
        ap.error("--set makes a variant of the preset: name its row with --label")
    out = REPO / "runs" / f"long_stream_{args.tag}"
    results = REPO / "benchmarks" / "results" / f"long_stream_{args.tag}.json"
    # the command that makes a row (the same without --table-only, which only tabulates it)
    # (shell-quoted, so that a label with spaces pastes back as one argument)
    command = "python benchmarks/long_stream.py " + shlex.join(a for a in (sys.argv[1:] if argv is None else argv)
                                                               if a != "--table-only")
    # Rows of earlier invocations (other methods, other sessions) are kept; a method run again replaces its row.
    rows = {r["method"]: r for r in json.loads(results.read_text())["rows"]} if results.exists() else {}
    names = {m: args.label or m for m in args.methods}  # preset -> row name (and run folder)
    for method in args.methods:
        root = out / names[method]
        if args.table_only and not (root / "bench.json").exists():
            continue
        if args.restart_at is not None and not args.table_only:
            restart(root, args.restart_at)
        bench = (json.loads((root / "bench.json").read_text()) if args.table_only
                 else run_method(method, args, root))
        if (root / "summary.json").exists():
            rows[names[method]] = row(names[method], root, bench, command)
    # Re-read before writing: another invocation (another method, run beside this one) may have added its row.
    if results.exists():
        mine = {names[m] for m in args.methods if names[m] in rows}
        rows = {**{r["method"]: r for r in json.loads(results.read_text())["rows"]},
                **{m: rows[m] for m in mine}}
    rows = list(rows.values())
    text = (f"{args.edits} edits in batches of {args.batch_size} on `{args.model}`"
            f"{f', {args.context[1]} prefix contexts of {args.context[0]} tokens' if args.context else ''}\n\n"
            + table(rows))
    print(text)
    if rows:  # none yet: streams still running (--table-only --rows-at reads a shorter stream's rows from them)
        results.write_text(json.dumps({"table": text, "rows": rows}, indent=2) + "\n")
    if any(r.get("trace") for r in rows):
        plot([r for r in rows if r.get("trace")], REPO / "docs" / "img" / f"long_stream_{args.tag}.png")
    for n in args.rows_at:  # the rows a shorter stream would end with, from this stream's evaluation at n
        shorter = REPO / "benchmarks" / "results" / f"long_stream_{n}.json"
        derived = {names[m]: row_at(names[m], out / names[m], n, command) for m in args.methods
                   if (out / names[m] / "edits.jsonl").exists()}
        derived = {m: r for m, r in derived.items() if r is not None}
        if not derived:
            continue
        kept = {r["method"]: r for r in json.loads(shorter.read_text())["rows"]} if shorter.exists() else {}
        merged = list({**kept, **derived}.values())
        text = f"{n} edits in batches of {args.batch_size} on `{args.model}`\n\n" + table(merged)
        shorter.write_text(json.dumps({"table": text, "rows": merged}, indent=2) + "\n")
        plot([r for r in merged if r.get("trace")], REPO / "docs" / "img" / f"long_stream_{n}.png")
        print(f"{', '.join(derived)}: rows at {n} edits written to {shorter}")


if __name__ == "__main__":
    main()
