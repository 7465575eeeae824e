"""UltraEdit (Gu et al., 2025, arXiv 2505.14679): a training-, subject- and memory-free lifelong edit, one closed
form per turn (a batch of requests).

For every edited linear map W (input k ∈ ℝ^{d_k}, output ∈ ℝ^{d}) and every token t that predicts a target token
(the prompt's last token and the target's first n−1 tokens; the authors' ``token: ans``), one forward/backward of
the target cross-entropy on the current model gives

    z_t = [k_t ‖ g_t],   g_t = ∂L/∂(W k_t)                          (editing feature: hidden state ‖ value gradient)

**Lifelong normalisation.** Running moments (count N, mean μ, summed squared deviations M₂) of z over every turn so
far are merged with this turn's features (Chan et al.'s parallel update), then

    ẑ_t = (z_t − μ) / (σ + ε),   σ = √(M₂ / (N − 1)),   ẑ_t = [k̂_t ‖ ĝ_t]

**Pseudo values.** One gradient step of size η on W in the normalised space, ΔW = −η ĝ k̂ᵀ, would move the output
at k̂_t by −η‖k̂_t‖² ĝ_t; that is the value each token should receive:

    v_t = −η ‖k̂_t‖² ĝ_t

**Closed form.** The shift maps this turn's raw keys K (T, d_k) to the values V (T, d) in the ridge least-squares
sense, with no record of earlier turns (memory-free):

    ΔWᵀ = argmin_X ‖K X − V‖² + λ‖X‖² = (KᵀK + λI)⁻¹ KᵀV = Kᵀ (KKᵀ + λI)⁻¹ V

computed through the T × T system (T tokens per turn ≪ d_k), in float64.

Where this follows the authors' code (``XiaojieGu/UltraEdit``, ``editor/ultraedit.py``, ``nets.py``; also EasyEdit's
``ULTRAEDIT``) beyond the paper's text: one set of running moments per weight *shape*, shared by every edited
module of that shape; the turn's features are merged into the moments before they normalise it; the forward/backward
runs in chunks of ``chunk_size`` requests, each chunk's loss the mean over its target tokens. One difference: the
reference merges n·(unbiased batch variance), undefined for a chunk of one token (a single-token edit in a
single-edit stream), so the exact merge Σ(z − z̄)² is used; a turn whose moments hold one token normalises to zero
and writes nothing.

**Seeded moments (``prior_tokens``; 0 as published).** A deviation from the paper, off by default: before the first
turn the moments are seeded with the editing features of ``prior_tokens`` tokens of the key-statistics corpus (the
corpus of C, e.g. a testbed's own training stream): per window, the keys and the gradients of the summed next-token
cross-entropy at every position. Why: in a single-edit stream the first turns' moments hold one to a few tokens, so
σ is estimated from a handful of rows (zero for one row: the first edit writes nothing) and the normalisation is
different at every turn; on ``testbed:tiny`` (20 single CounterFact edits, docs/methods.md, "UltraEdit") this leaves
0.49 of the edits written after the stream. The paper's streams start with turns of 100 edits (~300 tokens), where
the moments are already estimated from hundreds of rows. Seeded with 1024 tokens: 0.49 -> 0.60 there. The prior's
rows are per-token gradients, the scale of a single edit's (its loss is the mean over its 1-3 target tokens); a
chunk of many edits has the gradients of its mean loss, ~30 times smaller for 10 edits, and normalised against the
prior they write almost nothing: use the seeded moments for single-edit streams only.

**Covariance ridge (``ridge_metric: covariance``; ``identity`` as published).** A second deviation, off by default:
the ridge penalises what the shift does to the keys of the key-statistics corpus, λ·E‖ΔW k‖² = λ‖ΔWᵀ‖²_C (C the
keys' second moment, as MEMIT's), instead of ‖ΔW‖²:

    ΔWᵀ = (KᵀK + λC)⁻¹KᵀV = C⁻¹Kᵀ(KC⁻¹Kᵀ + λI)⁻¹V

so the shift acts along C⁻¹k (ROME's key direction) rather than along k. Why: memory-free turns of one edit write a
rank-one shift along the raw key k, and on a small model the last-token keys of different prompts share most of
their direction, so every edit overwrites the earlier ones (``testbed:tiny``, 20 single CounterFact edits, η 1e-3,
seeded moments: 0.80 of the edits written when each is applied alone, 0.60 after the stream); along C⁻¹k the
overlap between prompts is what the corpus does not share. Both deviations together: 0.87 after the stream
(docs/methods.md). The covariance ridge alone helps turns of many edits too (tiny, turns of 10: 0.75 -> 0.85).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from eac_lightning.data.requests import EditRequest
from eac_lightning.methods.base import Deltas, EditMethod, Written
from eac_lightning.models.adapters import mlp_out_name, weight_view
from eac_lightning.models.encoding import encode_target
from eac_lightning.models.loading import default_layers
from eac_lightning.models.tracing import add_at_positions, capture

EPS = torch.finfo(torch.float32).eps  # ε of the normalisation (the reference's float32 eps)


@dataclass(frozen=True)
class RunningMoments:
    """Count, mean and summed squared deviations of the editing features seen so far (float64)."""

    count: int
    mean: torch.Tensor
    m2: torch.Tensor

    @staticmethod
    def empty(dim: int) -> "RunningMoments":
        return RunningMoments(0, torch.zeros(dim, dtype=torch.float64), torch.zeros(dim, dtype=torch.float64))

    def merged(self, x: torch.Tensor) -> "RunningMoments":
        """The moments of everything seen plus the rows of ``x`` (n, dim): Chan et al.'s parallel update
        μ' = μ + (n/N')δ, M₂' = M₂ + Σ(x − x̄)² + (N n / N')δ², δ = x̄ − μ, N' = N + n."""
        x = x.double().cpu()
        n = x.shape[0]
        total = self.count + n
        batch_mean = x.mean(0)
        delta = batch_mean - self.mean
        m2 = self.m2 + (x - batch_mean).pow(2).sum(0) + delta.pow(2) * (self.count * n / total)
        return RunningMoments(total, self.mean + delta * (n / total), m2)

    def std(self) -> torch.Tensor:
        """σ = √(M₂ / (N − 1)); zero while only one row has been seen."""
        if self.count < 2:
            return torch.zeros_like(self.m2)
        return (self.m2 / (self.count - 1)).sqrt()

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """ẑ = (z − μ) / (σ + ε)."""
        return (x.double() - self.mean.to(x.device)) / (self.std().to(x.device) + EPS)

    def to_state(self) -> dict[str, Any]:
        return {"count": self.count, "mean": self.mean.clone(), "m2": self.m2.clone()}

    @staticmethod
    def from_state(state: dict[str, Any]) -> "RunningMoments":
        return RunningMoments(int(state["count"]), state["mean"].double().cpu(), state["m2"].double().cpu())


@dataclass
class EditingFeatures:
    """One turn's editing features: per edited module, the keys K (T, d_k) and value gradients G (T, d) of every
    target-predicting token of the turn (on the model before the turn)."""

    requests: list[EditRequest]
    keys: dict[str, torch.Tensor]
    grads: dict[str, torch.Tensor]


def ridge_shift(keys: torch.Tensor, values: torch.Tensor, ridge: float,
                cov_solve: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """ΔW (d, d_k) with ΔWᵀ = (KᵀK + λI)⁻¹KᵀV, the ridge least-squares map of keys (T, d_k) to values (T, d),
    solved as Kᵀ(KKᵀ + λI)⁻¹V (T × T) in float64.

    With ``cov_solve`` (x ↦ C⁻¹x, C the keys' covariance) the penalty is λ‖X‖²_C = λ·E_corpus‖Xᵀk‖² instead of
    λ‖X‖²: ΔWᵀ = (KᵀK + λC)⁻¹KᵀV = C⁻¹Kᵀ(KC⁻¹Kᵀ + λI)⁻¹V (``ridge_metric: covariance``)."""
    left, right = ridge_factors(keys, values, ridge, cov_solve)
    return left @ right


def ridge_factors(keys: torch.Tensor, values: torch.Tensor, ridge: float,
                  cov_solve: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`ridge_shift` as (Xᵀ (d, T), K or (C⁻¹Kᵀ)ᵀ (T, d_k)) with X = (KKᵀ + λI)⁻¹V, or (KC⁻¹Kᵀ + λI)⁻¹V:
    rank ≤ T tokens, the form the edit log stores."""
    k, v = keys.double(), values.double()
    eye = torch.eye(k.shape[0], dtype=torch.float64, device=k.device)
    if cov_solve is None:
        return torch.linalg.solve(k @ k.T + ridge * eye, v).T, k
    ck = cov_solve(k.T.cpu()).to(k)  # C⁻¹Kᵀ (d_k, T)
    return torch.linalg.solve(k @ ck + ridge * eye, v).T, ck.T


class UltraEdit(EditMethod):
    """UltraEdit: lifelong-normalised gradient features, one ridge least-squares shift per module per turn.

    Args:
        layers: layers whose MLP output projection is edited (the module the authors edit on GPT-J, Mistral and
            Phi-4). None: the model's default MEMIT layers.
        modules: full module names to edit instead (e.g. LLaMA's ``model.layers.11.mlp.gate_proj``, as the
            authors' LLaMA-3 and Qwen2.5 configs); excludes ``layers``.
        value_step_size: η, the step size of the normalised gradient step that defines the pseudo values,
            v_t = −η‖k̂_t‖²ĝ_t (the authors' config calls it ``lr``, 1e-6; not a learning rate of any optimiser,
            hence not ``target.lr``, the other methods' Adam rate).
        ridge: λ of the least-squares shift (authors: 1, the identity added to KᵀK).
        chunk_size: requests per forward/backward when the features are extracted (authors: ``batch_size`` 10).
        prior_tokens: seed the running moments with the editing features of this many tokens of the
            key-statistics corpus before the first turn (0: not seeded, as published; see the module docstring).
        ridge_metric: ``identity`` (published): the ridge penalises ‖ΔW‖²; ``covariance``: it penalises
            λ·E‖ΔW k‖² over the key-statistics corpus (C, as MEMIT's), see the module docstring.
    """

    def __init__(
        self,
        layers: list[int] | None = None,
        modules: list[str] | None = None,
        value_step_size: float = 1e-6,
        ridge: float = 1.0,
        chunk_size: int = 10,
        prior_tokens: int = 0,
        ridge_metric: str = "identity",
    ) -> None:
        if layers is not None and modules is not None:
            raise ValueError("UltraEdit: give either layers or modules, not both")
        if value_step_size <= 0 or ridge <= 0 or chunk_size < 1:
            raise ValueError(f"UltraEdit: value_step_size and ridge must be > 0 and chunk_size >= 1 (got "
                             f"{value_step_size}, {ridge}, {chunk_size})")
        self.layers = sorted(layers) if layers is not None else None
        self.modules = list(modules) if modules is not None else None
        if ridge_metric not in ("identity", "covariance"):
            raise ValueError(f"UltraEdit: ridge_metric must be 'identity' or 'covariance' (got {ridge_metric!r})")
        self.ridge_metric = ridge_metric
        if prior_tokens < 0:
            raise ValueError(f"UltraEdit: prior_tokens must be >= 0 (got {prior_tokens})")
        self.value_step_size, self.ridge = value_step_size, ridge
        self.chunk_size, self.prior_tokens = chunk_size, prior_tokens
        self.module_names: list[str] = []
        self._stats = None  # the key statistics given to setup (C of ``ridge_metric: covariance``)
        self.moments: dict[str, RunningMoments] = {}  # by weight shape "d_k x d"

    def setup(self, model: nn.Module, tok, stats=None) -> None:
        self._stats = stats
        if self.ridge_metric == "covariance" and stats is None:
            raise ValueError("UltraEdit: ridge_metric 'covariance' needs the key statistics (setup's stats)")
        if self.modules is not None:
            for name in self.modules:
                try:
                    weight_view(model, name)
                except AttributeError:
                    raise ValueError(f"UltraEdit: the model has no linear module {name!r}") from None
            self.module_names = list(self.modules)
        else:
            layers = self.layers if self.layers is not None else list(default_layers(model).memit)
            self.module_names = [mlp_out_name(model, l) for l in layers]
        if self.prior_tokens and not self.moments:  # a resumed run's moments already hold the prior
            if stats is None:
                raise ValueError("UltraEdit: prior_tokens needs the key-statistics corpus (setup's stats)")
            self.moments = self.prior_moments(model, stats.tokenizer, stats.corpus, self.prior_tokens)

    def prior_moments(self, model: nn.Module, tok, corpus: str, num_tokens: int,
                      seq_len: int = 128, batch_size: int = 8) -> dict[str, RunningMoments]:
        """The moments of the editing features of the first ``num_tokens`` tokens of ``corpus``: per window of
        ``seq_len`` tokens, the keys of every edited module and ∂L/∂(W k_t) of the summed next-token cross-entropy
        L at every position (the last position, which predicts nothing, is left out)."""
        from eac_lightning.stats.covariance import _token_windows

        device = next(model.parameters()).device
        moments: dict[str, RunningMoments] = {}
        windows = _token_windows(tok, corpus, seq_len)
        seen, was_training = 0, model.training
        model.eval()
        try:
            while seen < num_tokens:
                batch = [w for _, w in zip(range(batch_size), windows)]
                if not batch:
                    break
                ids = torch.stack(batch).to(device)
                n, t = ids.shape
                rows = torch.arange(n, device=device).repeat_interleave(t - 1)
                cols = torch.arange(t - 1, device=device).repeat(n)
                leaves = {m: torch.zeros(len(rows), weight_view(model, m).shape[0], device=device,
                                         requires_grad=True) for m in self.module_names}
                with torch.enable_grad(), capture(model, self.module_names) as rec:
                    with ExitStack() as added:
                        for m, leaf in leaves.items():
                            added.enter_context(add_at_positions(model, m, leaf, rows, cols))
                        logits = model(input_ids=ids, use_cache=False).logits
                    loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                                       ids[:, 1:].reshape(-1), reduction="sum")
                    grads = torch.autograd.grad(loss, [leaves[m] for m in self.module_names])
                take = min(len(rows), num_tokens - seen)
                for m, g in zip(self.module_names, grads):
                    feats = torch.cat([rec[m].input[rows, cols].float(), g.float()], -1)[:take]
                    key = self._shape_key(model, m)  # modules of one shape share moments, as in _write
                    moments[key] = moments.get(key, RunningMoments.empty(feats.shape[1])).merged(feats)
                seen += take
        finally:
            model.train(was_training)
        if seen == 0:
            raise RuntimeError(f"UltraEdit: corpus {corpus!r} yielded no {seq_len}-token window for the prior")
        return moments

    @staticmethod
    def _shape_key(model: nn.Module, name: str) -> str:
        d_out, d_in = weight_view(model, name).shape
        return f"{d_in}x{d_out}"

    def compute_targets(self, model: nn.Module, tok, requests: Sequence[EditRequest]) -> EditingFeatures:
        """The turn's features: per chunk of requests, one forward with a zero leaf added at every
        target-predicting position of every edited module's output, the mean target cross-entropy, and its
        gradient with respect to those leaves (= ∂L/∂(W k_t))."""
        if not self.module_names:
            self.setup(model, tok)
        keys: dict[str, list[torch.Tensor]] = {n: [] for n in self.module_names}
        grads: dict[str, list[torch.Tensor]] = {n: [] for n in self.module_names}
        for start in range(0, len(requests), self.chunk_size):
            chunk = requests[start:start + self.chunk_size]
            k, g = self._chunk_features(model, tok, chunk)
            for n in self.module_names:
                keys[n].append(k[n])
                grads[n].append(g[n])
        return EditingFeatures(list(requests), {n: torch.cat(v) for n, v in keys.items()},
                               {n: torch.cat(v) for n, v in grads.items()})

    def _chunk_features(self, model: nn.Module, tok, requests: Sequence[EditRequest]):
        device = next(model.parameters()).device
        rows_ids, rows, cols, labels = [], [], [], []
        for i, r in enumerate(requests):
            prompt = list(tok(r.prompt_text)["input_ids"])  # prompt with special tokens, target without (reference)
            target = encode_target(tok, r.target_new)
            rows_ids.append(prompt + target[:-1])
            rows += [i] * len(target)
            cols += range(len(prompt) - 1, len(prompt) - 1 + len(target))
            labels += target
        width = max(len(x) for x in rows_ids)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids = torch.full((len(rows_ids), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, x in enumerate(rows_ids):
            ids[i, :len(x)] = torch.tensor(x)
            mask[i, :len(x)] = 1
        ids, mask = ids.to(device), mask.to(device)
        rows_t, cols_t = torch.tensor(rows, device=device), torch.tensor(cols, device=device)
        leaves = {n: torch.zeros(len(rows), weight_view(model, n).shape[0], device=device, requires_grad=True)
                  for n in self.module_names}
        with torch.enable_grad(), capture(model, self.module_names) as rec:
            with ExitStack() as added:
                for n, leaf in leaves.items():  # ∂L/∂leaf = ∂L/∂(module output) at those positions
                    added.enter_context(add_at_positions(model, n, leaf, rows_t, cols_t))
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            loss = nn.functional.cross_entropy(logits[rows_t, cols_t].float(), torch.tensor(labels, device=device))
            if not torch.isfinite(loss):
                names = ", ".join(r.name for r in requests)
                raise FloatingPointError(f"UltraEdit: non-finite target loss for [{names}]; nothing was applied")
            grads = torch.autograd.grad(loss, [leaves[n] for n in self.module_names])
        keys = {n: rec[n].input[rows_t, cols_t].float() for n in self.module_names}
        return keys, {n: g.float() for n, g in zip(self.module_names, grads)}

    def _write(self, model: nn.Module, tok, features: EditingFeatures) -> Written:
        # The moments are committed only once every shift is applied: a failed write leaves no trace.
        moments = dict(self.moments)
        for n in self.module_names:
            key = self._shape_key(model, n)
            feats = torch.cat([features.keys[n], features.grads[n]], dim=-1)
            moments[key] = moments.get(key, RunningMoments.empty(feats.shape[1])).merged(feats)
        shifts, factors = {}, {}
        for n in self.module_names:
            d_k = features.keys[n].shape[1]
            z = moments[self._shape_key(model, n)].normalise(torch.cat([features.keys[n], features.grads[n]], -1))
            k_hat, g_hat = z[:, :d_k], z[:, d_k:]
            values = -self.value_step_size * k_hat.pow(2).sum(-1, keepdim=True) * g_hat  # v_t = −η‖k̂_t‖²ĝ_t
            solve = self._stats.get(n).solve if self.ridge_metric == "covariance" else None
            factors[n] = ridge_factors(features.keys[n], values, self.ridge, solve)
            shift = factors[n][0] @ factors[n][1]
            if not torch.isfinite(shift).all():
                raise FloatingPointError(f"UltraEdit shift of {n} is not finite; the turn was not applied")
            shifts[n] = shift
        deltas: Deltas = {}
        with torch.no_grad():
            for n, shift in shifts.items():
                w = weight_view(model, n)
                deltas[n] = shift.to(w)
                w.add_(deltas[n])
        self.moments = moments
        # one ridge fit over the turn's tokens: no request owns a share
        return Written(deltas, None, {n: (a.cpu(), b.cpu()) for n, (a, b) in factors.items()})

    def state_dict(self) -> dict[str, Any]:
        return {"moments": {k: m.to_state() for k, m in self.moments.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.moments = {k: RunningMoments.from_state(s) for k, s in state.get("moments", {}).items()}

