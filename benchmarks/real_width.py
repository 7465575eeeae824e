"""Real-width proxies through the main command: ``eac-lightning fit`` on random-weight models of the shapes users
edit (GPT2-XL, GPT-J, LLaMA-3-8B, Qwen2.5-7B) with a few decoder layers at full width, per method: seconds per
edit, where the time goes (summary.json's ``phase_seconds``), peak memory, disk per edit step, and a FLOP-based
extrapolation to the full depth on an H100.

Each shape is built once as a local Hugging Face folder (transformers' config class with ``--depth`` decoder layers,
the real vocabulary, random weights, the shipped ``testbed:small`` tokenizer, whose 8,192 ids all lie inside every
real vocabulary; generation is restricted to them). Then, one subprocess at a time:

- ``statistics``: ``eac-lightning stats --model <folder> --layers [...] --num_tokens N`` computes C = E[kkᵀ] of every
  layer the methods edit (d_k × d_k, float64) into the benchmark's own cache folder; the fits read it from there.
- one row per method: ``eac-lightning fit --config configs/methods/<preset>.yaml --model.model <folder> ...``
  (ROME-EAC: one warm-up edit then ``--rome-edits`` single edits; MEMIT-EAC, AlphaEdit, B-EAC: one batch),
  the method's layers moved into the shallow model (``--model.method.init_args.layer(s)``), float32 unless
  ``--dtype``, CounterFact requests from the shipped data, the prefix contexts shortened (``--context``), evaluation
  reduced to the edit metrics of the edited requests (measured: the ``evaluation`` phase).

While a subprocess runs its resident memory is sampled from /proc every second (it is stopped, and the row says
so, past ``--max-rss-gb`` or ``--max-minutes``). A callback of this script (:class:`LayerTokens`, passed with
``--trainer.callbacks+=``) counts the tokens through every decoder layer and the LM head in each phase; with the
config's parameter counts and the closed forms' operation counts (:func:`solve_flops`) they give each phase's FLOPs
at the proxy's depth (the CPU throughput they imply here) and at the full depth, divided by an assumed H100
throughput (:data:`H100_TFLOPS`; an estimate, not a measurement).

Rows are written to ``benchmarks/results/real_width.json`` as each finishes; a row already there is skipped unless
``--force``, so an interrupted invocation is restarted where it stopped. ``--table`` prints the table.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/real_width.py --shapes gpt2-xl --methods statistics rome-eac memit-eac
    OMP_NUM_THREADS=1 python benchmarks/real_width.py --shapes gpt2-xl --methods rome-eac --dtype bfloat16 \\
        --rome-edits 0 --tag bf16
    OMP_NUM_THREADS=1 python benchmarks/real_width.py --shapes gpt2-xl --methods bf16-step   # forward/backward only
    python benchmarks/real_width.py --table
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
import time
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results" / "real_width.json"
TOKENIZER = REPO / "eac_lightning" / "assets" / "testbeds" / "small"  # 8,192 ids, <|endoftext|> = 0
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))  # the package of this checkout when it is not installed

# Assumed sustained H100 (SXM) throughput for the estimate, TFLOP/s: ~40 % of the 989 dense BF16 tensor-core peak for
# the model's forwards and backwards (bf16 weights, as on a GPU), ~50 % of the 67 FP64 tensor-core peak for the
# float64 closed forms (solves, eigendecomposition, covariance sums). NVIDIA H100 datasheet peaks; the shares are
# assumptions. Small single edits do not fill an H100 (a few hundred tokens per step), so read the estimate as a
# lower bound on the time.
H100_TFLOPS = {"model": 400.0, "float64": 33.0}
MODEL_PHASES = ("target", "keys", "evaluation", "statistics")


@dataclass
class Shape:
    """A model shape: the transformers config (built with ``depth`` layers), its real depth and published layers."""

    family: str  # transformers model_type
    config: dict
    full_depth: int
    rome_layer: int  # published ROME layer at full depth
    memit_layers: list[int]  # published MEMIT/AlphaEdit layers at full depth
    source: str  # where the published layers come from
    proxy_rome_layer: int = 1
    proxy_memit_layers: list[int] = field(default_factory=lambda: [0, 1])


SHAPES: dict[str, Shape] = {
    # the test's shape: a GPT-2 64 wide, small enough to run end to end in seconds
    "tiny": Shape("gpt2", dict(n_embd=64, n_head=4, n_inner=256, n_positions=256, vocab_size=8192), 8, 1, [0, 1],
                  "testbed-like"),
    "gpt2-xl": Shape("gpt2", dict(n_embd=1600, n_head=25, n_inner=6400, n_positions=1024, vocab_size=50257), 48, 17,
                     [13, 14, 15, 16, 17], "ROME/MEMIT hparams/gpt2-xl.json"),
    "qwen2.5-7b": Shape("qwen2", dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
                                      num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768,
                                      rope_theta=1e6, tie_word_embeddings=False), 28, 5, [4, 5, 6, 7, 8],
                        "assumed as LLaMA-3-8B's (no published ROME/MEMIT layers in configs/published)",
                        proxy_memit_layers=[1]),
    "llama3-8b": Shape("llama", dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                     num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                                     rope_theta=500000.0, tie_word_embeddings=False), 32, 5, [4, 5, 6, 7, 8],
                       "AlphaEdit hparams/Llama3-8B.json", proxy_memit_layers=[1]),
    "gpt-j": Shape("gptj", dict(n_embd=4096, n_head=16, rotary_dim=64, n_positions=2048, vocab_size=50400), 28, 5,
                   [3, 4, 5, 6, 7, 8], "ROME/MEMIT hparams/EleutherAI_gpt-j-6B.json", proxy_memit_layers=[1]),
}
METHODS = ("statistics", "rome-eac", "memit-eac", "alphaedit", "beac", "bf16-step")
# the write-aware methods (B-EAC's preset) solve for their write directions inside the target optimisation
SOLVE_IN_TARGET = {"beac"}


# --------------------------------------------------------------------------------------------- the model folder


def config_for(shape: Shape, depth: int):
    from transformers import AutoConfig

    ids = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}  # the tokenizer's <|endoftext|>
    layers = {"gpt2": "n_layer", "gptj": "n_layer"}.get(shape.family, "num_hidden_layers")
    return AutoConfig.for_model(shape.family, **shape.config, **{layers: depth}, **ids)


def build_folder(name: str, depth: int, root: Path) -> Path:
    """The shape's folder (random weights, seed 0; the testbed tokenizer), built once."""
    folder = root / "models" / f"{name}-{depth}l"
    if (folder / "done").exists():
        return folder
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    shutil.rmtree(folder, ignore_errors=True)
    cfg = config_for(SHAPES[name], depth)
    torch.manual_seed(0)
    print(f"[real_width] building {folder.name} ({cfg.model_type}, vocab {cfg.vocab_size})", flush=True)
    model = AutoModelForCausalLM.from_config(cfg)
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    # generated prefix contexts use the tokenizer's ids only: the rest of the real vocabulary has no text
    model.generation_config.suppress_tokens = list(range(len(tok), cfg.vocab_size)) or None
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    (folder / "done").write_text("")
    return folder


# ------------------------------------------------------------------------------------- counting work per phase


class LayerTokens(L.Callback):
    """Counts, per phase of the run's clock (:data:`eac_lightning.progress.PHASES`), the tokens through every
    decoder layer, the token-context products of their attention and the rows through the LM head, each split by
    whether a backward follows (the input needs a gradient). Written to ``<run>/layer_tokens.json`` at the end of
    fit. Hooks only: the counts cost nothing measurable."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        from eac_lightning.models.adapters import get_spec
        from eac_lightning.progress import PHASES

        pl_module.configure_model()  # the model is loaded now, so the statistics pass is counted too
        lm = pl_module.lm
        self.counts: dict = {}
        layers = lm.get_submodule(get_spec(lm).layers)

        def add(kind: str, grad: bool, value: int) -> None:
            where = self.counts.setdefault(PHASES.current or "other", {}).setdefault(kind, {"fwd": 0, "bwd": 0})
            where["bwd" if grad else "fwd"] += int(value)

        def layer_pre(mod, args, kwargs):
            h = args[0] if args else kwargs.get("hidden_states")
            if h is not None and h.dim() == 3:
                grad = h.requires_grad and __import__("torch").is_grad_enabled()
                add("layer_tokens", grad, h.shape[0] * h.shape[1])
                add("attention_token_context", grad, h.shape[0] * h.shape[1] * h.shape[1])

        def head(mod, args, output):
            x = args[0]
            add("head_rows", x.requires_grad, x.numel() // x.shape[-1])

        self.handles = [layer.register_forward_pre_hook(layer_pre, with_kwargs=True) for layer in layers]
        self.handles.append(lm.get_output_embeddings().register_forward_hook(head))

    def on_train_end(self, trainer, pl_module) -> None:
        Path(trainer.default_root_dir, "layer_tokens.json").write_text(json.dumps(self.counts, indent=1) + "\n")


def shape_counts(name: str) -> dict:
    """Per-token FLOP ingredients of the shape: weight parameters of one decoder layer, attention width, hidden
    size, d_k (the edited projection's input), vocabulary."""
    import torch
    from transformers import AutoModelForCausalLM

    from eac_lightning.models.adapters import get_spec, mlp_out_name, weight_view

    cfg = config_for(SHAPES[name], 1)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    layer = model.get_submodule(get_spec(model).layers)[0]
    weights = sum(p.numel() for p in layer.parameters() if p.dim() == 2)
    heads = getattr(cfg, "num_attention_heads", None) or cfg.n_head
    hidden = getattr(cfg, "hidden_size", None) or cfg.n_embd
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    d, d_k = weight_view(model, mlp_out_name(model, 0)).shape
    return {"layer_weights": weights, "attention_width": heads * head_dim, "hidden": hidden, "d": d, "d_k": d_k,
            "vocab": cfg.vocab_size}


def model_flops(counts: dict, sc: dict) -> tuple[float, float]:
    """(decoder-layer FLOPs, LM-head FLOPs) of one phase's counts. A forward is 2 FLOPs per weight per token plus
    QKᵀ and AV (4 · context · attention width per token); a backward through frozen weights computes input
    gradients only, as much as the forward for the weights and twice for the attention (dQ, dK; dA, dV)."""
    lt = counts.get("layer_tokens", {})
    at = counts.get("attention_token_context", {})
    hr = counts.get("head_rows", {})
    lin = 2 * sc["layer_weights"]
    att = 4 * sc["attention_width"]
    layers = (lt.get("fwd", 0) + 2 * lt.get("bwd", 0)) * lin + (at.get("fwd", 0) + 3 * at.get("bwd", 0)) * att
    head = (hr.get("fwd", 0) + 2 * hr.get("bwd", 0)) * 2 * sc["hidden"] * sc["vocab"]
    return float(layers), float(head)


def solve_flops(method: str, d: int, d_k: int, n: int) -> dict[str, float]:
    """The closed forms' float64 FLOPs per edit step and per edited layer (leading terms, from the code):

    - ROME (per edit): C⁻¹k through the cached Cholesky factor (2d_k²), the rank-one update (2·d·d_k);
    - MEMIT (memit-eac): C⁻¹K (2d_k²n), KᵀC⁻¹K (2d_kn²), the n×n solve, RAᵀ (2·d·d_k·n);
    - AlphaEdit and B-EAC (AlphaEdit's solve in the null space, methods/alphaedit.py ``null_space_solve``): U₀ᵀK
      (2d_k·r·n), G + (U₀ᵀK)(U₀ᵀK)ᵀ (2r²n), its Cholesky (r³/3) and solve (2r²n), U₀Y (2d_k·r·n), RAᵀ, and after the
      write G += (U₀ᵀK)(U₀ᵀK)ᵀ (2d_k·r·n + 2r²n), with r, the null space's dimension, at its bound d_k; B-EAC also
      KᵀC⁻¹K for its separation. (Rows measured before the solve moved to the null space ran the published form,
      P(KKᵀ + K_pK_pᵀ) and a d_k × d_k LU, ~2.7d_k³: their GFLOP/s were computed with it.)

    Once per run (``first``): the Cholesky factor of C (d_k³/3) at the first solve; ``setup``: AlphaEdit's
    null-space basis, an eigendecomposition with eigenvectors (~9d_k³, Golub & Van Loan's count for the symmetric QR
    algorithm)."""
    if method == "rome-eac":
        return {"step": n * (2 * d_k**2 + 2 * d * d_k), "first": d_k**3 / 3, "setup": 0.0}
    if method == "memit-eac":
        return {"step": 2 * d_k**2 * n + 2 * d_k * n**2 + 2 / 3 * n**3 + 2 * n**2 * d_k + 2 * d * d_k * n,
                "first": d_k**3 / 3, "setup": 0.0}
    r = d_k
    alpha = 6 * d_k * r * n + 6 * r**2 * n + r**3 / 3 + 2 * d * d_k * n
    if method == "beac":
        alpha += 2 * d_k**2 * n + 2 * d_k * n**2
        return {"step": alpha, "first": d_k**3 / 3, "setup": 9 * d_k**3}
    return {"step": alpha, "first": 0.0, "setup": 9 * d_k**3}


def _sig(x: float) -> float:
    return float(f"{x:.3g}")


def flop_report(name: str, method: str, row: dict, tokens: dict, sc: dict) -> dict:
    """FLOPs per phase at the proxy's depth (counted), the CPU throughput they imply, the same phases at the full
    depth and the H100 estimate."""
    shape = SHAPES[name]
    depth = row["depth"]
    proxy_layers = row["layers"]
    full_layers = [shape.rome_layer] if method == "rome-eac" else shape.memit_layers
    steps, n = row["edit_steps"], row["batch_size"]
    # how many decoder layers a phase runs per forward, at the proxy's depth and at the full one
    ratio = {
        "target": (shape.full_depth - full_layers[-1]) / (depth - proxy_layers[-1]),  # from the (last) edited layer up
        "keys": sum(l + 1 for l in full_layers) / sum(l + 1 for l in proxy_layers),  # up to each edited layer
        "evaluation": shape.full_depth / depth,
        "statistics": shape.full_depth / depth,
    }
    per_layer = solve_flops(method, sc["d"], sc["d_k"], n)
    solve_phase = "target" if method in SOLVE_IN_TARGET else "solve"
    proxy: dict[str, float] = {}
    full: dict[str, float] = {}
    for ph, c in tokens.items():
        layers_f, head_f = model_flops(c, sc)
        proxy[ph] = layers_f + head_f
        full[ph] = layers_f * ratio.get(ph, 1.0) + head_f
    linalg_proxy = len(proxy_layers) * (per_layer["step"] * steps + per_layer["first"])
    linalg_full = len(full_layers) * (per_layer["step"] * steps + per_layer["first"])
    proxy[solve_phase] = proxy.get(solve_phase, 0.0) + linalg_proxy
    full[solve_phase] = full.get(solve_phase, 0.0) + linalg_full
    proxy["setup"] = len(proxy_layers) * per_layer["setup"]
    full["setup"] = len(full_layers) * per_layer["setup"]
    secs = row["phase_seconds"]
    cpu = {ph: proxy[ph] / secs[ph] / 1e9 for ph in proxy if secs.get(ph) and proxy[ph] > 0}

    def h100(ph: str, f: float) -> float:
        if ph in MODEL_PHASES and not (ph == solve_phase):
            return f / (H100_TFLOPS["model"] * 1e12)
        if ph == solve_phase and ph == "target":  # the model part and the float64 solve part
            return (f - linalg_full) / (H100_TFLOPS["model"] * 1e12) + linalg_full / (H100_TFLOPS["float64"] * 1e12)
        return f / (H100_TFLOPS["float64"] * 1e12)

    edit_phases = ("target", "keys", "solve")
    h100_s = {ph: h100(ph, f) for ph, f in full.items() if f > 0}
    edits = row["edits"]
    return {
        "flops_proxy": {k: round(v / 1e9, 2) for k, v in proxy.items() if v > 0},  # GFLOP over the run
        "cpu_gflops": {k: round(v, 1) for k, v in cpu.items()},
        "flops_full_depth": {k: round(v / 1e9, 2) for k, v in full.items() if v > 0},
        "full_depth_layers": {"depth": shape.full_depth, "edited": full_layers, "source": shape.source},
        "h100_s_per_phase": {k: _sig(v) for k, v in h100_s.items()},
        "h100_s_per_edit": _sig(sum(h100_s.get(ph, 0.0) for ph in edit_phases) / edits),
        "h100_setup_s": _sig(h100_s.get("setup", 0.0)),
    }


# ------------------------------------------------------------------------------------------------ running rows


def machine() -> dict:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    flags = ""
    try:
        flags = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags"))
    except (OSError, StopIteration):
        pass
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {"device": device, "nproc": os.cpu_count(), "threads": int(os.environ.get("OMP_NUM_THREADS", "0")) or None,
            "load_average_at_start": [round(x, 2) for x in load] if load else None,
            "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
            "load_note": "shared 2-core machine, other jobs running" if (os.cpu_count() or 0) <= 2 else None}


def rss_mib(pid: int) -> float:
    """Resident memory of ``pid`` and its children (the CLI runs in one process; children if it forks)."""
    total = 0.0
    for p in [pid, *_children(pid)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            pass
    return total


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def run_watched(cmd: list[str], log: Path, env: dict, max_rss_gb: float, max_minutes: float) -> dict:
    """Run ``cmd`` (output to ``log``), sampling its memory every second; stop it past either limit."""
    t0 = time.time()
    peak, stopped = 0.0, None
    with open(log, "a") as fh:
        fh.write(" ".join(cmd) + "\n")
        fh.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, env=env)
        while proc.poll() is None:
            mib = rss_mib(proc.pid)
            peak = max(peak, mib)
            if mib > max_rss_gb * 1024:
                stopped = f"stopped at {mib / 1024:.1f} GB resident (--max-rss-gb {max_rss_gb})"
            elif time.time() - t0 > max_minutes * 60:
                stopped = f"stopped after {max_minutes:g} min (--max-minutes)"
            if stopped:
                proc.terminate()
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                break
            time.sleep(1)
        rc = proc.wait()
    return {"rc": rc, "wall_s": round(time.time() - t0, 1), "peak_rss_mib": round(peak), "stopped": stopped}


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "eac_lightning.lightning.cli", *args]


def env_for(root: Path, threads: int) -> dict:
    return {**os.environ, "EAC_CACHE_DIR": str(root / "cache"), "OMP_NUM_THREADS": str(threads),
            "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            "HF_HUB_OFFLINE": "1"}


def stats_layers(name: str) -> list[int]:
    s = SHAPES[name]
    return sorted({s.proxy_rome_layer, *s.proxy_memit_layers})


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def statistics_row(name: str, args, root: Path, model: Path) -> dict:
    layers = stats_layers(name)
    started = time.time()
    cmd = cli("stats", "--model", str(model), "--layers", json.dumps(layers), "--num_tokens", str(args.stats_tokens))
    run = run_watched(cmd, root / f"{name}-statistics.log", env_for(root, args.threads), args.max_rss_gb,
                      args.max_minutes)
    if run["rc"]:
        raise RuntimeError(f"{name} statistics failed: {run}; see {root / f'{name}-statistics.log'}")
    sc = shape_counts(name)
    shape = SHAPES[name]
    # one forward of the whole proxy (and its head, every position) per token, and Σ kkᵀ in float64 per layer
    layer_f, head_f = model_flops({"layer_tokens": {"fwd": args.stats_tokens * args.depth},
                                   "attention_token_context": {"fwd": args.stats_tokens * 128 * args.depth // 1},
                                   "head_rows": {"fwd": args.stats_tokens}}, sc)
    sums = len(layers) * 2 * sc["d_k"] ** 2 * args.stats_tokens
    full_layers = sorted({shape.rome_layer, *shape.memit_layers})
    full_model = (layer_f * shape.full_depth / args.depth + head_f) * 100_000 / args.stats_tokens
    full_sums = len(full_layers) * 2 * sc["d_k"] ** 2 * 100_000
    written = [f for f in (root / "cache" / "stats").glob("*.pt") if f.stat().st_mtime >= started]
    cache = sum(f.stat().st_size for f in written) or None  # this shape's files (other shapes share the folder)
    return {
        "shape": name, "method": "statistics", "dtype": "float32", "depth": args.depth, "layers": layers,
        "tokens": args.stats_tokens, "d_k": sc["d_k"], "wall_s": run["wall_s"], "peak_rss_mib": run["peak_rss_mib"],
        "cache_bytes_per_layer": cache // len(layers) if cache else None,
        "flops_proxy_gflop": round((layer_f + head_f + sums) / 1e9, 1),
        "cpu_gflops": round((layer_f + head_f + sums) / 1e9 / run["wall_s"], 1),
        "full_depth": {"layers": full_layers, "tokens": 100_000, "gflop": round((full_model + full_sums) / 1e9),
                       "h100_s": round(full_model / (H100_TFLOPS["model"] * 1e12)
                                       + full_sums / (H100_TFLOPS["float64"] * 1e12), 2)},
        "command": " ".join(["eac-lightning", *cmd[3:]]), "machine": machine(), "stopped": run["stopped"],
    }


def _measure_nothing_but_edits() -> list[str]:
    """The evaluation settings that leave the edit metrics of the edited requests only: under ``--eval.*`` where the
    evaluation callback holds what is measured, under ``--model.evaluation.*`` where the module still does."""
    import inspect

    from eac_lightning.lightning.module import EditingModule

    from eac_lightning.evaluation.evaluator import EvaluatorConfig

    where = "--model.evaluation." if "evaluation" in inspect.signature(EditingModule).parameters else "--eval."
    live = [f"{where}live_metrics", "false"] if "live_metrics" in EvaluatorConfig.__dataclass_fields__ else []
    return [f"{where}tasks", "[]", f"{where}probes", "[]", f"{where}rome_scores", "false",
            f"{where}literature_metrics", "false", *live]


def method_row(name: str, method: str, args, root: Path, model: Path) -> dict:
    shape = SHAPES[name]
    single = method == "rome-eac"
    layers = [shape.proxy_rome_layer] if single else list(shape.proxy_memit_layers)
    edits = (1 + args.rome_edits) if single else args.batch.get(name, args.default_batch)
    batch = 1 if single else edits
    tag = f"-{args.tag}" if args.tag else ""
    run = root / "runs" / f"{name}-{method}{tag}"
    shutil.rmtree(run, ignore_errors=True)  # a row is restarted, never half-resumed
    run.mkdir(parents=True)
    cmd = cli(
        "fit", "--config", str(REPO / "configs" / "methods" / f"{method}.yaml"),
        "--model.model", str(model), "--model.method_settings", "as_given", "--model.dtype", args.dtype,
        "--model.stats_tokens", str(args.stats_tokens),
        *(["--model.method.init_args.layer", str(layers[0])] if single
          else ["--model.method.init_args.layers", json.dumps(layers)]),
        "--model.method.init_args.context", f"{{length_count: [[{args.context[0]}, {args.context[1]}]]}}",
        *(["--model.method.init_args.target.num_steps", str(args.steps)] if args.steps else []),
        "--data.path", "counterfact", "--data.num_edits", str(edits), "--data.batch_size", str(batch),
        "--data.num_retention", "0", "--data.shuffle", "false",
        "--eval.every", "0", *_measure_nothing_but_edits(),
        "--trainer.default_root_dir", str(run), "--trainer.enable_progress_bar", "false",
        "--trainer.callbacks+=real_width.LayerTokens",
    )
    result = run_watched(cmd, run.parent / f"{run.name}.log", env_for(root, args.threads), args.max_rss_gb,
                         args.max_minutes)
    row = {"shape": name, "method": method, "dtype": args.dtype, "depth": args.depth, "layers": layers,
           "edits": edits, "batch_size": batch, "warmup_edits": 1 if single else 0,
           "context": list(args.context), "target_steps": args.steps or 20, "stats_tokens": args.stats_tokens,
           "wall_s": result["wall_s"], "peak_rss_mib": result["peak_rss_mib"], "stopped": result["stopped"],
           "command": " ".join(["eac-lightning", *cmd[3:]]), "machine": machine()}
    if tag:
        row["tag"] = args.tag
    summary = run / "summary.json"
    if result["rc"] or not summary.exists():
        ledger = run / "edits.jsonl"
        row["error"] = result["stopped"] or f"exit {result['rc']} (see {run.parent / f'{run.name}.log'})"
        row["edits_done"] = sum(1 for ln in ledger.read_text().splitlines() if '"edit"' in ln) if ledger.exists() else 0
        return row
    s = json.loads(summary.read_text())
    ledger = [json.loads(ln) for ln in (run / "edits.jsonl").read_text().splitlines() if ln.strip()]
    seconds = [r["seconds"] for r in ledger if "seconds" in r]
    timed = seconds[1:] if single and len(seconds) > 1 else seconds
    journal = [json.loads(ln) for ln in (run / "history" / "log.jsonl").read_text().splitlines() if ln.strip()]
    entries = [r["bytes"] for r in journal if "entry" in r and r.get("kind") != "root" and "bytes" in r]
    snapshot = folder_bytes(run / "history" / "snapshots") if (run / "history" / "snapshots").exists() else 0
    total = folder_bytes(run)
    phases = s["phase_seconds"]
    step_phases = {k: v for k, v in phases.items() if k not in ("statistics", "setup")}
    step_total = sum(step_phases.values())
    row.update({
        "edit_steps": s["edit_steps"],
        "s_per_edit": round(statistics.mean(timed), 3),
        "s_first_edit": seconds[0] if single else None,
        "phase_seconds": phases, "phase_seconds_first_step": s.get("phase_seconds_first_step"),
        "phase_share": {k: round(v / step_total, 3) for k, v in step_phases.items()},
        "run_bytes": total, "bytes_per_step": (total - snapshot) // max(1, s["edit_steps"]),
        "log_entry_bytes": statistics.median(entries) if entries else None, "snapshot_bytes": snapshot,
        "edit_metrics": s["edit_metrics"],
    })
    tokens = json.loads((run / "layer_tokens.json").read_text())
    row["layer_tokens"] = tokens
    row.update(flop_report(name, method, row, tokens, shape_counts(name)))
    if not args.keep_runs:
        shutil.rmtree(run / "history", ignore_errors=True)
    return row


def bf16_step_row(name: str, args) -> dict:
    """One forward and backward of a target optimisation at the shape's width, float32 against bfloat16, in this
    process: the proxy's layers from the ROME layer up over the prompts of one edit (its prefix contexts), with δ
    added at the edited layer's MLP output, as :class:`~eac_lightning.methods.target.TargetProblem` runs a step."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    cfg = config_for(SHAPES[name], args.depth)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    from eac_lightning.models.loading import fuse_activations
    from eac_lightning.models.tracing import layers_from

    fuse_activations(model)
    prompts = 1 + args.context[1]  # the bare prompt and the prefix contexts
    length = 8 + args.context[0]  # the CounterFact prompt with its target (~8 tokens) after a prefix
    hidden = torch.randn(prompts, length, cfg.hidden_size if hasattr(cfg, "hidden_size") else cfg.n_embd) * 0.02
    out = {}
    for dtype in ("float32", "bfloat16", "float32"):
        model.to(getattr(torch, dtype))
        times = []
        for _ in range(3):
            delta = torch.zeros(hidden.shape[-1], dtype=getattr(torch, dtype), requires_grad=True)
            t0 = time.perf_counter()
            with layers_from(model, SHAPES[name].proxy_rome_layer) as run:
                logits = run(hidden.to(getattr(torch, dtype)) + delta)
            logits.float().logsumexp(-1).sum().backward()
            times.append(time.perf_counter() - t0)
        out[dtype] = round(statistics.median(times), 3)  # the second float32 pass replaces the first (warm)
    return {"shape": name, "method": "bf16-step", "depth": args.depth, "prompts": prompts, "tokens": length,
            "seconds": out, "bf16_over_fp32": round(out["bfloat16"] / out["float32"], 2),
            "command": "OMP_NUM_THREADS=1 python benchmarks/real_width.py --shapes " + name + " --methods bf16-step",
            "machine": machine()}


# ----------------------------------------------------------------------------------------------------- output

COLUMNS = ["shape", "method", "dtype", "edits × batch", "s/edit", "target", "keys", "solve", "write", "evaluation",
           "peak RSS GB", "MB / step (log entry)", "CPU GFLOP/s (target, solve)", "H100 est. s/edit (full depth)",
           "note"]


def _pct(row: dict, ph: str) -> str:
    v = row.get("phase_share", {}).get(ph)
    return "–" if v is None else f"{100 * v:.0f} %"


def table(results: dict) -> str:
    rows = results.get("rows", [])
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    order = {s: i for i, s in enumerate(SHAPES)}
    for r in sorted(rows, key=lambda r: (order.get(r["shape"], 99), METHODS.index(r["method"])
                                         if r["method"] in METHODS else 99, r.get("dtype", ""))):
        if r["method"] == "statistics":
            fd = r["full_depth"]
            lines.append(
                f"| {r['shape']} | statistics | float64 C | {r['tokens']:,} tokens × {len(r['layers'])} layers | "
                f"{r['wall_s']:.0f} s in all | | | | | | {r['peak_rss_mib'] / 1024:.1f} | "
                f"{(r['cache_bytes_per_layer'] or 0) / 1e6:,.0f} per layer (cache) | {r['cpu_gflops']} | "
                f"{fd['h100_s']} s for {fd['tokens']:,} tokens × {len(fd['layers'])} layers | d_k {r['d_k']:,} |")
            continue
        if r["method"] == "bf16-step":
            s = r["seconds"]
            lines.append(f"| {r['shape']} | target step, fwd+bwd | float32 / bfloat16 | {r['prompts']} prompts | "
                         f"{s['float32']} / {s['bfloat16']} s | | | | | | | | | | bf16 / fp32 = "
                         f"{r['bf16_over_fp32']} |")
            continue
        timed = r["edits"] - r.get("warmup_edits", 0)
        shape = (f"1 × {r['batch_size']}" if not r.get("warmup_edits") else
                 f"{timed} + 1 warm-up" if timed else "1 (first edit only)")
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['method']} | {r['dtype']} | {shape} | – | | | | | | "
                         f"{r['peak_rss_mib'] / 1024:.1f} | | | | {r['error']}; {r.get('edits_done', 0)} edits done |")
            continue
        cpu = r.get("cpu_gflops", {})
        entry = r.get("log_entry_bytes")
        lines.append(
            f"| {r['shape']} | {r['method']} | {r['dtype']} | {shape} | {r['s_per_edit']:.2f} | {_pct(r, 'target')} | "
            f"{_pct(r, 'keys')} | {_pct(r, 'solve')} | {_pct(r, 'write')} | {_pct(r, 'evaluation')} | "
            f"{r['peak_rss_mib'] / 1024:.1f} | {r['bytes_per_step'] / 1e6:.2f} "
            f"({(entry or 0) / 1e6:.2f}) | {cpu.get('target', '–')}, {cpu.get('solve', '–')} | "
            f"{r['h100_s_per_edit']:.2g} | layers {r['layers']} of {r['depth']}; C over {r['stats_tokens']:,} tokens |")
    return "\n".join(lines)


def load_results(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {"rows": []}


def key(r: dict) -> tuple:
    return (r["shape"], r["method"], r.get("dtype", ""), r.get("tag", ""))


def save_row(path: Path, row: dict, invocation: str) -> None:
    """Merge one row into the results file (re-read first: nothing another invocation wrote is lost); the script's
    command that made it is kept in ``commands`` (a row's own ``command`` is the eac-lightning command it ran)."""
    results = load_results(path)
    row["made_by"] = invocation
    results["rows"] = [r for r in results["rows"] if key(r) != key(row)] + [row]
    results["commands"] = list(dict.fromkeys(r["made_by"] for r in results["rows"] if r.get("made_by")))
    results["assumed_h100_tflops"] = H100_TFLOPS
    results["measured"] = datetime.date.today().isoformat()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["gpt2-xl", "qwen2.5-7b", "llama3-8b", "gpt-j"],
                    choices=list(SHAPES))
    ap.add_argument("--methods", nargs="+", default=["statistics", "rome-eac", "memit-eac", "alphaedit", "beac"],
                    choices=METHODS)
    ap.add_argument("--depth", type=int, default=3, help="decoder layers of the proxy (default 3)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--rome-edits", type=int, default=3, help="ROME-EAC edits timed after the one warm-up edit")
    ap.add_argument("--batch", nargs="*", default=[], metavar="SHAPE=N",
                    help="batch of the batch methods per shape (default --default-batch)")
    ap.add_argument("--default-batch", type=int, default=100)
    ap.add_argument("--context", type=int, nargs=2, default=[5, 2], metavar=("LENGTH", "COUNT"),
                    help="prefix contexts of every method (default 5 2; the presets' are 21 or 6)")
    ap.add_argument("--steps", type=int, default=None, help="target steps (default: the preset's 20)")
    ap.add_argument("--stats-tokens", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-rss-gb", type=float, default=16.0)
    ap.add_argument("--max-minutes", type=float, default=40.0)
    ap.add_argument("--root", type=Path, default=REPO / "runs" / "real_width",
                    help="model folders, statistics cache and run folders")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--tag", default="", help="a second row of the same shape, method and dtype (e.g. bf16)")
    ap.add_argument("--force", action="store_true", help="run rows already in the results file again")
    ap.add_argument("--keep-runs", action="store_true", help="keep the run folders' edit logs")
    ap.add_argument("--table", action="store_true", help="print the table of --out and exit")
    args = ap.parse_args(argv)
    if args.table:
        print(table(load_results(args.out)))
        return load_results(args.out)
    try:
        args.batch = {k: int(v) for k, v in (b.split("=", 1) for b in args.batch)}
    except ValueError:
        ap.error(f"--batch takes SHAPE=N pairs, got {args.batch}")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    given = sys.argv[1:] if argv is None else argv
    invocation = f"OMP_NUM_THREADS={args.threads} python benchmarks/real_width.py {' '.join(given)}"
    done = {key(r) for r in load_results(args.out)["rows"] if "error" not in r}
    for name in args.shapes:  # smallest first, as given
        model = None
        for method in args.methods:
            dtype = "" if method == "bf16-step" else ("float32" if method == "statistics" else args.dtype)
            tag = args.tag if method not in ("statistics", "bf16-step") else ""
            if (name, method, dtype, tag) in done and not args.force:
                print(f"[real_width] {name} {method} {dtype}: in {args.out.name} already (--force runs it again)")
                continue
            print(f"[real_width] {name} {method} {dtype} ...", flush=True)
            t0 = time.time()
            if method == "bf16-step":
                row = bf16_step_row(name, args)
            else:
                model = model or build_folder(name, args.depth, args.root)
                row = (statistics_row(name, args, args.root, model) if method == "statistics"
                       else method_row(name, method, args, args.root, model))
            save_row(args.out, row, invocation)
            print(f"[real_width] {name} {method}: {time.time() - t0:.0f} s; "
                  f"{json.dumps({k: row.get(k) for k in ('s_per_edit', 'phase_share', 'peak_rss_mib', 'error')})}",
                  flush=True)
    results = load_results(args.out)
    print(table(results))
    return results


if __name__ == "__main__":
    main()
