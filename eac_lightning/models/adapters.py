"""Architecture adapters: where each model family keeps the modules that locate-then-edit methods touch.

One declarative :class:`ArchSpec` per family names the MLP output projection (whose input is the "key" k and
whose output is the "value" v of ROME's key-value view), each layer's residual output, the embeddings, the final
norm and the LM head. GPT-2's ``Conv1D`` stores its weight as (in, out); :func:`weight_view` is the one place that
turns every edited weight into the (out, in) layout the methods compute in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class UnsupportedArchitectureError(ValueError):
    """The model's ``config.model_type`` has no entry in :data:`ARCHITECTURES`."""


@dataclass(frozen=True)
class ArchSpec:
    """Module-name templates of one architecture family (``{}`` is the layer index).

    Args:
        layers: the ModuleList of decoder blocks.
        mlp_out: the MLP output projection edited by ROME/MEMIT/AlphaEdit (input = key, output = value).
        mlp: the whole MLP block.
        attn: the attention block.
        embed: token embeddings.
        final_norm: the norm before the LM head.
        lm_head: the output projection to the vocabulary.
        position_embed: learned absolute position embeddings added to ``inputs_embeds`` (GPT-2 only).
        conv1d: the weights are ``transformers.Conv1D`` stored as (in, out).
    """

    layers: str
    mlp_out: str
    mlp: str
    attn: str
    embed: str
    final_norm: str
    lm_head: str
    position_embed: str | None = None
    conv1d: bool = False

    def layer(self, i: int) -> str:
        return f"{self.layers}.{i}"


ARCHITECTURES: dict[str, ArchSpec] = {
    "gpt2": ArchSpec(
        layers="transformer.h", mlp_out="transformer.h.{}.mlp.c_proj", mlp="transformer.h.{}.mlp",
        attn="transformer.h.{}.attn", embed="transformer.wte", final_norm="transformer.ln_f", lm_head="lm_head",
        position_embed="transformer.wpe", conv1d=True,
    ),
    "gptj": ArchSpec(
        layers="transformer.h", mlp_out="transformer.h.{}.mlp.fc_out", mlp="transformer.h.{}.mlp",
        attn="transformer.h.{}.attn", embed="transformer.wte", final_norm="transformer.ln_f", lm_head="lm_head",
    ),
    "gpt_neox": ArchSpec(
        layers="gpt_neox.layers", mlp_out="gpt_neox.layers.{}.mlp.dense_4h_to_h", mlp="gpt_neox.layers.{}.mlp",
        attn="gpt_neox.layers.{}.attention", embed="gpt_neox.embed_in", final_norm="gpt_neox.final_layer_norm",
        lm_head="lm_head",  # transformers >= 5 (4.x: "embed_out")
    ),
}
_LLAMA_LIKE = ArchSpec(
    layers="model.layers", mlp_out="model.layers.{}.mlp.down_proj", mlp="model.layers.{}.mlp",
    attn="model.layers.{}.self_attn", embed="model.embed_tokens", final_norm="model.norm", lm_head="lm_head",
)
ARCHITECTURES.update(llama=_LLAMA_LIKE, mistral=_LLAMA_LIKE, qwen2=_LLAMA_LIKE)


def get_spec(model: nn.Module) -> ArchSpec:
    """The :class:`ArchSpec` of ``model`` by its ``config.model_type``."""
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"architecture '{model_type}' is not supported (known: {', '.join(sorted(ARCHITECTURES))}). "
            "Add an ArchSpec entry to eac_lightning.models.adapters.ARCHITECTURES naming its decoder layers, "
            "MLP output projection, attention, embeddings, final norm and LM head."
        ) from None


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
