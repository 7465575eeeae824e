"""Loading a model and tokenizer by name: a registered source such as ``testbed:<preset>`` (the offline testbed,
registered by :mod:`eac_lightning.testbed`), a local folder in Hugging Face format, or a hub id (when a hub is
reachable)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from eac_lightning.models.adapters import ArchSpec, get_spec, register_adapter

#: ``prefix -> resolver``: a resolver turns ``prefix:name`` into a local model folder (see
#: :func:`register_model_source`; the offline testbed registers ``testbed:``).
MODEL_SOURCES: dict[str, Callable[[str], str | os.PathLike]] = {}


def register_model_source(prefix: str, resolver: Callable[[str], str | os.PathLike]) -> None:
    """Let ``load_model("<prefix>:<name>")`` load the folder ``resolver(name)`` returns (it may build it)."""
    MODEL_SOURCES[prefix] = resolver


def resolve_model_path(name: str) -> str:
    """``<prefix>:<name>`` of a registered source -> its local folder; anything else (a folder, a hub id)
    unchanged."""
    prefix, sep, rest = name.partition(":")
    if sep and prefix in MODEL_SOURCES:
        return str(MODEL_SOURCES[prefix](rest))
    return name


def load_model(name: str, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu",
               adapter: ArchSpec | dict | str | Path | None = None, device_map: str | dict | None = None,
               offload_folder: str | Path | None = None) -> tuple[nn.Module, object]:
    """(model in eval mode, tokenizer) for ``name``, its weights in ``dtype`` on ``device``.

    The architecture must have an adapter entry, or ``adapter`` declares one (module-name templates as a dict or
    a YAML/JSON file, :func:`eac_lightning.models.adapters.register_adapter`). ``device_map`` (``"auto"`` or
    {module: device | "cpu" | "disk"}) loads a model larger than one device through accelerate's big-model
    dispatch instead of onto ``device``, with disk-offloaded weights in ``offload_folder``
    (docs/multi_device.md): the edited layers and the embeddings must stay resident (a GPU or the CPU).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name)
    if device_map is None:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype)).to(device)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype), device_map=device_map,
                                                     offload_folder=offload_folder)
    model.eval()
    fuse_activations(model)
    if adapter is not None:
        register_adapter(model, adapter)
    get_spec(model)  # fail early, naming the architecture, if it cannot be edited
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # batched generation pads on the left; edit batches pad explicitly
    return model, tok


def fuse_activations(model: nn.Module) -> nn.Module:
    """Replace GPT-2's ``gelu_new`` modules by torch's fused tanh GELU (transformers' ``gelu_pytorch_tanh``): the
    same function to float rounding, but ``gelu_new`` is written as five tensor operations and costs about five
    times as much, forward and backward, a large share of each target-optimisation step on the CPU
    (docs/benchmarks.md, "Edit speed"). The config is left as it is, so a saved model is unchanged."""
    from transformers.activations import ACT2FN, NewGELUActivation

    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is NewGELUActivation:
                setattr(parent, name, ACT2FN["gelu_pytorch_tanh"])
    return model


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"bfloat16"`` → ``torch.bfloat16``; a floating dtype unchanged; anything else a clear error."""
    resolved = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"dtype {dtype!r} is not a floating-point torch dtype (float32, bfloat16, float16, float64)")
    return resolved


@dataclass(frozen=True)
class DefaultLayers:
    """The layers a method edits when its config names none."""

    rome: int
    memit: tuple[int, ...]
    source: str


# Published edit layers (ROME: Meng et al. 2022; MEMIT: Meng et al. 2023; LLaMA-3-8B: AlphaEdit/EasyEdit hparams).
PUBLISHED_LAYERS: dict[str, DefaultLayers] = {
    "gpt2-xl": DefaultLayers(17, (13, 14, 15, 16, 17), "ROME/MEMIT hparams/gpt2-xl.json"),
    "gpt-j-6b": DefaultLayers(5, (3, 4, 5, 6, 7, 8), "ROME/MEMIT hparams/EleutherAI_gpt-j-6B.json"),
    "meta-llama-3-8b": DefaultLayers(5, (4, 5, 6, 7, 8), "AlphaEdit hparams/Llama3-8B.json"),
    "meta-llama-3-8b-instruct": DefaultLayers(5, (4, 5, 6, 7, 8), "AlphaEdit hparams/Llama3-8B.json"),
}


#: A model folder's editing defaults, written beside the weights by whatever trained the model:
#: ``{"edit_layer": int, "memit_layers": [int, ...], "stats_corpus": "<file in the folder>"}``, every key optional.
EDITING_DEFAULTS = "editing.json"


def _model_folder(model: nn.Module) -> Path:
    return Path(str(getattr(model.config, "_name_or_path", "") or ""))


def editing_defaults(folder: str | Path) -> dict:
    """The contents of ``folder``'s :data:`EDITING_DEFAULTS` file, or ``{}`` when there is none."""
    path = Path(folder) / EDITING_DEFAULTS
    if not path.exists():
        return {}
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(info, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(info).__name__}")
    return info


def write_editing_defaults(folder: str | Path, edit_layer: int, memit_layers: Sequence[int],
                           stats_corpus: str | None = None) -> None:
    """Write ``folder``'s :data:`EDITING_DEFAULTS` file (atomically, only when its contents change)."""
    info = {"edit_layer": int(edit_layer), "memit_layers": [int(x) for x in memit_layers]}
    if stats_corpus:
        info["stats_corpus"] = stats_corpus
    path = Path(folder) / EDITING_DEFAULTS
    if path.exists() and editing_defaults(folder) == info:
        return
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def default_stats_corpus(model: nn.Module, fallback: str) -> str:
    """The corpus of the key statistics C for ``model``: the file its folder's editing defaults name (ROME/MEMIT
    take C over the model's pre-training text, so a model trained here ships a sample of its training stream), else
    ``fallback`` (WikiText)."""
    folder = _model_folder(model)
    name = editing_defaults(folder).get("stats_corpus")
    if name and (folder / name).exists():
        return str(folder / name)
    return fallback


def default_layers(model: nn.Module) -> DefaultLayers:
    """Edit layers for ``model``: its folder's editing defaults (e.g. chosen by causal tracing), the published
    layers of a known model, else ROME's rule of thumb (an early-middle layer: a quarter of the depth)."""
    folder = _model_folder(model)
    info = editing_defaults(folder)
    if "edit_layer" in info:
        memit = info.get("memit_layers", [info["edit_layer"]])
        return DefaultLayers(int(info["edit_layer"]), tuple(int(x) for x in memit), str(folder / EDITING_DEFAULTS))
    key = folder.name.lower()
    if key in PUBLISHED_LAYERS:
        return PUBLISHED_LAYERS[key]
    n = len(model.get_submodule(get_spec(model).layers))
    mid = max(0, n // 4)
    return DefaultLayers(mid, tuple(range(max(0, mid - 2), mid + 1)), f"rule of thumb for a {n}-layer model")
