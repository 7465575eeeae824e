"""Tracing: capture module inputs/outputs and modify outputs at chosen token positions.

Every context manager removes its hooks on exit, exceptions included, so a failed optimisation leaves no
hook behind.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
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


def _enclosing_layer(model: nn.Module, name: str) -> str | None:
    """The decoder layer that contains module ``name`` (None if it is a layer itself or outside the layers)."""
    from eac_lightning.models.adapters import get_spec

    prefix = get_spec(model).layers + "."
    if not name.startswith(prefix):
        return None
    index, _, rest = name[len(prefix):].partition(".")
    return prefix + index if rest else None


@contextmanager
def _token_layout(model: nn.Module, name: str) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
    """A function that gives a tensor seen at module ``name`` the (batch, seq, d) layout of its decoder layer's
    input. OPT's layer flattens (batch, seq) into one axis around fc1/fc2; every other family passes through."""
    layer = _enclosing_layer(model, name)
    shape: list[torch.Size] = []

    def record(mod, args, kwargs):
        x = args[0] if args else kwargs.get("hidden_states")
        shape[:] = [x.shape[:-1]]

    handle = model.get_submodule(layer).register_forward_pre_hook(record, with_kwargs=True) if layer else None

    def unflatten(x: torch.Tensor) -> torch.Tensor:
        if shape and x.dim() == 2 and len(shape[0]) == 2:
            return x.reshape(*shape[0], x.shape[-1])
        return x

    try:
        yield unflatten
    finally:
        if handle is not None:
            handle.remove()


@contextmanager
def capture(model: nn.Module, names: Sequence[str], detach: bool = True) -> Iterator[dict[str, Capture]]:
    """Record the input and output of each named module during forward passes inside the block, in
    (batch, seq, d) layout. They are copies: Falcon adds the attention output into its MLP output in place."""
    records = {n: Capture() for n in names}
    handles = []
    with ExitStack() as stack:
        for n in names:
            module = model.get_submodule(n)
            layout = stack.enter_context(_token_layout(model, n))

            def pre_hook(mod, args, kwargs, rec=records[n], layout=layout):
                x = layout(args[0] if args else kwargs.get("hidden_states"))
                rec.input = (x.detach() if detach else x).clone()

            def hook(mod, args, output, rec=records[n], layout=layout):
                out = layout(first_tensor(output))
                rec.output = (out.detach() if detach else out).clone()

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
    """Replace the (first tensor of the) output of module ``name`` by ``fn(output)`` (``fn`` sees the
    (batch, seq, d) layout)."""
    with _token_layout(model, name) as layout:

        def hook(mod, args, output):
            out = first_tensor(output)
            return _replace_first(output, fn(layout(out)).reshape(out.shape))

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
        r, c = rows.to(out.device), cols.to(out.device)
        out[r, c] = out[r, c] + delta.to(out)
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
        coef = args[0] @ direction.to(args[0])
        added = coef[..., None] * delta.to(out) if direction.dim() == 1 else coef @ delta.to(out)
        return _replace_first(output, out + added)

    with _forward_hook(model, name, hook):
        yield


@contextmanager
def at_positions(model: nn.Module, rows: torch.Tensor, cols: torch.Tensor) -> Iterator[None]:
    """Compute the model's logits only at token positions ``(rows[i], cols[i])``: they come back as (1, P, vocab).

    The target optimisations read a few positions per prompt (the target's and the essence prompt's); the output
    projection over every position is a large share of a step, the larger the vocabulary (LLaMA-3: 128k). A
    pre-hook on the output embeddings hands them only those positions' final hidden states, so whatever the model
    does after the projection (Gemma's soft-capping) still applies.
    """

    def gather(mod, args):
        hidden = args[0]
        return (hidden[rows.to(hidden.device), cols.to(hidden.device)][None], *args[1:])

    handle = model.get_output_embeddings().register_forward_pre_hook(gather)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def _kept_layers(model: nn.Module, start: int, stop: int | None = None) -> Iterator[nn.ModuleList]:
    """Temporarily truncate the model's decoder layer list to ``[start:stop]``; yields the full list."""
    from eac_lightning.models.adapters import get_spec

    parent_name, _, attr = get_spec(model).layers.rpartition(".")
    parent = model.get_submodule(parent_name)
    full = getattr(parent, attr)
    kept = list(full)[start:stop]
    if len(kept) < len(full):
        setattr(parent, attr, nn.ModuleList(kept))
    try:
        yield full
    finally:
        setattr(parent, attr, full)


@contextmanager
def through_layer(model: nn.Module, layer: int) -> Iterator[None]:
    """Run forwards inside the block only up to decoder layer ``layer`` (and the output projection at one
    position): for reading keys or residuals at ``layer``, the layers above and the vocabulary projection over
    every position are wasted work (MEMIT reads them at every critical layer of every batch)."""
    from eac_lightning.progress import phase

    one = torch.zeros(1, dtype=torch.long)
    with phase("keys"), _kept_layers(model, 0, layer + 1), at_positions(model, one, one):  # a run's "keys" time
        yield


@contextmanager
def layers_from(model: nn.Module, start: int) -> Iterator[Callable[..., torch.Tensor]]:
    """Run the model from decoder layer ``start`` on, given that layer's cached input hidden states.

    Target optimisations (ROME's v*, MEMIT's z) change nothing below the edited layer, so its input is computed
    once per edit and each optimisation step runs only layers ``start..L-1``. Inside the block the model's layer
    list is temporarily truncated; the yielded function maps ``(hidden, attention_mask)`` to logits. The model
    runs on placeholder token ids (what the embeddings make of them is discarded) and a pre-hook hands the
    first kept layer exactly ``hidden``, so masks, positions and rotary embeddings are the model's own for every
    family, whatever its embeddings add (GPT-2's and OPT's learned positions, Gemma's scaling).
    """
    given: list[torch.Tensor] = []

    def feed(mod, args, kwargs):
        if args:
            return (given[0], *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": given[0]}

    def run(hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        given[:] = [hidden]
        ids = torch.zeros(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        return model(input_ids=ids, attention_mask=attention_mask, use_cache=False).logits

    with _kept_layers(model, start) as full:
        handle = full[start].register_forward_pre_hook(feed, with_kwargs=True)
        try:
            yield run
        finally:
            handle.remove()
