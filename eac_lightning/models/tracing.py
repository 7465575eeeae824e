"""Tracing: capture module inputs/outputs and modify outputs at chosen token positions.

Every context manager removes its hooks on exit, exceptions included, so a failed optimisation leaves no
hook behind.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import nn


@dataclass
class Capture:
    """What a hooked module saw in the last forward pass (first positional input, and output)."""

    input: torch.Tensor | None = None
    output: torch.Tensor | None = None


def first_tensor(output):
    """Decoder blocks return a tensor or a tuple whose first element is the hidden state."""
    return output[0] if isinstance(output, tuple) else output


def _replace_first(output, tensor):
    return (tensor, *output[1:]) if isinstance(output, tuple) else tensor


@contextmanager
def capture(model: nn.Module, names: Sequence[str], detach: bool = True) -> Iterator[dict[str, Capture]]:
    """Record the input and output of each named module during forward passes inside the block."""
    records = {n: Capture() for n in names}
    handles = []
    for n in names:
        module = model.get_submodule(n)

        def pre_hook(mod, args, kwargs, rec=records[n]):
            x = args[0] if args else kwargs.get("hidden_states")
            rec.input = x.detach() if detach else x

        def hook(mod, args, output, rec=records[n]):
            out = first_tensor(output)
            rec.output = out.detach() if detach else out

        handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
        handles.append(module.register_forward_hook(hook))
    try:
        yield records
    finally:
        for h in handles:
            h.remove()


@contextmanager
def _forward_hook(model: nn.Module, name: str, hook: Callable) -> Iterator[None]:
    """``hook(module, args, output)`` on module ``name`` for the duration of the block."""
    handle = model.get_submodule(name).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def edit_output(model: nn.Module, name: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace the (first tensor of the) output of module ``name`` by ``fn(output)``."""

    def hook(mod, args, output):
        return _replace_first(output, fn(first_tensor(output)))

    with _forward_hook(model, name, hook):
        yield


@contextmanager
def add_at_positions(
    model: nn.Module, name: str, delta: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
) -> Iterator[None]:
    """Add ``delta`` to the output of ``name`` at token positions ``(rows[i], cols[i])``.

    ``delta`` is one vector (d,) added at every position, or (n, d) with one row per position. Used to insert
    ROME's v* at the MLP output and MEMIT's z at the residual stream of the last subject token.
    """

    def add(out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        out[rows, cols] = out[rows, cols] + delta.to(out.dtype)
        return out

    with edit_output(model, name, add):
        yield


@contextmanager
def add_along_keys(model: nn.Module, name: str, direction: torch.Tensor, delta: torch.Tensor) -> Iterator[None]:
    """Add (uᵀk_t)·δ to the output of the linear map ``name`` at every token t, k_t its input there: what the
    weight change ΔW = δuᵀ does to that map. With ``direction`` U (d_k, n) and ``delta`` Δ (n, d) it adds
    Δᵀ(Uᵀk_t), the effect of ΔW = ΔᵀUᵀ. Used to optimise targets under the update that will write them."""

    def hook(mod, args, output):
        out = first_tensor(output)
        coef = args[0] @ direction.to(args[0].dtype)
        added = coef[..., None] * delta.to(out.dtype) if direction.dim() == 1 else coef @ delta.to(out.dtype)
        return _replace_first(output, out + added)

    with _forward_hook(model, name, hook):
        yield


@contextmanager
def layers_from(model: nn.Module, start: int) -> Iterator[Callable[..., torch.Tensor]]:
    """Run the model from decoder layer ``start`` on, given that layer's cached input hidden states.

    Target optimisations (ROME's v*, MEMIT's z) change nothing below the edited layer, so its input is computed
    once per edit and each optimisation step runs only layers ``start..L-1``. Inside the block the model's layer
    list is temporarily truncated; the yielded function maps ``(hidden, attention_mask)`` to logits. Absolute
    position embeddings (GPT-2), which the model adds to ``inputs_embeds``, are subtracted first so that the
    first kept layer sees exactly ``hidden``.
    """
    from eac_lightning.models.adapters import get_spec

    spec = get_spec(model)
    parent_name, _, attr = spec.layers.rpartition(".")
    parent = model.get_submodule(parent_name)
    full = getattr(parent, attr)

    def run(hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        embeds = hidden
        if spec.position_embed is not None:
            pos = torch.arange(hidden.shape[1], device=hidden.device)
            embeds = hidden - model.get_submodule(spec.position_embed)(pos)[None].to(hidden.dtype)
        return model(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False).logits

    if start == 0:
        # Nothing to skip: the token path is the exact one.
        yield run
        return
    setattr(parent, attr, nn.ModuleList(list(full)[start:]))
    try:
        yield run
    finally:
        setattr(parent, attr, full)
