"""Loading a model and tokenizer by name: ``testbed:<preset>`` (built offline on first use), a local folder in
Hugging Face format, or a hub id (when a hub is reachable)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from eac_lightning.models.adapters import ArchSpec, get_spec, register_adapter

TESTBED_PREFIX = "testbed:"


def resolve_model_path(name: str) -> str:
    """``testbed:tiny`` → the cached testbed folder (built if missing); anything else unchanged."""
    if name.startswith(TESTBED_PREFIX):
        from eac_lightning.testbed.build import ensure_testbed

        return str(ensure_testbed(name[len(TESTBED_PREFIX):]))
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
    if adapter is not None:
        register_adapter(model, adapter)
    get_spec(model)  # fail early, naming the architecture, if it cannot be edited
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # batched generation pads on the left; edit batches pad explicitly
    return model, tok


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


def default_stats_corpus(model: nn.Module, fallback: str) -> str:
    """The corpus of the key statistics C for ``model``: a testbed's own training-stream sample (``testbed.json``
    names it; ROME/MEMIT take C over the model's pre-training text), else ``fallback`` (WikiText)."""
    meta = Path(str(getattr(model.config, "_name_or_path", "") or "")) / "testbed.json"
    if meta.exists():
        name = json.loads(meta.read_text()).get("stats_corpus")
        if name and (meta.parent / name).exists():
            return str(meta.parent / name)
    return fallback


def default_layers(model: nn.Module) -> DefaultLayers:
    """Edit layers for ``model``: a testbed's ``testbed.json`` (chosen by causal tracing), the published layers
    of a known model, else ROME's rule of thumb (an early-middle layer: a quarter of the depth)."""
    path = Path(str(getattr(model.config, "_name_or_path", "") or ""))
    meta = path / "testbed.json"
    if meta.exists():
        info = json.loads(meta.read_text())
        return DefaultLayers(int(info["edit_layer"]), tuple(info["memit_layers"]), str(meta))
    key = path.name.lower()
    if key in PUBLISHED_LAYERS:
        return PUBLISHED_LAYERS[key]
    n = len(model.get_submodule(get_spec(model).layers))
    mid = max(0, n // 4)
    return DefaultLayers(mid, tuple(range(max(0, mid - 2), mid + 1)), f"rule of thumb for a {n}-layer model")
