"""Side by side with EasyEdit (``zjunlp/EasyEdit``), the field's reference library, run from outside this
repository: the same model, requests, hyper-parameters, prefix contexts and key statistics through EasyEdit's own
implementations and through ours.

Two parts (docs/reference.md holds the tables and findings):

* ``quality`` (``testbed:small``): AlphaEdit in batches and UltraEdit in turns of the same size, 40 CounterFact
  records of the shipped data in the data module's order (seed 0). Both sides' final models are scored by one
  scorer, ours (:func:`eac_lightning.evaluation.edit_metrics.evaluate_edit_metrics`: EasyEdit's teacher-forced token
  accuracy), EasyEdit's edited matrices loaded into our model; the weight deltas are compared directly too.
* ``cost`` (a random-weight GPT-2 of GPT2-XL's width, a few layers): seconds per AlphaEdit edit, EasyEdit's
  ``apply_algo`` call (what its editor records as an edit's ``time``) against ours through the :class:`Editor` Python
  API (its ``edit``: validation, locality reference of the batch, targets, write, edit log), one process each,
  ``OMP_NUM_THREADS=1``, one after the other.

EasyEdit runs in its own virtual environment (benchmarks/reference/README.md): this script starts that venv's python
on itself with ``--worker SPEC.json``; the worker imports nothing of this project. Our key statistics are exported
with ``eac-lightning stats --export_file`` into the folder EasyEdit's ``stats_dir`` reads, so EasyEdit does not
compute its own from Wikipedia; our prefix contexts are handed to EasyEdit's template cache.

    OMP_NUM_THREADS=1 python benchmarks/reference/easyedit_compare.py --easyedit-python /work/easyedit-venv/bin/python \\
        --easyedit-src /work/easyedit-src --part quality --out benchmarks/results/easyedit_compare.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "benchmarks" / "results" / "easyedit_compare.json"

# EasyEdit's AlphaEdit picks the GPT-2 (Conv1D) layout of P and of its key cache from the substring "gpt2-xl" of
# model_name (AlphaEdit_main.py), and BaseEditor loads GPT-2 tokenizers for a name containing "gpt": the model
# folders handed to it are named so.
EE_TESTBED = "gpt2-xl-layout-testbed-small"
EE_WIDE = "gpt2-xl-width-random-{n_layer}l"


# ------------------------------------------------------------------------------------------------ the worker


def _block_multimodal_imports() -> None:
    """EasyEdit's package ``__init__`` imports its multimodal stack (BLIP-2 through timm and torchvision); PyPI's
    torchvision wheels are built for CUDA torch and do not load with the CPU wheel of torch. The text methods never
    call them, so those two packages are stubbed for the import (after transformers has decided that torchvision
    is absent, so it does not touch them either)."""
    import importlib.abc
    import importlib.machinery
    import types

    import transformers  # noqa: F401
    from transformers.utils import import_utils

    import_utils.is_torchvision_available()

    class _Any(type):
        def __getattr__(cls, name):
            return cls

        def __call__(cls, *a, **k):
            return cls

    class Stub(metaclass=_Any):
        pass

    class StubModule(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return Stub

    class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in ("timm", "torchvision"):
                return importlib.machinery.ModuleSpec(name, self, is_package=True)
            return None

        def create_module(self, spec):
            module = StubModule(spec.name)
            module.__path__ = []
            return module

        def exec_module(self, module):
            pass

    sys.meta_path.insert(0, Finder())


def worker(spec_path: str) -> None:
    """Run one EasyEdit edit stream from a JSON spec; saves the edited matrices and the seconds of each
    ``apply_algo`` call."""
    spec = json.loads(Path(spec_path).read_text())
    workdir = Path(spec["workdir"])
    os.chdir(workdir)  # AlphaEdit saves its projector as ./null_space_project.pt
    sys.path.insert(0, spec["easyedit_src"])
    import warnings

    warnings.simplefilter("ignore")
    _block_multimodal_imports()
    import torch
    import yaml

    torch.manual_seed(0)
    import easyeditor
    from easyeditor import AlphaEditHyperParams, BaseEditor, ROMEHyperParams, UltraEditHyperParams
    from easyeditor.util import nethook

    cls = {"AlphaEdit": AlphaEditHyperParams, "ULTRAEDIT": UltraEditHyperParams, "ROME": ROMEHyperParams}
    cfg = yaml.safe_load(Path(spec["hparams_file"]).read_text())
    cfg.update(spec["overrides"])
    hp_file = workdir / "hparams.yaml"
    hp_file.write_text(yaml.safe_dump(cfg))
    hparams = cls[spec["method"]].from_hparams(str(hp_file))
    editor = BaseEditor.from_hparams(hparams)
    if spec.get("context_templates"):
        if spec["method"] == "AlphaEdit":
            from easyeditor.models.alphaedit import AlphaEdit_main as main_module
        else:
            from easyeditor.models.rome import rome_main as main_module
        main_module.CONTEXT_TEMPLATES_CACHE = spec["context_templates"]
    seconds = []
    n, bs = len(spec["requests"]), spec["batch_size"]
    for start in range(0, n, bs):
        chunk = spec["requests"][start:start + bs]
        t0 = time.perf_counter()
        edited, _ = editor.apply_algo(editor.model, editor.tok, chunk, editor.hparams, copy=False,
                                      return_orig_weights=True)
        seconds.append(time.perf_counter() - t0)
        editor.model = edited  # the sequential protocol (batch_edit(..., sequential_edit=True))
        print(f"[easyedit] batch {start // bs + 1}: {seconds[-1]:.2f} s", file=sys.stderr, flush=True)
    weights = {name: nethook.get_parameter(editor.model, name).detach().cpu().clone() for name in spec["save"]}
    torch.save({"weights": weights, "seconds": seconds, "torch": str(torch.__version__),
                "padding_side": editor.tok.padding_side,
                "easyedit": str(Path(easyeditor.__file__).parent)}, spec["out"])


# ------------------------------------------------------------------------------------------------ our side


def _requests(num_edits: int):
    from eac_lightning.data.datamodule import EditDataModule

    dm = EditDataModule(path="counterfact", num_edits=num_edits, batch_size=1)
    dm.setup()
    return list(dm.requests)


def _as_easyedit(requests) -> list[dict]:
    """EasyEdit's request dicts (``_prepare_requests``): the prompt with the subject in it."""
    return [{"prompt": r.prompt_text, "subject": r.subject, "target_new": r.target_new,
             "ground_truth": r.target_true or "<|endoftext|>", "case_id": i} for i, r in enumerate(requests)]


@contextlib.contextmanager
def _earlier_target_rule(on: bool):
    """The target loop before it followed the published one: stop on the NLL, an update after every forward."""
    from eac_lightning.methods.target import TargetProblem

    was = TargetProblem.last_update
    TargetProblem.last_update = True if on else was
    try:
        yield
    finally:
        TargetProblem.last_update = was


def _ultraedit(layers: list[int], step_size: float, chunk: int):
    import inspect

    from eac_lightning.methods import UltraEdit

    name = "value_step_size" if "value_step_size" in inspect.signature(UltraEdit).parameters else "lr"
    return UltraEdit(layers=layers, ridge=1.0, chunk_size=chunk, **{name: step_size})


def _alphaedit(layers: list[int], clamp: float, early_stop_on: str):
    from eac_lightning.methods import AlphaEdit
    from eac_lightning.methods.target import ContextTemplateParams, TargetHyperParams

    # AlphaEdit hparams/AlphaEdit/gpt2-xl.yaml (EasyEdit's and jianghoucheng/AlphaEdit's): v_num_grad_steps 20,
    # v_lr 0.5, v_weight_decay 0.5, kl_factor 0.0625, nullspace_threshold 2e-2, L2 10, contexts [(10, 5)]
    target = TargetHyperParams(num_steps=20, lr=0.5, weight_decay=0.5, clamp_norm_factor=clamp, kl_factor=0.0625,
                               early_stop=5e-2, early_stop_on=early_stop_on)
    return AlphaEdit(layers=layers, target=target, context=ContextTemplateParams(length_count=[[10, 5]]),
                     nullspace_threshold=0.02, l2=10.0, write_aware=False)


def _ours(model_name: str, method, requests, batch_size: int, templates=None, earlier_rule: bool = False,
          stats_kwargs: dict | None = None):
    """Edit ``requests`` in batches through the Editor; returns (editor, seconds per batch)."""
    from eac_lightning.editor import Editor
    from eac_lightning.models.loading import load_model
    from eac_lightning.stats.covariance import CovarianceStore

    model, tok = load_model(model_name)
    if templates is not None and hasattr(method, "templates"):
        method.templates = list(templates)
    editor = Editor(model, tok, method, CovarianceStore(model, tok, **(stats_kwargs or {})))
    seconds = []
    with _earlier_target_rule(earlier_rule):
        for start in range(0, len(requests), batch_size):
            t0 = time.perf_counter()
            editor.edit(requests[start:start + batch_size])
            seconds.append(time.perf_counter() - t0)
    return editor, seconds


def _score(model, tok, requests, reference) -> dict:
    """Our scorer on a final model: reliability / generalization / locality (and their exact-greedy variants) over
    every request, and which requests' targets it predicts (teacher-forced, every token)."""
    from eac_lightning.evaluation.edit_metrics import evaluate_edit_metrics
    from eac_lightning.evaluation.scoring import score_targets

    m = evaluate_edit_metrics(model, tok, requests, reference, rome_scores=False)
    per = score_targets(model, tok, [r.prompt_text for r in requests], [r.target_new for r in requests])
    keep = ("reliability", "generalization", "locality", "reliability_gen", "generalization_gen", "locality_gen")
    return {**{k: round(m[k], 4) for k in keep}, "written": [int(s.pred == s.target) for s in per]}


def _delta_agreement(base: dict, ours: dict, theirs: dict) -> dict:
    """Per module: ‖ΔW_EasyEdit − ΔW_ours‖ / ‖ΔW_ours‖, their cosine and both norms."""
    import torch

    out = {}
    for name in ours:
        a, b = (ours[name] - base[name]).double(), (theirs[name] - base[name]).double()
        out[name] = {"rel_diff": round(float((b - a).norm() / a.norm().clamp_min(1e-30)), 4),
                     "cosine": round(float(torch.dot(a.flatten(), b.flatten()) / (a.norm() * b.norm()).clamp_min(1e-30)), 4),
                     "norm_ours": round(float(a.norm()), 4), "norm_easyedit": round(float(b.norm()), 4)}
    return out


# ---------------------------------------------------------------------------------------------- the driver


class EasyEdit:
    """Runs the worker in EasyEdit's venv."""

    def __init__(self, python: str, src: str, workdir: Path):
        self.python, self.src, self.workdir = python, str(Path(src).resolve()), workdir
        stamp = Path(self.src) / "COMMIT"  # an exported tree has no .git: README.md here writes the commit there
        git = subprocess.run(["git", "-C", self.src, "rev-parse", "HEAD"], capture_output=True, text=True)
        self.commit = stamp.read_text().strip() if stamp.exists() else git.stdout.strip() or "unknown"
        ver = subprocess.run([python, "-c", "import torch, transformers; print(torch.__version__, "
                              "transformers.__version__)"], capture_output=True, text=True, check=True)
        self.versions = ver.stdout.strip()

    def run(self, tag: str, method: str, hparams_file: str, overrides: dict, requests: list[dict], batch_size: int,
            save: list[str], context_templates=None) -> dict:
        import torch

        run_dir = self.workdir / "runs" / tag
        if run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        spec = {"easyedit_src": self.src, "method": method, "workdir": str(run_dir),
                "hparams_file": str(Path(self.src) / hparams_file), "overrides": overrides, "requests": requests,
                "batch_size": batch_size, "save": save, "context_templates": context_templates,
                "out": str(run_dir / "result.pt")}
        (run_dir / "spec.json").write_text(json.dumps(spec, indent=1))
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1",
               "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": ""}
        with open(run_dir / "log.txt", "w") as log:
            proc = subprocess.run([self.python, str(Path(__file__).resolve()), "--worker", str(run_dir / "spec.json")],
                                  env=env, stdout=log, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            tail = (run_dir / "log.txt").read_text()[-3000:]
            raise SystemExit(f"easyedit_compare: error: EasyEdit's run {tag} failed (exit {proc.returncode}); "
                             f"its log {run_dir / 'log.txt'} ends:\n{tail}")
        return torch.load(run_dir / "result.pt", weights_only=True)


def _easyedit_folder(src: Path, dst: Path) -> Path:
    """A copy of a model folder for EasyEdit (weights linked): its tokenizer pads on the right, as the hub's GPT-2
    tokenizers do (EasyEdit's AlphaEdit and ROME index padded prompts as right-padded; BaseEditor itself switches to
    left padding for the methods that need it, UltraEdit among them)."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name == "tokenizer_config.json":
            cfg = json.loads(f.read_text())
            cfg["padding_side"] = "right"
            (dst / f.name).write_text(json.dumps(cfg, indent=2))
        elif f.suffix == ".safetensors":
            if not (dst / f.name).exists():
                (dst / f.name).symlink_to(f.resolve())
        elif f.name in ("config.json", "generation_config.json", "tokenizer.json"):
            shutil.copy(f, dst / f.name)
    return dst


def _export_stats(model: str, layers: list[int], stats_dir: Path, ee_name: str, num_tokens: int | None = None,
                  sample_size: int = 100_000) -> list[str]:
    """Our key statistics, exported by the CLI in ROME/MEMIT's mom2 format, where EasyEdit's ``layer_stats`` looks:
    ``<stats_dir>/<model folder name>/wikipedia_stats/<module>_float32_mom2_<mom2_n_samples>.npz``."""
    tmp = stats_dir / "export" / "mom2.npz"
    cmd = [sys.executable, "-m", "eac_lightning.lightning.cli", "stats", "--model", model,
           "--layers", json.dumps(layers), "--export_file", str(tmp)]
    if num_tokens:
        cmd += ["--num_tokens", str(num_tokens)]
    subprocess.run(cmd, cwd=REPO, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    dest = stats_dir / ee_name / "wikipedia_stats"
    dest.mkdir(parents=True, exist_ok=True)
    for layer in layers:
        src = tmp.with_name(f"mom2-layer{layer}.npz") if len(layers) > 1 else tmp
        shutil.move(src, dest / f"transformer.h.{layer}.mlp.c_proj_float32_mom2_{sample_size}.npz")
    return ["python -m eac_lightning.lightning.cli " + " ".join(cmd[3:])]


def quality(args, ee: EasyEdit, workdir: Path) -> dict:
    import torch

    from eac_lightning.evaluation.edit_metrics import compute_locality_reference
    from eac_lightning.models.adapters import mlp_out_name
    from eac_lightning.models.loading import load_model, resolve_model_path

    model_name = "testbed:small"
    folder = Path(resolve_model_path(model_name))
    ee_folder = _easyedit_folder(folder, workdir / "models" / EE_TESTBED)
    requests = _requests(args.num_edits)
    base_model, tok = load_model(model_name)
    n_layer = base_model.config.n_layer
    reference = compute_locality_reference(base_model, tok, requests)
    alpha_layers = [0, 1, 2]  # testbed:small's MEMIT layers (editing.json)
    ultra_layers = [2, 3]  # configs/testbed/ultraedit.yaml
    commands = _export_stats(model_name, alpha_layers, workdir / "stats", EE_TESTBED)
    ee_requests = _as_easyedit(requests)
    # our prefix contexts ([(10, 5)], seeded), handed to both sides
    probe = _alphaedit(alpha_layers, 0.75, "total")
    probe.setup(base_model, tok, None)
    templates = list(probe.templates)

    def weights(model, layers):
        return {f"{mlp_out_name(model, l)}.weight": model.get_submodule(mlp_out_name(model, l)).weight.detach().clone()
                for l in layers}

    def score_easyedit(saved: dict) -> dict:
        model, _ = load_model(model_name)
        with torch.no_grad():
            for name, w in saved.items():
                model.get_parameter(name).copy_(w)
        return _score(model, tok, requests, reference)

    rows = []
    for clamp in args.clamps:
        setting = {"method": "AlphaEdit", "layers": alpha_layers, "v_loss_layer": n_layer - 1, "batch_size":
                   args.batch_size, "v_num_grad_steps": 20, "v_lr": 0.5, "v_weight_decay": 0.5,
                   "clamp_norm_factor": clamp, "kl_factor": 0.0625, "nullspace_threshold": 0.02, "L2": 10.0,
                   "context_templates": templates, "mom2": "testbed corpus, 100,000 tokens (ours, exported)"}
        overrides = {"model_name": str(ee_folder), "stats_dir": str(workdir / "stats"), "device": "cpu",
                     "layers": alpha_layers, "v_loss_layer": n_layer - 1, "clamp_norm_factor": clamp,
                     "batch_size": args.batch_size, "P_loc": "null_space_project.pt"}
        base = weights(base_model, alpha_layers)
        ours_runs = {}
        for variant, rule, early in (("ours", "total", False), ("ours, earlier target rule", "nll", True)):
            if early and not args.earlier_rule:
                continue
            editor, secs = _ours(model_name, _alphaedit(alpha_layers, clamp, rule), requests, args.batch_size,
                                 templates, earlier_rule=early)
            ours_runs[variant] = weights(editor.model, alpha_layers)
            rows.append({**setting, "side": variant, "metrics": _score(editor.model, tok, requests, reference),
                         "seconds_per_batch": [round(s, 2) for s in secs],
                         "target_rule": "NLL < 5e-2, num_steps updates" if early else
                         "whole loss < 5e-2, num_steps - 1 updates"})
            print(f"[ours] AlphaEdit clamp {clamp} {variant}: {rows[-1]['metrics']}", flush=True)
        for variant, groups in (("EasyEdit", [templates[:1], templates[1:]]), ("EasyEdit, one context group",
                                                                                  [templates])):
            res = ee.run(f"alphaedit-c{clamp}-{'grouped' if len(groups) == 2 else 'flat'}", "AlphaEdit",
                         "hparams/AlphaEdit/gpt2-xl.yaml", overrides, ee_requests, args.batch_size, list(base), groups)
            rows.append({**setting, "side": variant, "metrics": score_easyedit(res["weights"]),
                         "seconds_per_batch": [round(s, 2) for s in res["seconds"]],
                         "target_rule": "whole loss < 5e-2, num_steps - 1 updates",
                         "key_average": "per context group, then over groups" if len(groups) == 2 else "uniform",
                         "delta_vs_ours": _delta_agreement(base, ours_runs["ours"], res["weights"])})
            print(f"[easyedit] AlphaEdit clamp {clamp} {variant}: {rows[-1]['metrics']}", flush=True)
    for step in args.ultra_step_sizes:
        setting = {"method": "UltraEdit", "modules": [f"transformer.h.{l}.mlp.c_proj" for l in ultra_layers],
                   "turn": args.batch_size, "chunk": 10, "step_size": step, "ridge": 1.0}
        base = weights(base_model, ultra_layers)
        editor, secs = _ours(model_name, _ultraedit(ultra_layers, step, 10), requests, args.batch_size)
        mine = weights(editor.model, ultra_layers)
        rows.append({**setting, "side": "ours", "features": "target-predicting tokens (authors' token: ans)",
                     "metrics": _score(editor.model, tok, requests, reference),
                     "seconds_per_batch": [round(s, 2) for s in secs]})
        print(f"[ours] UltraEdit eta {step}: {rows[-1]['metrics']}", flush=True)
        overrides = {"model_name": str(ee_folder), "tokenizer_name": str(ee_folder), "device": "cpu",
                     "inner_params": setting["modules"], "lr": step, "batch_size": args.batch_size,
                     "batch_size_once": 10, "half": False}
        res = ee.run(f"ultraedit-{step}", "ULTRAEDIT", "hparams/UltraEdit/gpt-j-6B.yaml", overrides, ee_requests,
                     args.batch_size, list(base))
        rows.append({**setting, "side": "EasyEdit", "features": "every prompt and target token (its token: mask)",
                     "metrics": score_easyedit(res["weights"]),
                     "seconds_per_batch": [round(s, 2) for s in res["seconds"]],
                     "delta_vs_ours": _delta_agreement(base, mine, res["weights"])})
        print(f"[easyedit] UltraEdit eta {step}: {rows[-1]['metrics']}", flush=True)
    return {"model": model_name, "num_edits": len(requests), "requests": [r.name for r in requests],
            "stats_commands": commands, "rows": rows}


def _wide_model(workdir: Path, n_layer: int) -> Path:
    """A random-weight GPT-2 of GPT2-XL's width (hidden 1600, MLP 6400, 25 heads), ``n_layer`` layers, seeded, with
    the testbed's tokenizer, saved as a local folder."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from eac_lightning.models.loading import resolve_model_path

    folder = workdir / "models" / EE_WIDE.format(n_layer=n_layer)
    if (folder / "model.safetensors").exists():
        return folder
    tb = Path(resolve_model_path("testbed:small"))
    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=1600, n_inner=6400, n_head=25, n_layer=n_layer, n_positions=1024, vocab_size=8192,
                     bos_token_id=0, eos_token_id=0, pad_token_id=0, activation_function="gelu_new")
    GPT2LMHeadModel(cfg).save_pretrained(folder)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tb / f, folder / f)
    cfg_tok = json.loads((folder / "tokenizer_config.json").read_text())
    cfg_tok["padding_side"] = "right"
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg_tok, indent=2))
    return folder


def cost(args, ee: EasyEdit, workdir: Path) -> dict:
    from eac_lightning.models.adapters import mlp_out_name

    folder = _wide_model(workdir, args.wide_layers)
    layers = list(range(args.wide_edit_layers))
    commands = _export_stats(str(folder), layers, workdir / "stats", folder.name, num_tokens=args.wide_stats_tokens)
    requests = _requests(args.wide_edits)
    for r in requests:  # no evaluation here: nothing of the locality reference to compute per edit
        r.neighborhood_prompts, r.neighborhood_answers, r.paraphrase_prompts = [], [], []
    setting = {"method": "AlphaEdit", "model": "random-weight GPT-2, hidden 1600, MLP 6400, 25 heads, "
               f"{args.wide_layers} layers", "layers": layers, "v_loss_layer": args.wide_layers - 1,
               "batch_size": 1, "clamp_norm_factor": 0.75, "v_num_grad_steps": 20, "nullspace_threshold": 0.02,
               "L2": 10.0, "stats_tokens": args.wide_stats_tokens, "edits": args.wide_edits,
               "timed": "edits 2.. (the first includes EasyEdit's projector computation and both sides' warm-up)"}
    editor, ours_secs = _ours(str(folder), _alphaedit(layers, 0.75, "total"), requests, 1,
                              stats_kwargs={"num_tokens": args.wide_stats_tokens})
    templates = list(editor.method.templates)
    save = [f"{mlp_out_name(editor.model, l)}.weight" for l in layers]
    del editor
    overrides = {"model_name": str(folder), "stats_dir": str(workdir / "stats"), "device": "cpu", "layers": layers,
                 "v_loss_layer": args.wide_layers - 1, "batch_size": 1, "P_loc": "null_space_project.pt"}
    res = ee.run("cost-alphaedit", "AlphaEdit", "hparams/AlphaEdit/gpt2-xl.yaml", overrides,
                 _as_easyedit(requests), 1, save, [templates[:1], templates[1:]])
    ee_secs = res["seconds"]
    med_ee, med_ours = statistics.median(ee_secs[1:]), statistics.median(ours_secs[1:])
    return {**setting, "stats_commands": commands,
            "easyedit": {"seconds_per_edit": [round(s, 2) for s in ee_secs], "median": round(med_ee, 2),
                         "what": "EasyEdit apply_algo (apply_AlphaEdit_to_model), the time its editor records"},
            "ours": {"seconds_per_edit": [round(s, 2) for s in ours_secs], "median": round(med_ours, 2),
                     "what": "Editor.edit (validation, locality reference of the batch, targets, write, edit log)"},
            "ratio_easyedit_over_ours": round(med_ee / med_ours, 2)}


def _setting(row: dict) -> str:
    if row["method"] == "AlphaEdit":
        return f"clamp {row['clamp_norm_factor']:g}, batches of {row['batch_size']}"
    return f"η {row['step_size']:g}, turns of {row['turn']}"


def quality_table(result: dict) -> str:
    """docs/reference.md's quality table: our scorer on both sides' final models, how many edits end the same
    (written or not) as ours, and how far each side's weight change is from ours."""
    rows = result["rows"]
    ours = {(r["method"], _setting(r)): r for r in rows if r["side"] == "ours"}
    lines = ["| method | setting | run | reliability | generalization | locality | edits as ours | ΔW vs ours "
             "| s/batch |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m, ref = r["metrics"], ours[(r["method"], _setting(r))]
        same = sum(a == b for a, b in zip(m["written"], ref["metrics"]["written"]))
        delta = r.get("delta_vs_ours")
        dw = "–" if delta is None else f"{max(d['rel_diff'] for d in delta.values()):.4f}"
        secs = statistics.median(r["seconds_per_batch"])
        lines.append(f"| {r['method']} | {_setting(r)} | {r['side']} | {m['reliability']:.3f} | "
                     f"{m['generalization']:.3f} | {m['locality']:.3f} | {same}/{len(m['written'])} | {dw} | "
                     f"{secs:.1f} |")
    return "\n".join(lines)


def cost_table(result: dict) -> str:
    """docs/reference.md's cost table: seconds per edit at GPT2-XL width, medians and each edit."""
    ee, ours = result["easyedit"], result["ours"]
    lines = ["| side | what is timed | s/edit (median of edits 2..) | each edit (s) |", "|---|---|---|---|"]
    for name, r in (("EasyEdit", ee), ("ours", ours)):
        lines.append(f"| {name} | {r['what']} | {r['median']:.1f} | {', '.join(f'{s:.1f}' for s in r['seconds_per_edit'])} |")
    lines.append(f"| ratio | EasyEdit / ours | {result['ratio_easyedit_over_ours']:.2f} | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--easyedit-python", help="python of the venv EasyEdit is installed in (README.md here)")
    ap.add_argument("--easyedit-src", help="EasyEdit's source tree (the folder holding easyeditor/ and hparams/)")
    ap.add_argument("--part", choices=["quality", "cost", "all"], default="all")
    ap.add_argument("--workdir", default="/tmp/easyedit_compare", help="models, statistics and EasyEdit's runs")
    ap.add_argument("--num-edits", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=10, help="AlphaEdit's batch and UltraEdit's turn")
    ap.add_argument("--clamps", type=float, nargs="+", default=[0.75, 4.0],
                    help="AlphaEdit's clamp_norm_factor (published 0.75; testbed:small's measured 4)")
    ap.add_argument("--ultra-step-sizes", type=float, nargs="+", default=[1e-3, 1e-6],
                    help="UltraEdit's η (testbed:small's measured 1e-3; published 1e-6)")
    ap.add_argument("--earlier-rule", action="store_true",
                    help="also run ours with the target loop's earlier rule (NLL < 5e-2, num_steps updates)")
    ap.add_argument("--wide-layers", type=int, default=6)
    ap.add_argument("--wide-edit-layers", type=int, default=3)
    ap.add_argument("--wide-edits", type=int, default=4)
    ap.add_argument("--wide-stats-tokens", type=int, default=20_000)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args.worker)
    if not (args.easyedit_python and args.easyedit_src):
        ap.error("--easyedit-python and --easyedit-src are required (benchmarks/reference/README.md sets them up)")
    if not (Path(args.easyedit_src) / "easyeditor").is_dir():
        ap.error(f"--easyedit-src {args.easyedit_src} holds no easyeditor/ folder")
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))  # this checkout's package, whether or not it is the installed one
    import torch

    torch.manual_seed(0)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ee = EasyEdit(args.easyedit_python, args.easyedit_src, workdir)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    meta = {"command": "OMP_NUM_THREADS=1 python benchmarks/reference/easyedit_compare.py " + " ".join(
        a for a in (argv if argv is not None else sys.argv[1:])), "easyedit_commit": ee.commit,
        "easyedit_versions": ee.versions, "ours_commit": head.stdout.strip(), "torch": str(torch.__version__),
        "threads": os.environ.get("OMP_NUM_THREADS"), "date": time.strftime("%Y-%m-%d")}
    for part, run in (("quality", quality), ("cost", cost)):
        if args.part in (part, "all"):
            results[part] = {**run(args, ee, workdir), "meta": meta}
            results.setdefault("commands", {})[part] = meta["command"]  # what benchmarks/tables.py names
            out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
