"""FT: constrained fine-tuning of chosen MLP output projections (Zhu et al., 2020; ROME's FT-L baseline), and
FT with EAC's scored elastic net (EAC App. E).

The weight change Δ (flattened over the fine-tuned modules) minimises the target NLL of the batch with
teacher forcing, and after every step is clamped element-wise to |Δ| ≤ ``norm_constraint`` (FT-L's L∞ bound).
With ``eac`` set, the same two-phase optimisation as for ROME's v* runs on Δ: phase 1 scores the weights by
W ⊙ ∇L, phase 2 adds λ Σ α|Δ| + μ‖Δ‖² (α = 1/(|score| + ε)); the preset ``ft-en`` uses every weight
(``anchors: none``), the elastic-net variant of App. E.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from eac_lightning.data.requests import EditRequest
from eac_lightning.methods.base import Deltas, EditMethod, Written, apply_deltas
from eac_lightning.methods.eac import EACHyperParams, compress
from eac_lightning.methods.target import EditOptimisationError
from eac_lightning.models.adapters import get_spec, mlp_out_name, weight_view
from eac_lightning.models.encoding import encode_right_padded, encode_target
from eac_lightning.models.loading import default_layers
from eac_lightning.models.tracing import capture, layers_from
from eac_lightning.validation import check


@dataclass
class FTHyperParams:
    """Optimisation of FT (ROME's FT-L hyper-parameters for GPT2-XL).

    Args:
        num_steps: gradient steps per edit batch (25).
        lr: Adam learning rate (5e-4).
        norm_constraint: L∞ bound on each weight's change (5e-4).
        early_stop: stop once the mean target NLL falls below this.
    """

    num_steps: int = 25
    lr: float = 5e-4
    norm_constraint: float = 5e-4
    early_stop: float = 1e-2

    def __post_init__(self) -> None:
        check("num_steps", self.num_steps, integer=True, positive=True)
        check("lr", self.lr, positive=True)
        check("norm_constraint", self.norm_constraint, positive=True, finite=False)  # inf: unconstrained (LLaMA)
        check("early_stop", self.early_stop, nonnegative=True)


@dataclass
class FTTarget:
    """The optimised weight change of one batch (FT's target is the change itself)."""

    deltas: Deltas
    num_requests: int


class FTProblem:
    """Teacher-forced target NLL as a function of the flattened weight change of the fine-tuned modules."""

    last_update = True  # ROME's FT loop updates after every forward (num_steps updates)

    def __init__(self, model: nn.Module, tok, requests: Sequence[EditRequest], layers: list[int], hp: FTHyperParams):
        self.model, self.hparams, self.requests = model, hp, list(requests)
        self.layers = sorted(layers)
        self.names = [mlp_out_name(model, l) for l in self.layers]
        weights = [weight_view(model, n) for n in self.names]
        self.shapes = [w.shape for w in weights]
        self.v0 = torch.cat([w.detach().reshape(-1) for w in weights]).float()
        device = self.v0.device
        texts, self.pred_rows, self.pred_cols, targets = [], [], [], []
        for i, r in enumerate(self.requests):
            t = encode_target(tok, r.target_new)
            texts.append(r.prompt_text + tok.decode(t[:-1]) if len(t) > 1 else r.prompt_text)
            n_prompt = len(tok(texts[-1], add_special_tokens=False)["input_ids"]) - (len(t) - 1)
            self.pred_rows += [i] * len(t)
            self.pred_cols += list(range(n_prompt - 1, n_prompt - 1 + len(t)))
            targets += t
        self.input_ids, self.mask = encode_right_padded(tok, texts, device)
        self.pred_rows = torch.tensor(self.pred_rows, device=device)
        self.pred_cols = torch.tensor(self.pred_cols, device=device)
        self.targets = torch.tensor(targets, device=device)
        start = get_spec(model).layer(self.layers[0])
        with torch.no_grad(), capture(model, [start]) as rec:
            model(input_ids=self.input_ids, attention_mask=self.mask, use_cache=False)
        self.hidden_in = rec[start].input  # nothing below the first fine-tuned layer changes

    def split(self, delta: torch.Tensor) -> list[torch.Tensor]:
        out, i = [], 0
        for s in self.shapes:
            n = s.numel()
            out.append(delta[i : i + n].reshape(s))
            i += n
        return out

    def loss(self, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        parts = self.split(delta)
        hooks = []
        for name, d in zip(self.names, parts):
            module = self.model.get_submodule(name)
            # The module's output changes by Δ·x for input x: added through a hook so W itself is untouched.
            hooks.append(_AddLinear(module, d))
        try:
            with layers_from(self.model, self.layers[0]) as run:
                logits = run(self.hidden_in, self.mask)
        finally:
            for h in hooks:
                h.remove()
        logp = torch.log_softmax(logits[self.pred_rows, self.pred_cols].float(), dim=-1)
        nll = -logp.gather(1, self.targets[:, None]).mean()
        return nll, nll, nll  # (loss, NLL, loss): FT's loss is the NLL

    def clamp(self, delta: torch.Tensor) -> None:
        delta.clamp_(-self.hparams.norm_constraint, self.hparams.norm_constraint)

    def check(self, loss: torch.Tensor, step: int) -> None:
        if not torch.isfinite(loss):
            names = ", ".join(r.name for r in self.requests)
            raise EditOptimisationError(f"FT loss is not finite at step {step} for {names}; nothing was applied")


class _AddLinear:
    """Forward hook adding Δx (Δ in (out, in) layout) to a linear/Conv1D module's output."""

    def __init__(self, module: nn.Module, delta: torch.Tensor):
        def hook(mod, args, output):
            return output + args[0] @ delta.T.to(output.dtype)

        self.handle = module.register_forward_hook(hook)

    def remove(self) -> None:
        self.handle.remove()


class FT(EditMethod):
    """Constrained fine-tuning (FT-L), or FT with the scored elastic net (FT-EN, EAC App. E). Defaults: FT-L's
    GPT2-XL hyper-parameters (``configs/methods/ft.yaml``).

    Args:
        layers: decoder layers whose MLP output projection is fine-tuned (ROME FT-L GPT2-XL: [0]); None:
            the model's ROME layer.
        target: the optimisation of the weight change (the target settings, as ROME's and MEMIT's ``target``).
        eac: elastic net (and optional anchors) on the weight change; None for plain FT.
    """

    def __init__(self, layers: list[int] | None = None, target: FTHyperParams = FTHyperParams(),
                 eac: EACHyperParams | None = None) -> None:
        self.layers = sorted(layers) if layers is not None else None
        # a copy: the signature's default instance is shared by every FT built without a target
        self.target = copy.deepcopy(target) if target is not None else FTHyperParams()
        self.eac = eac
        self.module_names: list[str] = []

    @property
    def label(self) -> str:
        """``FT`` or ``FT-EN`` (with the elastic net), as the presets are named."""
        return "FT-EN" if self.eac is not None else "FT"

    def setup(self, model: nn.Module, tok, stats=None) -> None:
        if self.layers is None:
            self.layers = [default_layers(model).rome]
        self.module_names = [mlp_out_name(model, l) for l in self.layers]

    def compute_targets(self, model: nn.Module, tok, requests: Sequence[EditRequest]) -> FTTarget:
        if not self.module_names:
            self.setup(model, tok)
        problem = FTProblem(model, tok, requests, self.layers, self.target)
        delta, _ = compress(problem, self.eac)
        return FTTarget({n: d.detach() for n, d in zip(problem.names, problem.split(delta))}, len(requests))

    def _write(self, model: nn.Module, tok, targets: FTTarget) -> Written:
        apply_deltas(model, targets.deltas)
        # The batch's Δ is optimised jointly: it is one request's own only when the batch holds one request.
        norm = math.sqrt(sum(float(d.double().pow(2).sum()) for d in targets.deltas.values()))
        return Written(targets.deltas, [norm] if targets.num_requests == 1 else None)
