"""Architecture adapters: where each model family keeps the modules that locate-then-edit methods touch.

One declarative :class:`ArchSpec` per family names the MLP output projection (whose input is the "key" k and
whose output is the "value" v of ROME's key-value view), the decoder layers, the MLP and attention blocks (causal
tracing), the embeddings, the final norm and the LM head. GPT-2's ``Conv1D`` stores its weight as (in, out);
:func:`weight_view` is the one place that turns every edited weight into the (out, in) layout the methods compute in.

A dense family without an entry is added as data: :func:`register_adapter` takes the module-name templates as a
dict or a YAML/JSON file (``load_model(..., adapter=...)``, ``--model.adapter``), so no code is needed.
Mixture-of-experts MLPs are refused (:func:`get_spec`): the methods edit one dense output projection per layer.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn


class UnsupportedArchitectureError(ValueError):
    """The model's ``config.model_type`` has no entry in :data:`ARCHITECTURES`, or it cannot be edited."""


@dataclass(frozen=True)
class ArchSpec:
    """Module-name templates of one architecture family (``{}`` is the layer index).

    Args:
        layers: the ModuleList of decoder blocks.
        mlp_out: the MLP output projection edited by ROME/MEMIT/AlphaEdit (input = key, output = value).
        mlp: the whole MLP block (OPT has none: its output projection, whose output is the block's, stands in).
        attn: the attention block.
        embed: token embeddings.
        final_norm: the norm before the LM head.
        lm_head: the output projection to the vocabulary.
        conv1d: the weights are ``transformers.Conv1D`` stored as (in, out).
    """

    layers: str
    mlp_out: str
    mlp: str
    attn: str
    embed: str
    final_norm: str
    lm_head: str = "lm_head"
    conv1d: bool = False

    def layer(self, i: int) -> str:
        return f"{self.layers}.{i}"


def _llama_like(prefix: str = "model") -> ArchSpec:
    return ArchSpec(
        layers=f"{prefix}.layers", mlp_out=f"{prefix}.layers.{{}}.mlp.down_proj", mlp=f"{prefix}.layers.{{}}.mlp",
        attn=f"{prefix}.layers.{{}}.self_attn", embed=f"{prefix}.embed_tokens", final_norm=f"{prefix}.norm",
    )


ARCHITECTURES: dict[str, ArchSpec] = {
    "gpt2": ArchSpec(
        layers="transformer.h", mlp_out="transformer.h.{}.mlp.c_proj", mlp="transformer.h.{}.mlp",
        attn="transformer.h.{}.attn", embed="transformer.wte", final_norm="transformer.ln_f", conv1d=True,
    ),
    "gptj": ArchSpec(
        layers="transformer.h", mlp_out="transformer.h.{}.mlp.fc_out", mlp="transformer.h.{}.mlp",
        attn="transformer.h.{}.attn", embed="transformer.wte", final_norm="transformer.ln_f",
    ),
    "gpt_neox": ArchSpec(
        layers="gpt_neox.layers", mlp_out="gpt_neox.layers.{}.mlp.dense_4h_to_h", mlp="gpt_neox.layers.{}.mlp",
        attn="gpt_neox.layers.{}.attention", embed="gpt_neox.embed_in", final_norm="gpt_neox.final_layer_norm",
        lm_head="lm_head",  # transformers >= 5 (4.x: "embed_out")
    ),
    "falcon": ArchSpec(
        layers="transformer.h", mlp_out="transformer.h.{}.mlp.dense_4h_to_h", mlp="transformer.h.{}.mlp",
        attn="transformer.h.{}.self_attention", embed="transformer.word_embeddings", final_norm="transformer.ln_f",
    ),
    # OPT's fc1/fc2 sit directly on the decoder layer, which flattens (batch, seq) into one axis around them;
    # the tracing hooks restore the token layout (eac_lightning.models.tracing).
    "opt": ArchSpec(
        layers="model.decoder.layers", mlp_out="model.decoder.layers.{}.fc2", mlp="model.decoder.layers.{}.fc2",
        attn="model.decoder.layers.{}.self_attn", embed="model.decoder.embed_tokens",
        final_norm="model.decoder.final_layer_norm",
    ),
}
# Gated MLPs (down_proj's input is act(gate)·up; Phi-3 fuses gate and up into one gate_up_proj, which is upstream
# of the key and so changes nothing here).
for _family in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3"):
    ARCHITECTURES[_family] = _llama_like()

# Config attributes that give a mixture-of-experts MLP its expert count, across transformers' families.
_EXPERT_COUNT_ATTRS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def _expert_count(config: Any) -> int:
    for attr in _EXPERT_COUNT_ATTRS:
        n = getattr(config, attr, None)
        if isinstance(n, int) and n > 1:
            return n
    return 0


def _refuse_mixture_of_experts(model_type: str, experts: int) -> None:
    raise UnsupportedArchitectureError(
        f"architecture '{model_type}' has mixture-of-experts MLPs ({experts} experts behind a router), which are "
        "not supported: ROME, MEMIT, AlphaEdit, FT and EAC write a closed-form update into one dense MLP output "
        "projection per layer (the key-value memory of ROME Eq. 2), and a routed layer has no single such "
        "matrix (which expert a key reaches depends on the router). Edit a dense model."
    )


def get_spec(model: nn.Module) -> ArchSpec:
    """The :class:`ArchSpec` of ``model`` by its ``config.model_type``."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", type(model).__name__)
    experts = _expert_count(config)
    if experts:
        _refuse_mixture_of_experts(model_type, experts)
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"architecture '{model_type}' is not supported (known: {', '.join(sorted(ARCHITECTURES))}). "
            "Declare its module names as an adapter: load_model(..., adapter={...}) or --model.adapter with the "
            f"fields {', '.join(f.name for f in fields(ArchSpec))} ('{{}}' stands for the layer index; see "
            "docs/models.md), or add an ArchSpec entry to eac_lightning.models.adapters.ARCHITECTURES."
        ) from None


def arch_spec_from(adapter: ArchSpec | dict | str | Path) -> tuple[ArchSpec, str | None]:
    """(spec, model_type it names or None) from a spec, a dict of :class:`ArchSpec` fields (plus an optional
    ``model_type``), or a YAML/JSON file holding one."""
    if isinstance(adapter, ArchSpec):
        return adapter, None
    if isinstance(adapter, (str, Path)):
        import yaml  # YAML is a superset of JSON: one reader for both

        path = Path(adapter)
        if not path.exists():
            raise FileNotFoundError(f"adapter file {path} does not exist")
        data = yaml.safe_load(path.read_text())
        where = str(path)
    else:
        data, where = adapter, "the adapter"
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a mapping of ArchSpec fields, got {type(data).__name__}")
    data = dict(data)
    model_type = data.pop("model_type", None)
    known = {f.name for f in fields(ArchSpec)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown} (known: {sorted(known)} and model_type)")
    missing = sorted(f.name for f in fields(ArchSpec) if f.name not in data and f.default is MISSING)
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}")
    return ArchSpec(**data), model_type


def validate_spec(model: nn.Module, spec: ArchSpec) -> None:
    """Check that every template of ``spec`` names a module of ``model`` and that the edited projection is one
    dense matrix, naming the field that does not fit."""
    layers = model.get_submodule(spec.layers) if _has(model, spec.layers) else None
    if not isinstance(layers, nn.ModuleList):
        raise UnsupportedArchitectureError(f"adapter field layers={spec.layers!r} is not a ModuleList of {type(model).__name__}")
    for field_name in ("mlp_out", "mlp", "attn", "embed", "final_norm", "lm_head"):
        name = getattr(spec, field_name).format(0)
        if not _has(model, name):
            raise UnsupportedArchitectureError(
                f"adapter field {field_name}={getattr(spec, field_name)!r}: {type(model).__name__} has no module {name!r}"
            )
    out = model.get_submodule(spec.mlp_out.format(0))
    weight = getattr(out, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise UnsupportedArchitectureError(
            f"adapter field mlp_out={spec.mlp_out!r} names a {type(out).__name__}, not a module with one 2-D weight "
            "(a mixture-of-experts block?): the methods edit a single dense output projection"
        )


def _has(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def register_adapter(model: nn.Module, adapter: ArchSpec | dict | str | Path) -> ArchSpec:
    """Declare ``model``'s family from data (see :func:`arch_spec_from`), check it against the model and enter it
    in :data:`ARCHITECTURES` under the adapter's ``model_type`` (default: the model's)."""
    spec, model_type = arch_spec_from(adapter)
    model_type = model_type or model.config.model_type
    experts = _expert_count(model.config)
    if experts:
        _refuse_mixture_of_experts(model_type, experts)
    validate_spec(model, spec)
    ARCHITECTURES[model_type] = spec
    return spec


def num_layers(model: nn.Module) -> int:
    return len(model.get_submodule(get_spec(model).layers))


def mlp_out_name(model: nn.Module, layer: int) -> str:
    return get_spec(model).mlp_out.format(layer)


def weight_view(model: nn.Module, module_name: str) -> torch.Tensor:
    """The module's weight in (out, in) layout (a view: writing to it writes the weight)."""
    w = model.get_submodule(module_name).weight
    return w.T if get_spec(model).conv1d else w


def key_dim(model: nn.Module, module_name: str) -> int:
    return weight_view(model, module_name).shape[1]
