"""ROME, MEMIT, AlphaEdit, FT and EAC: the closed forms and constraints on tiny random models (fast, every family),
and editing success on the tiny knowledge testbed (a model that really knows the facts it edits)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import FAMILIES, make_tiny_model

from eac_lightning.data.requests import EditRequest
from eac_lightning.methods import (
    FT,
    MEMIT,
    ROME,
    AlphaEdit,
    ContextTemplateParams,
    EACHyperParams,
    EditOptimisationError,
    FTHyperParams,
    TargetHyperParams,
)
from eac_lightning.methods.alphaedit import null_space_basis, null_space_projector, null_space_solve
from eac_lightning.methods.base import restore_weights, snapshot
from eac_lightning.methods.eac import anchor_count, anchor_mask, explore
from eac_lightning.methods.edit import edit
from eac_lightning.methods.ft import FTProblem
from eac_lightning.methods.memit import ResidualTarget, residual_at_subject
from eac_lightning.methods.rome import RankOneTarget, rank_one_update
from eac_lightning.methods import target as target_module
from eac_lightning.methods.target import TargetProblem, compute_keys, length_groups
from eac_lightning.models.adapters import mlp_out_name, weight_view
from eac_lightning.models.encoding import encode_target
from eac_lightning.stats.covariance import Covariance, CovarianceStore

NAN = float("nan")
Z = TargetHyperParams(num_steps=8, clamp_norm_factor=0.75)  # MEMIT's z, fewer steps: these tests check algebra
CTX = ContextTemplateParams(length_count=[[4, 2]])  # "{}" + 2 generated prefixes: fast, still averaged
REQ = EditRequest(prompt="{} is located in", subject="The Eiffel Tower", target_new="Rome", source="test",
                  source_index=0)
REQS = [
    REQ,
    EditRequest(prompt="{} speaks", subject="Danielle Darrieux", target_new="English", source="test", source_index=1),
    EditRequest(prompt="{} plays the", subject="Toko Yasuda", target_new="piano", source="test", source_index=2),
]



# Editing success needs a model that knows its facts: the tiny testbed (random models cannot be driven to a target
# through the subject position). On it an update written for the subject also acts on the prompt's other tokens
# (docs/testbed.md), so the published targets write about 5 of 8 single ROME edits and 1-2 of a MEMIT batch of 8;
# write-aware targets (docs/methods.md) optimise the loss of the model the closed form really writes.
TESTBED_MEMIT = dict(mom2_update_weight=10.0, target=TargetHyperParams(clamp_norm_factor=4.0),
                     context=ContextTemplateParams(length_count=[[10, 5]]))  # λ, clamp: configs/testbed/memit.yaml


@pytest.fixture(scope="module")
def gpt2(tokenizer):
    return make_tiny_model("gpt2", len(tokenizer), seed=1)


@pytest.fixture(autouse=True)
def _restore(request, gpt2):
    """Every test starts from the same random GPT-2 weights."""
    saved = {k: v.clone() for k, v in gpt2.state_dict().items()}
    yield
    gpt2.load_state_dict(saved)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same(model, state):
    now = model.state_dict()
    changed = [k for k in state if not torch.equal(state[k], now[k])]
    assert not changed, f"weights changed: {changed}"


def _target_nll(model, tok, request) -> float:
    ids = tok(request.prompt_text, add_special_tokens=False)["input_ids"]
    tgt = encode_target(tok, request.target_new)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids + tgt[:-1]])).logits[0]
    logp = torch.log_softmax(logits[len(ids) - 1:], -1)
    return -logp[torch.arange(len(tgt)), torch.tensor(tgt)].mean().item()


# --------------------------------------------------------------------------------------------------------- ROME


def test_rank_one_update_closed_form():
    """ΔW = δ (C⁻¹k)ᵀ / (kᵀC⁻¹k) (EAC App. B Eq. 7), so (W + ΔW) k = W k + δ."""
    torch.manual_seed(0)
    d_out, d_in = 6, 10
    w, k, delta = torch.randn(d_out, d_in), torch.randn(d_in), torch.randn(d_out)
    x = torch.randn(40, d_in, dtype=torch.float64)
    cov = Covariance(x.T @ x / 40, 40, damping=1e-3)
    for c in (None, cov):
        upd = rank_one_update(w, k, delta, c)
        torch.testing.assert_close((w + upd) @ k, w @ k + delta, atol=1e-5, rtol=1e-5)
        assert torch.linalg.matrix_rank(upd.double(), rtol=1e-5) == 1
    cinv_k = torch.linalg.solve(cov.damped, k.double())
    torch.testing.assert_close(rank_one_update(w, k, delta, cov).double(),
                               torch.outer(delta.double(), cinv_k) / (cinv_k @ k.double()), atol=1e-6, rtol=1e-5)


def _rome_check(model, tok, method, stats=None, request=REQ):
    method.setup(model, tok, stats)
    name = method.module_names[0]
    before = _state(model)
    w0 = weight_view(model, name).detach().clone()
    k = compute_keys(model, tok, [request], method.layer, method.templates)[0]  # k* on the pre-edit model
    targets = method.compute_targets(model, tok, [request])
    _assert_same(model, before)  # the optimisation changes no weight
    deltas = method.write(model, tok, targets).deltas
    w1 = weight_view(model, name).detach()
    delta = targets[0].delta
    assert delta.norm() > 0
    # W' k* = v* = W k* + δ
    torch.testing.assert_close(w1 @ k, w0 @ k + delta, atol=1e-5 * (1 + (w0 @ k).abs().max().item()), rtol=1e-4)
    torch.testing.assert_close(deltas[name], w1 - w0, atol=1e-6, rtol=1e-5)
    assert torch.linalg.matrix_rank(deltas[name].double(), rtol=1e-5) == 1
    # Only the edited module changed.
    now = model.state_dict()
    assert [k for k in before if not torch.equal(before[k], now[k])] == [name + ".weight"]
    return targets[0], deltas[name]


@pytest.mark.parametrize("family", FAMILIES)
def test_rome_writes_v_star_at_k_star_on_every_family(tokenizer, family):
    model = make_tiny_model(family, len(tokenizer))
    _rome_check(model, tokenizer, ROME(layer=1, context=CTX, mom2_adjustment=False))


def test_rome_with_inverse_covariance(gpt2, tokenizer, stats):
    method = ROME(layer=1, context=CTX, mom2_adjustment=True)
    _, with_c = _rome_check(gpt2, tokenizer, method, stats)
    k = compute_keys(gpt2, tokenizer, [REQ], 1, method.templates)[0]
    # Every row of ΔW is a multiple of (C⁻¹k*)ᵀ (EAC Eq. 7), with C damped as in the store.
    cinv_k = stats.get(mlp_out_name(gpt2, 1)).solve(k.double()).float()
    row = with_c[0] / with_c[0].norm()
    torch.testing.assert_close(row.abs(), (cinv_k / cinv_k.norm()).abs(), atol=1e-4, rtol=1e-3)


def _templates(model, tok):
    from eac_lightning.methods.target import generate_context_templates

    return generate_context_templates(model, tok, CTX)


def test_rome_without_statistics_asks_for_them(gpt2, tokenizer):
    method = ROME(layer=1, context=CTX, mom2_adjustment=True)
    method.setup(gpt2, tokenizer, None)
    before = _state(gpt2)
    targets = method.compute_targets(gpt2, tokenizer, [REQ])
    with pytest.raises(RuntimeError, match="covariance statistics"):
        method.write(gpt2, tokenizer, targets)
    _assert_same(gpt2, before)


# ---------------------------------------------------------------------------------------------------------- EAC


def test_anchor_count_matches_percentile():
    assert anchor_count(1600, 85.0) == 240  # GPT2-XL, P85
    assert anchor_count(4096, 95.0) == 205  # LLaMA-3-8B, P95
    assert anchor_count(64, 80.0) == 13
    assert anchor_count(10, 99.9) == 1  # never empty
    score = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    for gamma in (80.0, 85.0, 90.0, 95.0):
        mask = anchor_mask(score, EACHyperParams(gamma=gamma))
        assert int(mask.sum()) == anchor_count(1000, gamma)
        # The anchors are the dimensions at or above the γ-th percentile of |score|.
        assert score.abs()[mask].min() >= score.abs()[~mask].max()
        assert abs(score.abs()[mask].min() - torch.quantile(score.abs(), gamma / 100)) < 0.05
    assert bool(anchor_mask(score, EACHyperParams(anchors="none")).all())


@pytest.mark.parametrize("gamma", [80.0, 90.0])
def test_rome_eac_anchors_sparsity_and_smaller_update(gpt2, tokenizer, gamma):
    plain = ROME(layer=1, context=CTX, mom2_adjustment=False)
    saved = snapshot(gpt2, [mlp_out_name(gpt2, 1)])
    plain_target, plain_dw = _rome_check(gpt2, tokenizer, plain)
    restore_weights(gpt2, saved)
    eac = ROME(layer=1, context=CTX, mom2_adjustment=False, eac=EACHyperParams(gamma=gamma))
    eac.templates = plain.templates  # the same edit: same contexts
    target, dw = _rome_check(gpt2, tokenizer, eac)
    d = target.delta.numel()
    assert int(target.anchors.sum()) == anchor_count(d, gamma)
    assert torch.count_nonzero(target.delta[~target.anchors]) == 0  # exactly zero outside the anchors (Eq. 3)
    assert torch.count_nonzero(target.delta) <= anchor_count(d, gamma)
    assert dw.norm() < plain_dw.norm()
    assert target.delta.norm() < plain_target.delta.norm()


def test_eac_scores_are_value_times_mean_gradient(gpt2, tokenizer):
    """EAC Eq. 1: score = v* ⊙ ∇L, with ∇L the mean phase-1 gradient and v* = v₀ + δ."""
    templates = _templates(gpt2, tokenizer)
    problem = TargetProblem(gpt2, tokenizer, [REQ], 1, templates, TargetHyperParams(num_steps=6), site="mlp")
    ex = explore(problem, EACHyperParams(phase1_fraction=0.5))
    assert ex.steps == 3
    torch.testing.assert_close(ex.score, (problem.v0 + ex.delta) * ex.grad)
    ex_d = explore(problem, EACHyperParams(phase1_fraction=0.5, score_on="delta", anchors="gradient"))
    torch.testing.assert_close(ex_d.score, ex_d.grad)


# ------------------------------------------------------------------------------------------- write-aware targets


def _edited_nll(model, tok, method, request, layer, site) -> float:
    """Target NLL (over the method's prefix contexts) of the model as it is now, through a fresh problem."""
    problem = TargetProblem(model, tok, [request], layer, method.templates, method.target, site=site)
    return problem.loss(torch.zeros_like(problem.v0))[1].item()


def test_write_aware_rome_optimises_the_edited_models_loss(gpt2, tokenizer, stats):
    """With write directions the target's loss for δ is the loss of the model that ROME's closed form then writes
    (the update acts on every token's key, not only k*'s)."""
    method = ROME(layer=1, context=CTX, write_aware=True)
    method.setup(gpt2, tokenizer, stats)
    u = method._key_direction(gpt2, tokenizer, REQ)
    problem = TargetProblem(gpt2, tokenizer, [REQ], 1, method.templates, method.target, write_directions={1: u})
    plain = TargetProblem(gpt2, tokenizer, [REQ], 1, method.templates, method.target)
    delta = torch.randn(problem.v0.shape, generator=torch.Generator().manual_seed(0)) * problem.v0.norm()
    aware, assumed = problem.loss(delta)[1].item(), plain.loss(delta)[1].item()
    method.write(gpt2, tokenizer, [RankOneTarget(REQ, delta[0], None)])
    real = _edited_nll(gpt2, tokenizer, method, REQ, 1, "mlp")
    assert real == pytest.approx(aware, rel=1e-4)
    assert abs(real - assumed) > 1e-3 * abs(real)  # the published objective is not the edited model's


def test_write_aware_memit_batch_optimises_the_edited_models_loss(gpt2, tokenizer, stats):
    """Write-aware MEMIT over two layers: each request's loss under the (n, d) batch δ equals its loss after the
    write, which is ΔW_l = δᵀA_lᵀ/L with the columns the loss used; the coupled batch is optimised together."""
    method = MEMIT(layers=[1, 2], context=CTX, target=Z, mom2_update_weight=1.0, write_aware=True)
    method.setup(gpt2, tokenizer, stats)
    reqs = REQS[:2]
    directions = method._write_directions(gpt2, method._batch_keys(gpt2, tokenizer, reqs))
    joint = TargetProblem(gpt2, tokenizer, reqs, 2, method.templates, method.target, site="residual",
                          write_directions=directions)
    delta = torch.randn(joint.v0.shape, generator=torch.Generator().manual_seed(0)) * joint.v0.norm(dim=1, keepdim=True)
    aware = joint.loss(delta)[1].tolist()
    targets = [ResidualTarget(r, joint.v0[i], delta[i], None, {l: a[:, i] for l, a in directions.items()})
               for i, r in enumerate(reqs)]
    deltas = method.write(gpt2, tokenizer, targets).deltas
    for layer in (1, 2):
        torch.testing.assert_close(deltas[mlp_out_name(gpt2, layer)].double(),
                                   delta.double().T @ directions[layer].double().T, atol=1e-6, rtol=1e-5)
    real = [_edited_nll(gpt2, tokenizer, method, r, 2, "residual") for r in reqs]
    assert real == pytest.approx(aware, rel=1e-4)
    # compute_targets runs the same joint problem: EAC's anchors are per request (row).
    method.eac = EACHyperParams(gamma=80.0, lam=0.1, mu=0.05)
    out = method.compute_targets(gpt2, tokenizer, reqs)
    d = out[0].delta.numel()
    for t in out:
        assert int(t.anchors.sum()) == anchor_count(d, 80.0)
        assert (t.delta[~t.anchors] == 0).all() and t.write_columns is not None


# -------------------------------------------------------------------------------------------------------- MEMIT


@pytest.mark.parametrize("per_forward", [4, 2], ids=["one-forward", "chunks-of-2"])
@pytest.mark.parametrize("eac", [None, EACHyperParams(gamma=80.0)], ids=["memit", "memit-eac"])
def test_batched_targets_equal_one_by_one(gpt2, tokenizer, stats, eac, per_forward):
    """A batch's z optimisation runs its requests in one forward per step (or in chunks of requests_per_forward),
    each request stopping on its own: the targets (and EAC's anchors) are those of optimising each request alone,
    and requests stop at different steps."""
    method = MEMIT(layers=[1, 2], context=CTX, target=Z, eac=eac)
    method.setup(gpt2, tokenizer, stats)
    start = method._problem(gpt2, tokenizer, REQS[:3]).loss(torch.zeros(3, gpt2.config.n_embd))[1]
    # a threshold one request starts below and another reaches within the steps (the random model's NLLs are high)
    # the NLL rule: on a random model the NLL moves while the whole loss (dominated by the decay term) does not
    method.target = TargetHyperParams(num_steps=20, clamp_norm_factor=0.75, early_stop=float(start.median()),
                                      early_stop_on="nll", requests_per_forward=per_forward)
    calls = []
    loss = TargetProblem.loss

    def counting(self, delta):
        out = loss(self, delta)
        calls.append(int((~self.frozen).sum()))
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TargetProblem, "loss", counting)
        together = method.compute_targets(gpt2, tokenizer, REQS[:3])
    assert len(set(calls)) > 1  # some requests stopped early while others went on
    for i, r in enumerate(REQS[:3]):
        (alone,) = method.compute_targets(gpt2, tokenizer, [r])
        torch.testing.assert_close(together[i].v0, alone.v0, atol=1e-5, rtol=1e-5)
        if eac is not None:
            assert torch.equal(together[i].anchors, alone.anchors)
        # float32 sums in another order, through 20 Adam steps (which rescale tiny gradients, and EAC's L1 term
        # flips sign at zero): within 0.5% of the shift's norm
        torch.testing.assert_close(together[i].delta, alone.delta, atol=5e-3 * float(alone.delta.norm()), rtol=0)


@pytest.mark.parametrize("write_aware", [False, True], ids=["at-subject", "write-aware"])
def test_forwards_grouped_by_length_equal_one_padded_forward(gpt2, tokenizer, stats, write_aware, monkeypatch):
    """A step's forwards over groups of alike prompt lengths (no padding beyond each group's longest) give the loss,
    the NLLs and the gradient of one forward over all prompts padded to the longest, requests frozen or not."""
    method = MEMIT(layers=[1, 2], context=CTX, target=Z, mom2_update_weight=1.0)
    method.setup(gpt2, tokenizer, stats)
    directions = method._write_directions(gpt2, method._batch_keys(gpt2, tokenizer, REQS)) if write_aware else None
    problem = TargetProblem(gpt2, tokenizer, REQS, 2, method.templates, method.target, site="residual",
                            write_directions=directions)
    lengths = problem.mask.sum(1)
    assert len(length_groups(lengths, 0)) == len(set(lengths.tolist())) > 2  # free forwards: one per length
    assert len(length_groups(lengths, 10**9)) == 1
    delta = torch.randn(problem.v0.shape, generator=torch.Generator().manual_seed(0)) * 0.3
    for frozen in (None, torch.tensor([False, True, False])):
        if frozen is not None:
            problem.freeze(frozen, torch.zeros(3), torch.zeros(3))
        out = {}
        for cost in (10**9, 0):
            monkeypatch.setattr(target_module, "FORWARD_COST_TOKENS", cost)
            problem.freeze(torch.zeros(3, dtype=torch.bool), torch.zeros(3), torch.zeros(3))  # regroup (freezes nothing new)
            d = delta.clone().requires_grad_(True)
            loss, nll, _ = problem.loss(d)
            out[cost] = (loss.detach(), nll.detach(), torch.autograd.grad(loss, d)[0])
        for one, grouped in zip(out[10**9], out[0]):
            torch.testing.assert_close(grouped, one, atol=1e-5, rtol=1e-4)
    parts = length_groups(torch.tensor([7, 3, 3, 9, 7, 3]), 0)
    assert [p.tolist() for p in parts] == [[1, 2, 5], [0, 4], [3]]  # every prompt once, shortest group first
    assert [p.tolist() for p in length_groups(torch.tensor([7, 3, 3, 9, 7, 3]), 5)] == [[1, 2, 5], [0, 4, 3]]


def test_logits_at_positions_are_the_full_forwards(gpt2, tokenizer):
    """The output projection at chosen positions only gives the full forward's logits there."""
    from eac_lightning.models.tracing import at_positions

    ids = tokenizer(["The Eiffel Tower is in", "Paris is the capital of France"], return_tensors="pt",
                    padding=True)
    rows, cols = torch.tensor([0, 1, 1]), torch.tensor([2, 0, 4])
    with torch.no_grad():
        full = gpt2(**ids).logits
        with at_positions(gpt2, rows, cols):
            few = gpt2(**ids).logits
    torch.testing.assert_close(few[0], full[rows, cols])


def test_keys_read_through_their_layer_are_the_full_forwards(gpt2, tokenizer):
    """Reading a layer's keys runs the model only up to that layer: same keys as the whole forward."""
    from eac_lightning.models.tracing import capture, through_layer

    ids = tokenizer(["The Eiffel Tower is in", "Paris is the capital of France"], return_tensors="pt",
                    padding=True)
    name = mlp_out_name(gpt2, 1)
    with torch.no_grad(), capture(gpt2, [name]) as full:
        gpt2(**ids)
    with torch.no_grad(), capture(gpt2, [name]) as short, through_layer(gpt2, 1):
        gpt2(**ids)
    assert len(gpt2.transformer.h) == gpt2.config.n_layer  # the layer list is whole again
    torch.testing.assert_close(short[name].input, full[name].input)


def test_memit_woodbury_equals_direct_solve(gpt2, tokenizer, stats):
    """The update through the cached factor and Woodbury's identity equals R Kᵀ... with (λC + KKᵀ)⁻¹K solved
    directly in float64 (C damped as in the store)."""
    torch.manual_seed(0)
    name = mlp_out_name(gpt2, 1)
    c = stats.get(name)
    d_k, d = c.matrix.shape[0], gpt2.config.hidden_size
    for lam in (20000.0, 1.0):
        method = MEMIT(layers=[1, 2], mom2_update_weight=lam)
        method.stats = stats
        for n in (1, 8):
            keys = torch.randn(d_k, n, dtype=torch.float64)
            resid = torch.randn(d, n, dtype=torch.float64)
            fast = resid @ method._key_adjoint(0, name, keys).T
            direct = resid @ torch.linalg.solve(lam * c.damped + keys @ keys.T, keys).T
            torch.testing.assert_close(fast, direct, rtol=1e-7, atol=1e-10)


def test_memit_write_is_atomic(gpt2, tokenizer, stats, monkeypatch):
    """A failure while writing the second layer restores the first one."""
    method = MEMIT(layers=[1, 2], context=CTX, target=Z)
    method.setup(gpt2, tokenizer, stats)
    targets = method.compute_targets(gpt2, tokenizer, REQS[:2])
    before = _state(gpt2)
    real = MEMIT._key_adjoint

    def nan_on_second(self, i, name, keys):
        adj = real(self, i, name, keys)
        return adj * float("nan") if i == 1 else adj

    monkeypatch.setattr(MEMIT, "_key_adjoint", nan_on_second)
    with pytest.raises(FloatingPointError, match="not finite"):
        method.write(gpt2, tokenizer, targets)
    _assert_same(gpt2, before)
    monkeypatch.setattr(MEMIT, "_key_adjoint", real)
    deltas = method.write(gpt2, tokenizer, targets).deltas
    assert sorted(deltas) == sorted(method.module_names) and all(d.norm() > 0 for d in deltas.values())


# ---------------------------------------------------------------------------------------------------- AlphaEdit


def test_alphaedit_leaves_protected_keys_unchanged(gpt2, tokenizer, stats):
    names = [mlp_out_name(gpt2, l) for l in (1, 2)]
    evals = [torch.linalg.eigvalsh(stats.get(n).matrix) for n in names]
    threshold = max(e.median().item() for e in evals)  # a null space of about half the dimensions
    assert all(threshold < e.max().item() for e in evals)
    method = AlphaEdit(layers=[1, 2], context=CTX, target=Z, nullspace_threshold=threshold)
    method.setup(gpt2, tokenizer, stats)
    before = {n: weight_view(gpt2, n).detach().clone() for n in names}
    edit(method, gpt2, tokenizer, REQS[:2])
    g = torch.Generator().manual_seed(0)
    for n in names:
        dw = (weight_view(gpt2, n).detach() - before[n]).double()
        P = method.projector(n)
        assert 0 < torch.linalg.matrix_rank(P) < P.shape[0]
        torch.testing.assert_close(P @ P, P, atol=1e-10, rtol=0)
        assert dw.norm() > 0
        r = torch.randn(P.shape[0], 16, dtype=torch.float64, generator=g)
        protected = (torch.eye(P.shape[0], dtype=torch.float64) - P) @ r  # range of I − P
        free = P @ r
        assert (dw @ protected).norm() <= 1e-5 * dw.norm() * protected.norm()
        assert (dw @ free).norm() > 1e-2 * dw.norm() * free.norm() / math.sqrt(free.shape[0])
        # The keys of this batch are now part of the accumulated K_p K_pᵀ.
        r = method.null_bases[n].shape[1]
        assert method.null_kkt[n].shape == (r, r) and method.null_kkt[n].trace() > 0


def test_alphaedit_projector_and_failed_write_leave_no_trace(gpt2, tokenizer, stats, monkeypatch):
    c = stats.get(mlp_out_name(gpt2, 1)).matrix
    with pytest.raises(ValueError, match="no eigenvalue.*raise the threshold"):
        null_space_projector(c, threshold=0.0)
    method = AlphaEdit(layers=[1, 2], context=CTX, target=Z, nullspace_threshold=float(torch.linalg.eigvalsh(c).max()) * 2)
    method.setup(gpt2, tokenizer, stats)
    targets = method.compute_targets(gpt2, tokenizer, REQS[:1])
    before = _state(gpt2)
    monkeypatch.setattr("eac_lightning.methods.memit.residual_at_subject",
                        lambda *a, **k: (_ for _ in ()).throw(RuntimeError("interrupted")))
    with pytest.raises(RuntimeError, match="interrupted"):
        method.write(gpt2, tokenizer, targets)
    _assert_same(gpt2, before)
    assert method.null_kkt == {}


def test_alphaedit_solve_in_the_null_space_equals_the_published_solve():
    """U₀(U₀ᵀMU₀ + αI)⁻¹U₀ᵀK (what AlphaEdit runs) equals (P(KKᵀ + K_pK_pᵀ) + αI)⁻¹PK (AlphaEdit Eq. 15, as its
    code forms it) with G = U₀ᵀK_pK_pᵀU₀ accumulated batch by batch; α = 0 falls back from Cholesky to least squares."""
    g = torch.Generator().manual_seed(0)
    d, n = 48, 5
    a = torch.randn(d, 200, dtype=torch.float64, generator=g)
    cov = a @ a.T / 200
    cov[:, :] = cov + torch.diag(torch.logspace(-4, 1, d, dtype=torch.float64))  # eigenvalues across the threshold
    threshold = float(torch.linalg.eigvalsh(cov).median())
    basis, P = null_space_basis(cov, threshold), null_space_projector(cov, threshold)
    assert 0 < basis.shape[1] < d and torch.allclose(basis @ basis.T, P)
    past = [torch.randn(d, n, dtype=torch.float64, generator=g) for _ in range(3)]
    kp = sum(k @ k.T for k in past)
    null_kkt = sum((basis.T @ k) @ (basis.T @ k).T for k in past)
    keys = torch.randn(d, n, dtype=torch.float64, generator=g)
    for l2 in (10.0, 1e-3):
        published = torch.linalg.solve(P @ (keys @ keys.T + kp) + l2 * torch.eye(d, dtype=torch.float64), P @ keys)
        torch.testing.assert_close(null_space_solve(basis, null_kkt, keys, l2), published, rtol=1e-9, atol=1e-11)
    # α = 0 with fewer edits than null-space dimensions: the r × r system is singular, the minimum-norm solution
    assert torch.isfinite(null_space_solve(basis, torch.zeros(basis.shape[1], basis.shape[1], dtype=torch.float64),
                                           keys, 0.0)).all()


def test_alphaedit_state_saved_as_k_p_k_p_t_loads_into_the_null_space(gpt2, tokenizer, stats):
    """A checkpoint or edit-log snapshot written when AlphaEdit kept K_pK_pᵀ (d_k × d_k, ``past_kkt``) resumes to the
    same record G = U₀ᵀK_pK_pᵀU₀, whether it is loaded before or after setup."""
    names = [mlp_out_name(gpt2, l) for l in (1, 2)]
    threshold = max(torch.linalg.eigvalsh(stats.get(n).matrix).median().item() for n in names)
    g = torch.Generator().manual_seed(1)
    keys = {n: torch.randn(stats.get(n).matrix.shape[0], 3, generator=g) for n in names}
    live = AlphaEdit(layers=[1, 2], context=CTX, target=Z, nullspace_threshold=threshold)
    live.setup(gpt2, tokenizer, stats)
    live._accumulate_keys(keys)
    old_state = {**live.state_dict(), "past_kkt": {n: k.double() @ k.double().T for n, k in keys.items()}}
    del old_state["null_kkt"]
    for load_first in (False, True):
        resumed = AlphaEdit(layers=[1, 2], context=CTX, target=Z, nullspace_threshold=threshold)
        if load_first:
            resumed.load_state_dict(old_state)
            resumed.setup(gpt2, tokenizer, stats)
        else:
            resumed.setup(gpt2, tokenizer, stats)
            resumed.load_state_dict(old_state)
        for n in names:
            torch.testing.assert_close(resumed.null_kkt[n], live.null_kkt[n], rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------------------------------------- FT


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_ft_problem_hook_equals_a_real_weight_change(tokenizer, family):
    """FT adds Δx through a hook; that must equal editing W (Conv1D and Linear orientation)."""
    model = make_tiny_model(family, len(tokenizer))
    problem = FTProblem(model, tokenizer, REQS[:2], [1, 2], FTHyperParams())
    delta = torch.randn_like(problem.v0) * 1e-2
    with torch.no_grad():
        hooked = problem.loss(delta)[0]
        for name, d in zip(problem.names, problem.split(delta)):
            weight_view(model, name).add_(d)
        direct = FTProblem(model, tokenizer, REQS[:2], [1, 2], FTHyperParams()).loss(torch.zeros_like(delta))[0]
    torch.testing.assert_close(hooked, direct, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("preset", ["ft", "ft-en"])
def test_ft_and_ft_en_reduce_the_target_loss_within_the_norm_bound(gpt2, tokenizer, preset):
    from eac_lightning.editor import method_from_preset

    method = method_from_preset(preset)
    method.layers = [1]
    method.target = FTHyperParams(num_steps=10, lr=1e-3, norm_constraint=2e-3)
    method.setup(gpt2, tokenizer)
    name = mlp_out_name(gpt2, 1)
    w0 = weight_view(gpt2, name).detach().clone()
    nll0 = _target_nll(gpt2, tokenizer, REQ)
    deltas = edit(method, gpt2, tokenizer, [REQ]).deltas
    change = weight_view(gpt2, name).detach() - w0
    torch.testing.assert_close(deltas[name], change, atol=1e-7, rtol=0)
    assert change.abs().max() <= 2e-3 * (1 + 1e-5)  # FT-L's L∞ constraint
    assert change.abs().max() > 1e-4
    assert _target_nll(gpt2, tokenizer, REQ) < nll0
    if preset == "ft-en":
        assert method.eac is not None and method.eac.anchors == "none"


# -------------------------------------------------------------------------------------- failures leave no change


def _nan_after_validation(hp, **fields):
    """Hyper-parameters refuse NaN when built; set afterwards, they make the optimisation itself produce
    NaN, the fault these tests inject."""
    for k, v in fields.items():
        setattr(hp, k, v)
    return hp


@pytest.mark.parametrize(
    "make",
    [
        lambda: ROME(layer=1, context=CTX, mom2_adjustment=False,
                     target=_nan_after_validation(TargetHyperParams(), weight_decay=NAN)),
        lambda: ROME(layer=1, context=CTX, mom2_adjustment=False,
                     target=_nan_after_validation(TargetHyperParams(), weight_decay=NAN), eac=EACHyperParams()),
        lambda: MEMIT(layers=[1, 2], context=CTX, target=_nan_after_validation(TargetHyperParams(), weight_decay=NAN)),
        # Δ becomes NaN after one step
        lambda: FT(layers=[1], target=_nan_after_validation(FTHyperParams(), norm_constraint=NAN)),
    ],
    ids=["rome", "rome-eac", "memit", "ft"],
)
def test_nan_in_optimisation_raises_and_changes_nothing(gpt2, tokenizer, stats, make):
    method = make()
    method.setup(gpt2, tokenizer, stats)
    before = _state(gpt2)
    with pytest.raises(EditOptimisationError) as err:
        edit(method, gpt2, tokenizer, REQS[:2])
    assert "test (row 0)" in str(err.value) and "nothing was applied" in str(err.value)
    _assert_same(gpt2, before)


# ------------------------------------------------------------------------------------------ the knowledge testbed
# Random models cannot be driven to a target (near-uniform logits; ROME's decay 0.5·‖δ‖/‖v₀‖² dominates when
# ‖v₀‖ is tiny), so editing *success* is measured on the tiny testbed: a GPT-2 trained on the shared CounterFact and
# ZsRE facts. Requests are facts it demonstrably knows (pre-edit greedy continuation = target_true), rewritten to
# target_new, edited at the layers chosen for it (testbed.json).


@pytest.fixture(scope="module")
def testbed(tiny_testbed):
    """(model, tokenizer, default layers, covariance store, known facts) of the tiny testbed."""
    from eac_lightning.data.sources import load_requests
    from eac_lightning.evaluation.probes import known_facts
    from eac_lightning.models.loading import default_layers, load_model
    from eac_lightning.paths import data_dir

    model, tok = load_model(str(tiny_testbed))
    # The first records of each shared fact file (the tiny preset trains on a prefix of each).
    requests = [r for name in ("counterfact", "zsre") for r in load_requests(data_dir() / name, limit=60)]
    known = known_facts(model, tok, requests)
    assert len(known) >= 8, (
        f"the tiny testbed knows only {len(known)} of {len(requests)} shared facts (greedy continuation = "
        "target_true); editing success cannot be measured on it - the testbed needs rebuilding (eac_lightning/testbed)"
    )
    layers = default_layers(model)
    stats = CovarianceStore(model, tok, num_tokens=16_384, seq_len=128, batch_size=16)
    stats.prefetch(sorted({mlp_out_name(model, l) for l in (layers.rome, *layers.memit)}))
    return model, tok, layers, stats, known


def _greedy_hits(model, tok, requests) -> list[bool]:
    """Whether greedy decoding of each prompt reproduces target_new exactly."""
    from eac_lightning.evaluation.scoring import score_targets

    return [s.pred == s.target for s in score_targets(model, tok, [r.prompt_text for r in requests],
                                                      [r.target_new for r in requests])]


P50 = EACHyperParams(gamma=50.0, lam=0.1, mu=0.05)


@pytest.mark.slow
@pytest.mark.parametrize(("write_aware", "eac", "at_least"), [(False, None, 4), (False, P50, 4), (True, None, 6),
                                                               (True, P50, 5)],
                         ids=["rome", "rome-eac-p50", "rome-write-aware", "rome-eac-p50-write-aware"])
def test_rome_makes_the_target_the_greedy_continuation(testbed, write_aware, eac, at_least):
    """ROME (and ROME-EAC) make target_new the greedy continuation of 8 known facts: at least half with the
    published target, more with the write-aware one (measured 6 / 6 / 7 / 6 in the order of the parameters). EAC
    runs at P50 here: the tiny model's v* has 128 dimensions and P85's 19 anchors write few."""
    model, tok, layers, stats, known = testbed
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    hits = []
    try:
        method = ROME(layer=layers.rome, context=ContextTemplateParams(length_count=[[5, 5]]), eac=eac,
                      write_aware=write_aware)
        method.setup(model, tok, stats)
        for r in known[:8]:
            assert not _greedy_hits(model, tok, [r])[0]
            edit(method, model, tok, [r])
            hits.append(_greedy_hits(model, tok, [r])[0])
            model.load_state_dict(saved)
    finally:
        model.load_state_dict(saved)
    assert sum(hits) >= at_least, f"{'ROME-EAC' if eac else 'ROME'} wrote {sum(hits)} of 8 known facts: {hits}"


@pytest.mark.slow
def test_memit_batch_of_eight_succeeds(testbed):
    """A write-aware MEMIT batch of 8 known facts, over the testbed's two MEMIT layers, makes target_new the greedy
    continuation of at least 6 (7, 7, 7 measured on three batches; the published targets: 6, 4, 3)."""
    model, tok, layers, stats, known = testbed
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    batch = known[:8]
    try:
        method = MEMIT(layers=list(layers.memit), write_aware=True, **TESTBED_MEMIT)
        method.setup(model, tok, stats)
        assert sum(_greedy_hits(model, tok, batch)) == 0
        edit(method, model, tok, batch)
        hits = _greedy_hits(model, tok, batch)
        assert sum(hits) >= 6, f"MEMIT wrote {sum(hits)} of 8 edits: {hits}"
    finally:
        model.load_state_dict(saved)


@pytest.mark.slow
def test_memit_batch_of_eight_realises_its_targets(testbed):
    """MEMIT's batch closed form (Eq. 14-16) writes all 8 targets at once: afterwards the residual at each prompt's
    last subject token is within 25% of ‖z − h‖ of its z (0.07-0.22 measured; λ = 10 and clamp 4 because the
    published λ = 20000 / clamp 0.75 write nothing on this model, docs/testbed.md). With the published targets the
    edited model still predicts few of them: the write is right, the other tokens' share of it is not."""
    model, tok, layers, stats, known = testbed
    batch = known[:8]
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        method = MEMIT(layers=[layers.rome], **TESTBED_MEMIT)
        method.setup(model, tok, stats)
        targets = method.compute_targets(model, tok, batch)
        z = torch.stack([t.v0 + t.delta for t in targets])
        v0 = torch.stack([t.v0 for t in targets])
        torch.testing.assert_close(residual_at_subject(model, tok, batch, layers.rome), v0, atol=1e-4, rtol=1e-4)
        method.write(model, tok, targets)
        error = (residual_at_subject(model, tok, batch, layers.rome) - z).norm(dim=1) / (z - v0).norm(dim=1)
        assert (error < 0.25).all(), f"relative residual error after the batch write: {error.tolist()}"
    finally:
        model.load_state_dict(saved)
