"""What a run keeps per edit step at the widths users edit: the edit log against a checkpoint of the deltas.

Three measurements, each on random-weight models of real shapes (a few layers at full width, float32):

``--part steps`` (default): for GPT2-XL (1600 / 6400), GPT-J (4096 / 16384) and LLaMA-3-8B (4096 / 14336, GQA
32/8 heads) with 5 decoder layers, and per method (ROME and ROME-EAC: one edit on one layer; MEMIT-EAC, AlphaEdit and
B-EAC: a batch of ``--batch`` edits over the 5 layers, as MEMIT's and AlphaEdit's published layer ranges):

- *before*: the checkpoint a step wrote when the history was a copy of the state per step: the accumulated delta of
  every edited matrix (float32) and the method's whole state (AlphaEdit's and B-EAC's K_pK_pᵀ, d_k × d_k float64 per
  layer; B-EAC's anchor records), written with ``torch.save`` (the matrices one at a time, so that the benchmark
  holds one of them at once; bytes and seconds are summed);
- *after*: one edit-log entry through :class:`~eac_lightning.session.EditSession` (the update's factors, the method's
  state increment: AlphaEdit's and B-EAC's step keys, B-EAC's usage and refresh window; the resume record), and the
  snapshot the log writes every ``snapshot_every`` steps (default 100) and at the end of a fit, of which it keeps one.

The update values are random (sizes and write times depend on shapes only); the method objects hold state of the
shapes their real runs hold. Seconds of the log are medians of ``--repeats`` writes, those of the checkpoint one
write; 1 torch thread.

``--part editor``: the Python API's memory per edit at GPT-J width (ROME on one layer): bytes the in-memory log
holds per edit (what ``Editor.undo`` needs) against the snapshot of the edited matrix the API kept per edit before.

``--part fit``: ``eac-lightning fit`` at GPT2-XL width (2 layers, random weights, ROME on layer 1, 4 edits): the run
folder's size per edit step, and ``rollback`` to 2 edits exported and compared with a run stopped at 2 edits.
``--baseline-repo DIR`` runs the same fit with another checkout's package (e.g. a ``git worktree`` of the version
before the edit log) for the *before* figure.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/edit_log_cost.py --part steps
    OMP_NUM_THREADS=1 python benchmarks/edit_log_cost.py --part editor
    OMP_NUM_THREADS=1 python benchmarks/edit_log_cost.py --part fit [--baseline-repo /tmp/before]

Each part merges its rows into ``benchmarks/results/edit_log_cost.json``; ``--table`` prints the markdown tables.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results" / "edit_log_cost.json"
LAYERS = 5  # decoder layers built; MEMIT's and AlphaEdit's published ranges edit 5 (GPT2-XL 13-17, GPT-J and LLaMA-3 4-8)
SNAPSHOT_EVERY = 100  # EditingModule's default


def shapes() -> dict:
    from transformers import GPT2Config, GPTJConfig, LlamaConfig

    small = {"vocab_size": 512, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
    return {
        "gpt2-xl": GPT2Config(n_layer=LAYERS, n_embd=1600, n_head=25, n_inner=6400, n_positions=1024, **small),
        "gpt-j": GPTJConfig(n_layer=LAYERS, n_embd=4096, n_head=16, rotary_dim=64, n_positions=2048, **small),
        "llama3-8b": LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=LAYERS,
                                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=2048, **small),
    }


def build(name: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(shapes()[name]).eval()


def synthetic_requests(n: int):
    from eac_lightning.data.requests import EditRequest

    return [EditRequest(prompt="{} is a citizen of", subject=f"Subject number {i} of the stream",
                        target_new=f"Country {i}", source="counterfact/counterfact_500.json", source_index=i,
                        case_id=i, paraphrase_prompts=[f"Paraphrase {i} of the prompt about {{}}"] * 2)
            for i in range(n)]


def method_for(kind: str, model, batch: int):
    """The method object with the state a real run of ``kind`` holds after a step (shapes, not values)."""
    from eac_lightning.methods import MEMIT, ROME, AlphaEdit, EACHyperParams
    from eac_lightning.methods.beac import BEAC, BEACHyperParams
    from eac_lightning.models.adapters import mlp_out_name, weight_view

    layers = list(range(LAYERS))
    if kind in ("rome", "rome-eac"):
        m = ROME(layer=1, eac=EACHyperParams() if kind == "rome-eac" else None)
        m.templates = ["{}"] + [f"Context number {i} of ten tokens or so. {{}}" for i in range(20)]  # ROME's 21
    elif kind == "memit-eac":
        m = MEMIT(layers=layers, eac=EACHyperParams())
    elif kind == "alphaedit":
        m = AlphaEdit(layers=layers)
    elif kind == "beac":
        # the settings these costs were measured with (before BEAC's defaults became the beac preset's: no refresh,
        # the published z)
        m = BEAC(layers=layers, write_aware=False, beac=BEACHyperParams(key_memory=0.0))
    else:
        raise ValueError(kind)
    m.module_names = [mlp_out_name(model, l) for l in ([1] if kind.startswith("rome") else layers)]
    if not kind.startswith("rome"):
        m.templates = ["{}"] + [f"Context number {i}. {{}}" for i in range(5)]  # MEMIT's 6
    if kind in ("alphaedit", "beac"):
        d_k = weight_view(model, m.module_names[0]).shape[1]
        m._step_keys = {n: torch.randn(d_k, batch) for n in m.module_names}
        m.null_kkt = {}  # U₀ᵀK_pK_pᵀU₀ (r × r float64 per layer) is written tensor by tensor: see big_state()
    if kind == "beac":
        d = weight_view(model, m.module_names[0]).shape[0]
        m.usage = torch.rand(LAYERS, d, dtype=torch.float64)
        m.batches = 100
        m.history = [{"batch": float(i), "edits": float(batch), "refreshed": 3.0} for i in range(100)]
        m.refresh_record = [synthetic_requests(batch) for _ in range(m.beac.refresh_window)]
    return m


def big_state(kind: str, method) -> dict[str, tuple[int, ...]]:
    """The method state too large to hold at once in this benchmark (AlphaEdit's and B-EAC's record of earlier keys,
    U₀ᵀK_pK_pᵀU₀: r × r float64 per layer, sized here at its bound r = d_k, the whole key space in the null space):
    written one tensor at a time, so the figures are those of the real files without their memory."""
    if kind not in ("alphaedit", "beac"):
        return {}
    d_k = next(iter(method._step_keys.values())).shape[0]
    return {f"null_kkt/{n}": (d_k, d_k) for n in method.module_names}


def write_one_by_one(shapes: dict[str, tuple[int, ...]], folder: Path, dtype, writer) -> tuple[int, float]:
    """Bytes and seconds of writing each tensor of ``shapes`` (random values) to its own file with ``writer``."""
    total_bytes, total_s = 0, 0.0
    for i, (key, shape) in enumerate(shapes.items()):
        t = torch.randn(shape, dtype=dtype)
        path = folder / f"part{i}"
        start = time.perf_counter()
        writer(key, t, path)
        total_s += time.perf_counter() - start
        total_bytes += path.stat().st_size
        path.unlink()
        del t
    return total_bytes, total_s


def median_seconds(fn, repeats: int) -> float:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def part_steps(args) -> list[dict]:
    from eac_lightning.methods.base import Written
    from eac_lightning.models.adapters import weight_view
    from eac_lightning.session import EditLog, EditSession

    rows = []
    for width in args.widths:
        model = build(width)
        for kind in args.methods:
            batch = 1 if kind.startswith("rome") else args.batch
            method = method_for(kind, model, batch)
            base = {n: weight_view(model, n).detach().clone() for n in method.module_names}
            with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
                # before: the per-step checkpoint of the deltas and the method's whole state
                # (the deltas and the large method state one tensor at a time, the rest of the state in one file)
                old = {n: tuple(w.shape) for n, w in base.items()}
                folder = Path(tmp)
                path = folder / "edit-step.ckpt"
                state_s = median_seconds(lambda: torch.save({"method_state": method.state_dict()}, path), args.repeats)
                before_bytes, before_s = path.stat().st_size, state_s
                path.unlink()
                for shapes, dtype in ((old, torch.float32), (big_state(kind, method), torch.float64)):
                    b, t = write_one_by_one(shapes, folder, dtype, lambda k, x, p: torch.save({k: x}, p))
                    before_bytes, before_s = before_bytes + b, before_s + t
                # after: entries of the edit log, through the session
                session = EditSession(model, method, EditLog(Path(tmp) / "history"), base_weights=base)
                session.start({"width": width, "method": kind})
                requests = synthetic_requests(batch)
                factors = {n: (torch.randn(w.shape[0], batch, dtype=torch.float64) * 1e-3,
                               torch.randn(batch, w.shape[1], dtype=torch.float64)) for n, w in base.items()}
                shaped = {n: torch.zeros(()).expand(w.shape) for n, w in base.items()}  # shape only, no memory
                written = Written(shaped, None, factors)
                resume = {"rng": torch.get_rng_state(), "global_step": 1, "epoch": 0,
                          "datamodule": {"position": batch, "num_requests": 10000, "dropped": [], "num_edits": 10000}}
                appended, committed = [], []
                real_append = session.log.append

                def timed_append(*a, **k):
                    t = time.perf_counter()
                    out = real_append(*a, **k)
                    appended.append(time.perf_counter() - t)
                    return out

                session.log.append = timed_append
                for step in range(1, args.repeats + 1):
                    t = time.perf_counter()
                    ident = session.commit(written, step=step, position=step * batch, requests=requests, resume=resume)
                    committed.append(time.perf_counter() - t)
                entry_bytes = session.log.entry_path(ident).stat().st_size
                t = time.perf_counter()
                session.save_snapshot()
                snap_s = time.perf_counter() - t
                snap_bytes = session.log.snapshot_path(ident).stat().st_size
                from safetensors.torch import save_file

                b, t = write_one_by_one(big_state(kind, method), Path(tmp), torch.float64,
                                        lambda k, x, p: save_file({k: x}, str(p)))
                snap_bytes, snap_s = snap_bytes + b, snap_s + t
            row = {
                "width": width, "method": kind, "batch": batch, "edited_matrices": len(base),
                "matrix_shape": list(next(iter(base.values())).shape),
                "before_bytes_per_step": before_bytes, "before_write_s": round(before_s, 4),
                "after_bytes_per_step": entry_bytes, "after_write_s": round(statistics.median(appended[1:]), 4),
                "after_commit_s": round(statistics.median(committed), 4),
                "snapshot_bytes": snap_bytes, "snapshot_write_s": round(snap_s, 3),
                "ratio": round(before_bytes / entry_bytes, 1),
            }
            row["before_bytes_per_1000_edits"] = before_bytes * 1000 // batch
            row["after_bytes_per_1000_edits"] = entry_bytes * 1000 // batch  # plus the one snapshot the log keeps
            print(json.dumps(row), flush=True)
            rows.append(row)
        del model
    return rows


def part_editor(args) -> list[dict]:
    """The Python API's log at GPT-J width: what it holds per ROME edit."""
    import psutil

    from eac_lightning.methods.base import Written
    from eac_lightning.session import EditLog, EditSession

    model = build("gpt-j")
    method = method_for("rome", model, 1)
    session = EditSession(model, method, EditLog(None), snapshot_every=SNAPSHOT_EVERY)
    session.start({})
    (name, w0), = session.base_weights.items()
    proc = psutil.Process()
    rss = []
    for step in range(1, args.editor_edits + 1):
        factors = {name: (torch.randn(w0.shape[0], 1, dtype=torch.float64), torch.randn(1, w0.shape[1], dtype=torch.float64))}
        session.commit(Written({name: torch.zeros(()).expand(w0.shape)}, None, factors), step=step, position=step,
                       requests=synthetic_requests(1))
        rss.append(proc.memory_info().rss)
    held = sum(t.numel() * t.element_size() for _, ts in session.log._entries.values() for t in ts.values())
    undo = []
    for _ in range(3):  # the last edits, replayed from the snapshot after edit 100
        t = time.perf_counter()
        session.checkout(session.parent(), move_head="undo")
        undo.append(time.perf_counter() - t)
    undo_s = statistics.median(undo)
    # after the first edit D exists; after the snapshot (edit SNAPSHOT_EVERY) its copy too: growth between them
    # and after them is the log's
    first, last = rss[0], rss[-1]
    row = {"width": "gpt-j", "method": "rome", "edits": args.editor_edits,
           "before_bytes_per_edit": w0.numel() * w0.element_size(),  # the snapshot of the matrix Editor kept per edit
           "after_bytes_per_edit": held // args.editor_edits,
           "rss_growth_bytes_per_edit_before_snapshot": (rss[SNAPSHOT_EVERY - 2] - first) // (SNAPSHOT_EVERY - 2),
           "rss_growth_bytes_per_edit_after_snapshot": (last - rss[SNAPSHOT_EVERY]) // max(1, len(rss) - SNAPSHOT_EVERY - 1),
           "rss_first_to_last_bytes": last - first,
           "undo_s": round(undo_s, 3), "matrix_shape": list(w0.shape)}
    print(json.dumps(row), flush=True)
    return [row]


def _fit_config(folder: Path, model_dir: Path, num_edits: int) -> Path:
    import yaml

    cfg = {
        "seed_everything": 0,
        "trainer": {"default_root_dir": str(folder), "enable_progress_bar": False},
        "model": {"model": str(model_dir), "method_settings": "as_given", "stats_tokens": 2000,
                  "method": {"class_path": "eac_lightning.methods.ROME",
                             "init_args": {"layer": 1, "target": {"num_steps": 3}, "context": {"length_count": [[5, 1]]}}}},
        "data": {"path": "counterfact", "num_edits": num_edits, "num_retention": 0, "shuffle": False},
        "eval": {"every": 0, "tasks": [], "probes": [], "rome_scores": False, "literature_metrics": False,
                 "live_metrics": False},
    }
    path = folder.parent / f"{folder.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _cli(repo: Path, *args: str) -> float:
    env = {**os.environ, "PYTHONPATH": str(repo)}
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "eac_lightning.lightning.cli", *args], check=True, env=env, cwd=repo,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - t


def part_fit(args) -> list[dict]:
    sys.path.insert(0, str(HERE))
    from device_check import train_tokenizer
    from transformers import AutoModelForCausalLM, GPT2Config

    from eac_lightning.lightning.export import load_edited_model

    work = Path(tempfile.mkdtemp(dir=args.tmp))
    try:
        tok = train_tokenizer(512, 4000)
        cfg = GPT2Config(n_layer=2, n_embd=1600, n_head=25, n_inner=6400, n_positions=1024, vocab_size=len(tok),
                         bos_token_id=0, eos_token_id=0, pad_token_id=0)
        torch.manual_seed(0)
        model_dir = work / "gpt2-xl-width"
        AutoModelForCausalLM.from_config(cfg).save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
        rows = []
        repos = [("after", REPO)] + ([("before", Path(args.baseline_repo))] if args.baseline_repo else [])
        for label, repo in repos:
            run = work / f"run-{label}"
            seconds = _cli(repo, "fit", "--config", str(_fit_config(run, model_dir, args.fit_edits)))
            size = _folder_bytes(run)
            row = {"label": label, "width": "gpt2-xl (2 layers)", "method": "rome", "edits": args.fit_edits,
                   "run_folder_bytes": size, "checkpoints_bytes": _folder_bytes(run / "checkpoints"),
                   "history_bytes": _folder_bytes(run / "history") if (run / "history").exists() else 0,
                   "fit_s": round(seconds, 1)}
            if label == "after":
                # rollback to 2 edits equals a run stopped at 2 edits (the current model of each, exported)
                stopped = work / "run-stopped"
                _cli(repo, "fit", "--config", str(_fit_config(stopped, model_dir, 2)))
                _cli(repo, "rollback", str(run), "--to-edit", "2")
                a, b = load_edited_model(run).session.deltas, load_edited_model(stopped).session.deltas
                row["rollback_equals_stopped_run"] = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
                journal = [json.loads(x) for x in (run / "history" / "log.jsonl").read_text().splitlines()]
                steps = [r["bytes"] for r in journal if "entry" in r and r.get("kind") != "root"]
                row["entry_bytes"] = statistics.median(steps)
                # the folder's growth per edit step: everything but what a run holds once (config, root, snapshot)
                row["snapshot_bytes"] = _folder_bytes(run / "history" / "snapshots")
            rows.append(row)
            print(json.dumps(row), flush=True)
        for row in rows:  # per edit: the folder without the end-of-fit snapshot, which a run writes once
            row["bytes_per_edit"] = (row["run_folder_bytes"] - row.get("snapshot_bytes", 0)) // row["edits"]
        return rows
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _mb(b: float) -> str:
    return f"{b / 1e6:,.2f}" if b < 1e8 else f"{b / 1e6:,.0f}"


def table(results: dict) -> str:
    out = []
    steps = results.get("steps", [])
    if steps:
        out += ["| width | method | edits / step | before: MB / step | after: MB / step | ratio | before: GB / 1,000 "
                "edits | after: GB / 1,000 edits | write s before / after | the one snapshot kept: MB, write s |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for r in steps:
            out.append(f"| {r['width']} | {r['method']} | {r['batch']} | {_mb(r['before_bytes_per_step'])} | "
                       f"{_mb(r['after_bytes_per_step'])} | {r['ratio']}x | {r['before_bytes_per_1000_edits'] / 1e9:,.1f} | "
                       f"{r['after_bytes_per_1000_edits'] / 1e9:,.2f} | {r['before_write_s']} / {r['after_write_s']} | "
                       f"{_mb(r['snapshot_bytes'])}, {r['snapshot_write_s']} |")
    for r in results.get("editor", []):
        out += ["", f"Editor at GPT-J width ({r['matrix_shape'][0]} x {r['matrix_shape'][1]}, ROME, {r['edits']} edits): "
                f"{r['after_bytes_per_edit'] / 1e3:,.1f} KB held per edit (before: {r['before_bytes_per_edit'] / 1e6:,.0f} MB, "
                f"a copy of the matrix); the process's RSS grew {r['rss_growth_bytes_per_edit_before_snapshot'] / 1e3:,.0f} KB per "
                f"edit before the snapshot at edit {SNAPSHOT_EVERY} and {r['rss_growth_bytes_per_edit_after_snapshot'] / 1e3:,.0f} "
                f"KB per edit after it (the snapshot itself: one copy of the matrix, kept once); undo of one of the "
                f"last edits (replayed from the snapshot) {r['undo_s']} s (median of 3)."]
    fit = results.get("fit", [])
    if fit:
        out += ["", "| fit at GPT2-XL width (2 layers), ROME | edits | run folder MB | MB per edit | entry MB | "
                "rollback = run stopped there |", "|---|---|---|---|---|---|"]
        for r in fit:
            out.append(f"| {r['label']} | {r['edits']} | {_mb(r['run_folder_bytes'])} | {_mb(r['bytes_per_edit'])} | "
                       f"{_mb(r['entry_bytes']) if 'entry_bytes' in r else '-'} | "
                       f"{r.get('rollback_equals_stopped_run', '-')} |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["steps", "editor", "fit"], default="steps")
    p.add_argument("--widths", nargs="+", default=["gpt2-xl", "gpt-j", "llama3-8b"])
    p.add_argument("--methods", nargs="+", default=["rome", "rome-eac", "memit-eac", "alphaedit", "beac"])
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--editor-edits", type=int, default=120)
    p.add_argument("--fit-edits", type=int, default=4)
    p.add_argument("--baseline-repo", default=None)
    p.add_argument("--tmp", default=None, help="folder for the files written (default: the system's temp folder)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--table", action="store_true", help="print the tables of --out and exit")
    args = p.parse_args()
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    if args.table:
        print(table(results))
        return
    torch.set_num_threads(1)
    rows = {"steps": part_steps, "editor": part_editor, "fit": part_fit}[args.part](args)
    if args.part == "steps":  # rows of other widths and methods, measured by other invocations, are kept
        ran = {(r["width"], r["method"]) for r in rows}
        rows = [r for r in results.get("steps", []) if (r["width"], r["method"]) not in ran] + rows
    results[args.part] = rows
    results.setdefault("commands", {})[args.part] = "OMP_NUM_THREADS=1 python benchmarks/edit_log_cost.py " + " ".join(
        sys.argv[1:])
    results.setdefault("measured", {})[args.part] = datetime.date.today().isoformat()
    results["machine"] = f"{os.cpu_count()} CPU cores, torch {torch.__version__}, 1 thread"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
