"""The target optimisation shared by ROME (v*) and MEMIT/AlphaEdit (z), and the keys k*.

ROME (EAC App. B, Eq. 8-9) and MEMIT both find a vector that, added to a hidden state at the last subject
token, makes the model produce the new object:

    δ* = argmin_δ  1/N Σ_j -log P[o* | x_j + p]                     (target NLL over N prefix contexts)
                   + kl · D_KL(P[x | p'] ‖ P₀[x | p'])                 (subject essence p' = "{subject} is a")
                   + wd · ‖δ‖ / ‖v₀‖²                                 (ROME's weight decay)
    subject to ‖δ‖ ≤ clamp · ‖v₀‖,

where v₀ is the hidden value being changed. Nothing below the edited layer changes during the optimisation,
so its input is computed once per batch of edits (one padded forward over every request's prefix contexts) and
every step runs only the layers from the edited one on (:func:`eac_lightning.models.tracing.layers_from`), one
forward per group of alike prompt lengths (:func:`length_groups`), with the
output projection only where the loss reads logits (:func:`eac_lightning.models.tracing.at_positions`).

:class:`TargetProblem` owns that batch and the loss, all requests of a batch in one backward per step;
:func:`optimise_plain` is the base methods' optimiser. EAC (:mod:`eac_lightning.methods.eac`) wraps the same problem
with its two-phase optimisation. Write-aware targets (``write_directions``) add δ wherever the closed-form update
will act instead of at the subject only, which couples the batch's requests (docs/methods.md).
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from eac_lightning.data.requests import EditRequest
from eac_lightning.models.adapters import get_spec, mlp_out_name
from eac_lightning.models.encoding import encode_right_padded, encode_target
from eac_lightning.models.tracing import (
    add_along_keys,
    add_at_positions,
    at_positions,
    capture,
    layers_from,
    through_layer,
)
from eac_lightning.validation import check


class EditOptimisationError(RuntimeError):
    """The target optimisation of a request diverged (NaN/inf); nothing was applied."""


@dataclass
class TargetHyperParams:
    """Hyper-parameters of the target optimisation, a method's ``target`` setting (ROME's v*, ROME Eq. 4; MEMIT's z,
    MEMIT Eq. 16; EAC App. B Eq. 9). Defaults: ROME's GPT2-XL values (MEMIT's default differs in the clamp, 0.75).

    Args:
        num_steps: forward passes of the published loop (ROME/MEMIT GPT2-XL: 20): each checks the stopping rule,
            all but the last are followed by an Adam update, so ``num_steps`` − 1 updates at most (ROME's
            ``compute_v``, MEMIT's/AlphaEdit's ``compute_z``: ``if it == v_num_grad_steps - 1: break``).
        lr: Adam learning rate (0.5).
        weight_decay: ROME's decay factor on ‖δ‖/‖v₀‖² (0.5).
        clamp_norm_factor: ‖δ‖ is projected onto the ball of radius factor·‖v₀‖ (ROME 4, MEMIT 0.75).
        kl_factor: weight of the subject-essence KL term (0.0625).
        kl_prompt: the essence prompt p' ("{} is a").
        early_stop: stop once the quantity named by ``early_stop_on`` falls below this (ROME/MEMIT: 5e-2).
        early_stop_on: ``total``: the request's whole loss, target NLL + KL term + weight decay, as the published
            ROME/MEMIT/AlphaEdit code (``if loss < 5e-2: break``); ``nll``: the target NLL alone, which stops
            sooner (the decay term alone can keep the total above the threshold when ‖v₀‖ is small).
        requests_per_forward: requests of a batch optimised in one forward/backward per step (MEMIT, AlphaEdit,
            B-EAC without write-aware targets); a larger batch is optimised in chunks of this many, with the same
            result (its requests are independent). Memory grows linearly with it (each request brings its N + 1
            prompts' activations for the backward); 1 is the published one-request-at-a-time optimisation.
    """

    num_steps: int = 20
    lr: float = 0.5
    weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    kl_prompt: str = "{} is a"
    early_stop: float = 5e-2
    early_stop_on: str = "total"
    requests_per_forward: int = 4

    def __post_init__(self) -> None:
        check("num_steps", self.num_steps, integer=True, positive=True)
        check("requests_per_forward", self.requests_per_forward, integer=True, positive=True)
        check("lr", self.lr, positive=True)
        check("weight_decay", self.weight_decay, nonnegative=True)
        check("clamp_norm_factor", self.clamp_norm_factor, positive=True)
        check("kl_factor", self.kl_factor, nonnegative=True)
        check("early_stop", self.early_stop, nonnegative=True)
        if self.early_stop_on not in ("total", "nll"):
            raise ValueError(f"early_stop_on must be 'total' or 'nll', got {self.early_stop_on!r}")
        if not isinstance(self.kl_prompt, str) or self.kl_prompt.count("{}") != 1:
            raise ValueError(f"kl_prompt must contain '{{}}' once (where the subject goes), got {self.kl_prompt!r}")


@dataclass
class ContextTemplateParams:
    """Prefix contexts x_j of EAC Eq. 8-9: texts generated by the model itself, seeded with EasyEdit's starts ("The",
    "Therefore", "Because", "I", "You"); "{}" (no prefix) is always first.

    Args:
        length_count: ``[length, count]`` groups: ``count`` texts of ``length`` new tokens each (ROME: [[5, 10],
            [10, 10]], 21 contexts; MEMIT's code: [[10, 5]]).
        seed: seed of the sampling (top-k 5), so a run's contexts are reproducible.
    """

    length_count: list[list[int]] = field(default_factory=lambda: [[5, 10], [10, 10]])
    seed: int = 0

    def __post_init__(self) -> None:
        for i, pair in enumerate(self.length_count):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise ValueError(f"length_count[{i}] must be a [length, count] pair, got {pair!r}")
            check(f"length_count[{i}] length", pair[0], integer=True, positive=True)
            check(f"length_count[{i}] count", pair[1], integer=True, nonnegative=True)
        check("seed", self.seed, integer=True)


def generate_context_templates(model: nn.Module, tok, params: ContextTemplateParams) -> list[str]:
    """Context templates ``"<generated text>. {}"`` sampled (top-k 5) from the unedited model, seeded."""
    starts = ["The", "Therefore", "Because", "I", "You"]
    templates = ["{}"]
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(params.seed)
        for length, count in params.length_count:
            prompts = [starts[i % len(starts)] for i in range(count)]
            enc = tok(prompts, return_tensors="pt", padding=True).to(device)
            out = model.generate(
                **enc, do_sample=True, top_k=5, max_new_tokens=length, pad_token_id=tok.pad_token_id,
            )
            for text in tok.batch_decode(out, skip_special_tokens=True):
                templates.append(text.replace("{", " ").replace("}", " ").strip() + ". {}")
    return templates


def subject_last_index(tok, text: str, subject: str) -> int:
    """Index of the last subject token in ``text`` (ROME's "subject_last" fact token)."""
    end = text.rindex(subject) + len(subject)
    return len(tok(text[:end], add_special_tokens=False)["input_ids"]) - 1


def compute_keys(
    model: nn.Module, tok, requests: Sequence[EditRequest], layer: int, templates: Sequence[str]
) -> torch.Tensor:
    """k* of each request at ``layer``: the MLP-output-projection input at the last subject token, averaged
    over the prefix contexts (EAC App. B Eq. 8). Returns (n_requests, d_key) in float32 whatever the weights'
    dtype (the closed forms solve with them in float64). One batched forward."""
    texts = []
    for r in requests:
        for t in templates:
            texts.append(t.replace("{}", r.prompt_text))
    device = next(model.parameters()).device
    ids, mask = encode_right_padded(tok, texts, device)
    idx = [subject_last_index(tok, t.replace("{}", r.prompt_text), r.subject) for r in requests for t in templates]
    name = mlp_out_name(model, layer)
    with torch.no_grad(), capture(model, [name]) as rec, through_layer(model, layer):
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    keys = rec[name].input[torch.arange(len(texts), device=device), torch.tensor(idx, device=device)]
    return keys.float().reshape(len(requests), len(templates), -1).mean(1)


# What one more forward costs, in padded prompt tokens of a 256-wide model: ~20 ms of a forward's and backward's
# fixed work against ~0.27 ms per token on testbed:small (1 CPU thread). A token's work grows with the width squared
# and the fixed work does not, so other widths scale it by (256 / width)². On small a single edit's ~22 prompts stay
# one forward (grouping them was 12 % slower) while a batch of 100 requests, 40-50 % padding, runs ~2x faster.
FORWARD_COST_TOKENS = 64


def forward_cost_tokens(width: int) -> int:
    """:data:`FORWARD_COST_TOKENS` for a model whose hidden states are ``width`` wide."""
    return round(FORWARD_COST_TOKENS * (256 / width) ** 2)


def length_groups(lengths: torch.Tensor, forward_cost: int = FORWARD_COST_TOKENS) -> list[torch.Tensor]:
    """Indices of prompts with ``lengths`` in groups of contiguous lengths, shortest first, minimising the padded
    tokens of all groups plus ``forward_cost`` per group (exact, over the distinct lengths)."""
    order = torch.argsort(lengths, stable=True)
    values, counts = torch.unique_consecutive(lengths[order], return_counts=True)
    values, ends = values.tolist(), counts.cumsum(0).tolist()
    best, cut = [0.0], [0]  # best[i]: cost of the i shortest distinct lengths; cut[i]: where their last group begins
    for i in range(1, len(values) + 1):
        options = [(best[j] + (ends[i - 1] - (ends[j - 1] if j else 0)) * values[i - 1] + forward_cost, j)
                   for j in range(i)]
        cost, j = min(options)
        best.append(cost)
        cut.append(j)
    groups, i = [], len(values)
    while i:
        j = cut[i]
        groups.append(order[(ends[j - 1] if j else 0):ends[i - 1]])
        i = j
    return groups[::-1]


class TargetProblem:
    """The loss of EAC App. B Eq. 9 for a batch of requests, as a function of their shifts δ (n, d) at one hooked
    module: per step, forwards over every request's prefix contexts and subject-essence prompt (one per group of alike
    lengths, so little of them is padding), and one backward (MEMIT App.: the z optimisations "could be batched").

    Without write directions the rows are independent: request i's prompts see only δ_i, the loss is the sum of the
    requests' own losses, so each row's gradient (and Adam's elementwise step) is that of request i optimised alone.
    A request whose target NLL is reached is frozen (:meth:`freeze`) exactly where its own optimisation would have
    stopped, and its prompts leave the forward.

    Args:
        model, tok: the model being edited and its tokenizer.
        requests: the edits, one row of δ each.
        layer: the decoder layer whose output (``site="residual"``, MEMIT's z) or MLP output (``site="mlp"``,
            ROME's v*) receives δ_i at request i's last subject token.
        templates: prefix contexts (first is "{}").
        hparams: optimisation hyper-parameters.
        write_directions: ``None`` adds δ at the last subject token only (as published). Otherwise
            ``{layer l: U_l}`` with U_l (d_k, n) (or u_l (d_k,) for one request): every token t's MLP output at
            layer l receives δᵀU_lᵀk_t for its key k_t, which is what the closed-form update ΔW_l = δᵀU_lᵀ will add
            there (ROME: u = C⁻¹k*/(k*ᵀC⁻¹k*)), so the optimised loss is the edited model's own (docs/methods.md,
            "Write-aware target"). Such directions couple the requests: they are optimised and stopped together.
    """

    last_update = False  # the published loop: its last forward only checks the stopping rule (num_steps − 1 updates)

    def __init__(
        self,
        model: nn.Module,
        tok,
        requests: Sequence[EditRequest],
        layer: int,
        templates: Sequence[str],
        hparams: TargetHyperParams,
        site: str = "mlp",
        write_directions: dict[int, torch.Tensor] | None = None,
    ) -> None:
        self.model, self.requests, self.hparams, self.layer = model, list(requests), hparams, layer
        spec = get_spec(model)
        self.write_directions = {mlp_out_name(model, l): u for l, u in (write_directions or {}).items()}
        self.independent_rows = not self.write_directions
        self.start = min([layer, *(write_directions or {})])
        self.hook_name = mlp_out_name(model, layer) if site == "mlp" else spec.layer(layer)
        device = next(model.parameters()).device
        n_ctx = len(templates)
        texts, owner, pred_text, pred_pos, pred_ids, pred_weight = [], [], [], [], [], []
        targets = [encode_target(tok, r.target_new) for r in self.requests]
        for i, (r, target) in enumerate(zip(self.requests, targets)):
            prefix = tok.decode(target[:-1]) if len(target) > 1 else ""
            texts += [t.replace("{}", r.prompt_text) + prefix for t in templates]
            texts.append(hparams.kl_prompt.replace("{}", r.subject))
            owner += [i] * (n_ctx + 1)
        input_ids, mask = encode_right_padded(tok, texts, device)
        lengths = mask.sum(1).tolist()
        for i, target in enumerate(targets):
            for j in range(i * (n_ctx + 1), i * (n_ctx + 1) + n_ctx):
                # the positions whose logits predict the target tokens (the prompt's last token and the target prefix)
                pred_text += [j] * len(target)
                pred_pos += range(lengths[j] - len(target), lengths[j])
                pred_ids += target
                pred_weight += [1.0 / (n_ctx * len(target))] * len(target)
        self.owner = torch.tensor(owner, device=device)
        self.cols = torch.tensor([subject_last_index(tok, t, self.requests[o].subject) for t, o in zip(texts, owner)],
                                 device=device)
        self.pred_text = torch.tensor(pred_text, device=device)
        self.pred_pos = torch.tensor(pred_pos, device=device)
        self.pred_ids = torch.tensor(pred_ids, device=device)
        self.pred_weight = torch.tensor(pred_weight, device=device)
        self.kl_text = torch.arange(n_ctx, len(texts), n_ctx + 1, device=device)
        first = torch.arange(0, len(texts), n_ctx + 1, device=device)
        # One forward below the edited layer: its input and the value v₀ at the subject are fixed from now on.
        with torch.no_grad(), capture(model, [spec.layer(self.start), self.hook_name]) as rec, \
                at_positions(model, self.kl_text, self.cols[self.kl_text]):
            kl_logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits[0]
        self.hidden_in, self.mask = rec[spec.layer(self.start)].input, mask
        # δ and its optimiser state live in float32 (v₀'s dtype); hooks cast δ to the weights' dtype.
        self.v0 = rec[self.hook_name].output[first, self.cols[first]].detach().float()
        self.kl_ref = torch.log_softmax(kl_logits.float(), dim=-1).detach()
        self.frozen = torch.zeros(len(self.requests), dtype=torch.bool, device=device)
        self._frozen_nll = torch.zeros(len(self.requests), device=device)
        self._frozen_total = torch.zeros(len(self.requests), device=device)
        self._entry_text = torch.cat([self.pred_text, self.kl_text])  # the text each read position belongs to
        self._entry_col = torch.cat([self.pred_pos, self.cols[self.kl_text]])
        self._activate(torch.arange(len(texts), device=device))

    def freeze(self, rows: torch.Tensor, nll: torch.Tensor, total: torch.Tensor) -> None:
        """Stop optimising the requests ``rows`` (bool, (n,)), which met the stopping rule: later losses leave their
        prompts out of the forward and report these NLLs and losses for them (independent rows only)."""
        new = rows & ~self.frozen
        self._frozen_nll = torch.where(new, nll.detach(), self._frozen_nll)
        self._frozen_total = torch.where(new, total.detach(), self._frozen_total)
        self.frozen = self.frozen | rows
        self._activate((~self.frozen[self.owner]).nonzero().squeeze(1))

    def thaw(self) -> None:
        """Optimise every request again (an optimisation starts)."""
        self.frozen = torch.zeros_like(self.frozen)
        self._activate(torch.arange(len(self.owner), device=self.owner.device))

    def _activate(self, texts: torch.Tensor) -> None:
        """The prompts later forwards run, and their length groups (they change only when requests freeze)."""
        self._active_texts = texts
        self._groups = length_groups(self.mask[texts].sum(1), forward_cost_tokens(self.v0.shape[-1]))

    def loss(self, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(the batch's loss of Eq. 9 + ROME's weight decay, each request's target NLL (n,), each request's own
        loss (n,)) for δ (n, d); the last two detached. At δ = 0 a request's loss is its NLL (KL and decay vanish)."""
        texts, entry_text, entry_col = self._active_texts, self._entry_text, self._entry_col
        logits, entries = [], []
        for group in self._groups:
            # One forward per group of alike lengths: padding to the batch's longest prompt would be 40-50 % of a
            # batch's tokens (prefix contexts and essence prompts differ by ~20 tokens).
            members = texts[group]
            local = torch.zeros(len(self.owner), dtype=torch.long, device=texts.device)
            local[members] = torch.arange(1, len(members) + 1, device=texts.device)  # 1 + row, 0: elsewhere
            mine = (local[entry_text] > 0).nonzero().squeeze(1)
            width = int(self.mask[members].sum(1).max())  # right-padded: the group's padding ends here
            # hooks first: they name modules by their index in the full layer list
            with self._inserted(delta, self.owner[members], self.cols[members]), \
                    layers_from(self.model, self.start) as run, \
                    at_positions(self.model, local[entry_text[mine]] - 1, entry_col[mine]):
                logits.append(run(self.hidden_in[members, :width], self.mask[members, :width])[0].float())
            entries.append(mine)
        entries = torch.cat(entries)
        n_pred = len(self.pred_text)
        pred, kl = entries[entries < n_pred], entries[entries >= n_pred] - n_pred
        at = torch.empty(len(entry_text), dtype=torch.long, device=texts.device)
        at[entries] = torch.arange(len(entries), device=texts.device)  # entry → its row among the forwards' logits
        logits = torch.cat(logits)
        n = len(self.requests)
        logp = torch.log_softmax(logits[at[pred]], dim=-1)
        token_nll = -logp.gather(1, self.pred_ids[pred][:, None]).squeeze(1) * self.pred_weight[pred]
        nll = torch.zeros(n, device=logits.device).index_add(0, self.owner[self.pred_text[pred]], token_nll)
        kl_logp = torch.log_softmax(logits[at[kl + n_pred]], dim=-1)
        kl_rows_loss = torch.nn.functional.kl_div(self.kl_ref[kl], kl_logp, log_target=True, reduction="none").sum(-1)
        kl_loss = torch.zeros(n, device=logits.device).index_add(0, self.owner[self.kl_text[kl]], kl_rows_loss)
        decay = self.hparams.weight_decay * delta.norm(dim=-1) / self.v0.norm(dim=-1) ** 2
        total = nll + self.hparams.kl_factor * kl_loss + decay
        active = ~self.frozen
        return (total[active].sum(), torch.where(active, nll.detach(), self._frozen_nll),
                torch.where(active, total.detach(), self._frozen_total))

    def _inserted(self, delta: torch.Tensor, owner: torch.Tensor, cols: torch.Tensor) -> ExitStack:
        stack = ExitStack()
        if not self.write_directions:
            rows = torch.arange(len(owner), device=owner.device)
            stack.enter_context(add_at_positions(self.model, self.hook_name, delta[owner], rows, cols))
        for name, u in self.write_directions.items():
            stack.enter_context(add_along_keys(self.model, name, u, delta))
        return stack

    def clamp(self, delta: torch.Tensor) -> None:
        """Project each row δ_i in place onto ‖δ_i‖ ≤ clamp_norm_factor·‖v₀_i‖."""
        max_norm = self.hparams.clamp_norm_factor * self.v0.norm(dim=-1, keepdim=True)
        delta.mul_(torch.clamp(max_norm / delta.norm(dim=-1, keepdim=True).clamp_min(1e-30), max=1.0))

    def check(self, loss: torch.Tensor, step: int) -> None:
        if not torch.isfinite(loss):
            what = ", ".join(f"{r.name} (subject {r.subject!r}, target {r.target_new!r})" for r in self.requests)
            raise EditOptimisationError(
                f"{what}: target optimisation produced a non-finite loss ({loss.item()}) at step {step}; "
                "nothing was applied"
            )


def adam_descent(problem, param: torch.Tensor, steps: int,
                 objective: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None,
                 first_step: int = 0, early_stop: bool = True,
                 on_grad: Callable[[torch.Tensor], None] | None = None,
                 last_update: bool | None = None) -> torch.Tensor:
    """The optimiser of ROME's v*, MEMIT's z and EAC's two phases (EAC App. B Eq. 9): Adam on ``param`` (the
    problem's learning rate) over ``steps`` forwards of ``objective(param) -> (loss, target NLL, the request's own
    loss)`` (default: the problem's loss), projecting ``param`` back into the norm ball after every update. With
    ``early_stop`` it stops once the quantity ``hparams.early_stop_on`` names (the whole loss as published, or the
    NLL) is below ``hparams.early_stop``; for a problem with independent rows
    (:class:`TargetProblem` without write directions) each row stops on its own: it is frozen at the step where its
    own optimisation would have ended, which is what optimising the requests one by one gives. ``last_update``
    False is the published ROME/MEMIT loop, whose last forward only checks the rule (``steps`` − 1 updates); True
    updates after every forward; None takes the problem's ``last_update``. ``on_grad`` sees each update's gradient
    (EAC's phase 1 scores with them); a non-finite loss raises naming step ``first_step + step``. Returns ``param``
    detached."""
    hp = problem.hparams
    objective = objective or problem.loss
    if last_update is None:
        last_update = problem.last_update
    on_total = getattr(hp, "early_stop_on", "nll") == "total"
    per_row = early_stop and getattr(problem, "independent_rows", False)
    if per_row:
        problem.thaw()
    opt = torch.optim.Adam([param], lr=hp.lr)
    for step in range(steps):
        loss, nll, total = objective(param)
        problem.check(loss, first_step + step)
        if early_stop:
            done = (total if on_total else nll) < hp.early_stop
            if bool(done.all()):
                break
            if per_row and bool(done.any()):
                problem.freeze(done, nll, total)
        if not last_update and step == steps - 1:
            break
        opt.zero_grad()
        (param.grad,) = torch.autograd.grad(loss, param)
        if on_grad is not None:
            on_grad(param.grad)
        kept = param.detach()[problem.frozen].clone() if per_row else None
        opt.step()
        with torch.no_grad():
            if per_row:
                param[problem.frozen] = kept
            problem.clamp(param)
    return param.detach()


def optimise_plain(problem: TargetProblem, num_steps: int | None = None) -> torch.Tensor:
    """ROME/MEMIT's optimiser: Adam on δ from zero with norm clamping and early stopping (EAC App. B Eq. 9)."""
    steps = problem.hparams.num_steps if num_steps is None else num_steps
    return adam_descent(problem, torch.zeros_like(problem.v0, requires_grad=True), steps)
