"""B-EAC: Layer-wise Anchor Selection (bounded overlap, spread, enough anchors), Rolling Anchor Refresh (avoidance,
checkpoint round trip, resumed == uninterrupted), exact zeros outside the anchors, composition with AlphaEdit."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch

from eac_lightning.data.requests import EditRequest
from eac_lightning.methods.base import restore_weights, snapshot
from eac_lightning.methods.beac import BEAC, BEACMEMIT, LayeredTarget
from eac_lightning.methods.beac_plan import (
    AnchorKeyRecord,
    AnchorPlan,
    BEACHyperParams,
    auto_overlap,
    plan_anchors,
    rar_penalty,
)
from eac_lightning.methods.eac import EACHyperParams
from eac_lightning.methods.edit import edit
from eac_lightning.methods.memit import MEMIT
from eac_lightning.methods.target import ContextTemplateParams, TargetHyperParams
from eac_lightning.models.adapters import mlp_out_name, weight_view
from eac_lightning.stats.covariance import CovarianceStore
from tests.conftest import make_tiny_model

FACTS = [
    ("{} is located in", "The Eiffel Tower", "Rome"),
    ("{} speaks", "Danielle Darrieux", "English"),
    ("{} is located in", "Angola", "Europe"),
    ("{} plays the", "Toko Yasuda", "piano"),
    ("{} is the capital of", "Rome", "France"),
    ("{} was founded by", "Apple", "Paris"),
]


def requests(idx):
    return [EditRequest(prompt=FACTS[i][0], subject=FACTS[i][1], target_new=FACTS[i][2]) for i in idx]


def check_plan(plan: AnchorPlan, k: int, cap: int, r: int, n_layers: int) -> None:
    masks = plan.masks  # (n, L, d)
    assert int(masks.sum(0).max()) <= cap  # bounded overlap in every (layer, dimension)
    per_dim_layers = masks.sum(1)  # (n, d): in how many layers each anchor dimension is written
    assert set(per_dim_layers[per_dim_layers > 0].tolist()) <= {r}
    assert (masks.any(1).sum(1) == k).all()  # every edit keeps all its anchors
    quota = math.ceil(k * r / n_layers)
    assert int(masks.sum(2).max()) <= quota  # spread over the layers


# ---------------------------------------------------------------------------------------------------------------
# The planner alone
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cap,r", [(1, 1), (2, 1), (3, 2), (5, 3), (4, None)])
def test_las_bounded_overlap_random_scores(cap, r):
    """r = None (the preset) writes every anchor dimension in all L layers."""
    gen = torch.Generator().manual_seed(cap * 10 + (r or 0))
    n, d, L, k = 12, 64, 3, 8
    scores = torch.randn(n, d, generator=gen)
    plan = plan_anchors(scores, k, L, BEACHyperParams(max_overlap=cap, layers_per_anchor=r))
    check_plan(plan, k, cap, r or L, L)
    assert plan.overlap <= cap and plan.capacity == cap


def test_las_separates_colliding_edits():
    """Edits whose scores agree (the same outlier dimensions win everywhere) collide without LAS, not with it."""
    gen = torch.Generator().manual_seed(0)
    n, d, L, k = 10, 48, 3, 6
    shared = torch.zeros(d)
    shared[:k] = 10.0
    scores = shared + 0.1 * torch.randn(n, d, generator=gen)
    no_las = plan_anchors(scores, k, L, BEACHyperParams(las=False))
    assert no_las.overlap == n  # every edit on the same rows of every layer
    assert (no_las.masks.any(1)[:, :k]).all()
    las = plan_anchors(scores, k, L, BEACHyperParams(max_overlap=2))
    check_plan(las, k, 2, L, L)
    # Each edit still gets its best dimensions first: the shared top-k are used as far as the bound allows.
    assert int(las.masks[:, :, :k].sum()) == 2 * L * k


def test_las_auto_overlap_and_infeasible_batch():
    n, d, L, k = 40, 32, 2, 8
    cap = auto_overlap(n, k, L, d, L, 2.0)  # the preset writes every anchor dimension in all L layers
    plan = plan_anchors(torch.randn(n, d), k, L, BEACHyperParams())
    assert plan.capacity == cap and plan.overlap <= cap
    with pytest.raises(ValueError, match="max_overlap"):
        plan_anchors(torch.randn(n, d), k, L, BEACHyperParams(max_overlap=1, min_anchor_fraction=1.0))


def test_las_is_deterministic_and_rotates():
    scores = torch.randn(6, 32, generator=torch.Generator().manual_seed(1))
    hp = BEACHyperParams(max_overlap=1)
    a = plan_anchors(scores, 4, 2, hp, start=0)
    b = plan_anchors(scores, 4, 2, hp, start=0)
    assert torch.equal(a.masks, b.masks)
    check_plan(plan_anchors(scores, 4, 2, hp, start=3), 4, 1, 2, 2)


def test_las_without_a_bound_takes_each_edits_top_k():
    """A bound no cell reaches (c ≥ n) leaves each edit its own top-k, in every layer: the plan of the ablation
    "B-EAC (MEMIT) w/o overlap bound" (docs/beac.md § 5.6) is w/o LAS's, still written per layer."""
    gen = torch.Generator().manual_seed(3)
    scores = torch.randn(8, 40, generator=gen)
    for usage in (None, torch.rand(3, 40, generator=gen, dtype=torch.float64) * 5):  # with RAR's penalty too
        unbounded = plan_anchors(scores, 6, 3, BEACHyperParams(max_overlap=8), usage)
        assert torch.equal(unbounded.masks, plan_anchors(scores, 6, 3, BEACHyperParams(las=False), usage).masks)
    # the automatic bound reaches the batch size once k ≥ d / (2·slack) with every anchor in all L layers: at slack 2
    # and anchors at P50 (the testbed's B-EAC) no cell is bounded, and LAS plans each edit's top-k (docs/beac.md § 5.3)
    assert [auto_overlap(50, k, 3, 256, 3, 2.0) >= 50 for k in (64, 100, 128, 192)] == [False, False, True, True]


def test_las_keeps_alike_edits_apart_while_each_can_fill_its_k():
    """LAS's separation (docs/beac.md § 2.7): two alike edits (here the same scores, as one subject's two corrections
    have the same key) take disjoint anchors; with more than d/2 each, they share only what they must."""
    gen = torch.Generator().manual_seed(4)
    scores = torch.rand(4, 16, generator=gen)
    scores[1] = scores[0]
    apart = torch.zeros(4, 4, dtype=torch.bool)
    apart[0, 1] = apart[1, 0] = True
    hp = BEACHyperParams()
    together = plan_anchors(scores, 8, 3, hp).masks.any(1)
    assert int((together[0] & together[1]).sum()) == 8  # without separation both take the same top-8
    for k, shared in ((8, 0), (12, 8)):
        masks = plan_anchors(scores, k, 3, hp, apart=apart).masks
        m = masks.any(1)
        assert (m.sum(1) == k).all() and int((m[0] & m[1]).sum()) == shared
        assert set(masks.sum(1)[masks.sum(1) > 0].tolist()) == {3}  # still written in every layer
    # edits not alike to anyone plan as before
    assert torch.equal(plan_anchors(scores, 8, 3, hp, apart=apart).masks[2:], plan_anchors(scores, 8, 3, hp).masks[2:])
    with pytest.raises(ValueError, match="alike_cosine"):
        BEACHyperParams(alike_cosine=1.5)


def test_rar_penalty_avoids_used_anchors():
    gen = torch.Generator().manual_seed(2)
    n, d, L, k = 4, 40, 2, 5
    scores = 1.0 + 0.05 * torch.rand(n, d, generator=gen)  # nearly flat: usage decides
    usage = torch.zeros(L, d, dtype=torch.float64)
    usage[:, :20] = 5.0  # the first half carried many earlier edits
    assert rar_penalty(None, 1.0) is None and rar_penalty(torch.zeros(L, d), 1.0) is None
    pi = rar_penalty(usage, 1.0)
    assert pi[:, :20].max() < pi[:, 20:].min()
    with_rar = plan_anchors(scores, k, L, BEACHyperParams(max_overlap=2), usage)
    without = plan_anchors(scores, k, L, BEACHyperParams(max_overlap=2, rar=False), usage)
    assert int(with_rar.masks[:, :, :20].sum()) == 0
    assert int(without.masks[:, :, :20].sum()) > 0
    no_las = plan_anchors(scores, k, L, BEACHyperParams(las=False), usage)
    assert int(no_las.masks[:, :, :20].sum()) == 0


# ---------------------------------------------------------------------------------------------------------------
# The method on a tiny model
# ---------------------------------------------------------------------------------------------------------------
SMALL = dict(
    layers=[0, 1, 2],
    target=TargetHyperParams(num_steps=4, clamp_norm_factor=0.75),
    context=ContextTemplateParams(length_count=[[2, 1]]),
)
EAC = EACHyperParams(gamma=75.0)


@pytest.fixture(scope="module")
def model_and_stats(tokenizer):
    model = make_tiny_model("gpt2", len(tokenizer))
    stats = CovarianceStore(model, tokenizer, num_tokens=2048, seq_len=32, batch_size=16)
    return model, stats


def fresh(model_and_stats, cls=BEACMEMIT, **kw):
    model, stats = model_and_stats
    m = copy.deepcopy(model)
    return m, cls(**SMALL, eac=EAC, **kw), stats


def test_beac_edit_bounded_overlap_and_zero_rows(model_and_stats, tokenizer):
    model, method, stats = fresh(model_and_stats, beac=BEACHyperParams(max_overlap=1))
    method.setup(model, tokenizer, stats)
    targets = method.compute_targets(model, tokenizer, requests(range(4)))
    assert all(isinstance(t, LayeredTarget) for t in targets)
    masks = torch.stack([t.layer_masks for t in targets])  # (n, L, d)
    d = model.config.n_embd
    k = math.ceil(d * 0.25)
    check_plan(AnchorPlan(masks, 0.0, 0, 1, [k] * 4), k, 1, 3, 3)
    for t in targets:
        assert torch.equal(t.anchors, t.layer_masks.any(0))
        assert (t.delta[~t.anchors] == 0).all()  # z's non-anchors stay exactly zero (EAC Eq. 3)
        assert t.delta.abs().sum() > 0
    before = {n: weight_view(model, n).detach().clone() for n in method.module_names}
    deltas = method.write(model, tokenizer, targets).deltas
    for li, layer in enumerate(method.layers):
        name = mlp_out_name(model, layer)
        used = masks[:, li].any(0)
        assert (deltas[name][~used] == 0).all()  # rows no edit anchors at this layer are untouched
        assert deltas[name][used].abs().sum(1).gt(0).all()
        assert torch.equal(weight_view(model, name)[~used], before[name][~used])
    assert method.batches == 1 and torch.equal(method.usage, masks.sum(0).double())


def test_without_las_and_rar_beac_is_memit_eac(model_and_stats, tokenizer):
    """The ablation grid closes: without LAS every layer writes the whole remaining residual, and without RAR
    nothing is remembered, so B-EAC writes exactly MEMIT-EAC's update (same z, same anchors, same solve)."""
    model_b, beac, stats = fresh(model_and_stats, beac=BEACHyperParams(las=False, rar=False))
    model_m = copy.deepcopy(model_and_stats[0])
    memit_eac = MEMIT(**SMALL, eac=EAC)
    deltas_b = _run(model_b, beac, stats, tokenizer, [[0, 1, 2]])[0]
    deltas_m = _run(model_m, memit_eac, stats, tokenizer, [[0, 1, 2]])[0]
    for name in memit_eac.module_names:
        torch.testing.assert_close(deltas_b[name], deltas_m[name])
    # Above the first layer the residual is dense again (the first write moved h^L in every dimension): every row
    # is written, not only the anchors.
    for name in memit_eac.module_names[1:]:
        assert (deltas_b[name] != 0).any(1).all()


def test_write_aware_beac_writes_its_anchors_under_the_planned_update(model_and_stats, tokenizer):
    """Write-aware B-EAC (docs/beac.md § 2.5): z is optimised under ΔW_l = Σ_i δ_i a_{l,i}ᵀ and exactly that is
    written, so rows outside the batch's anchors stay untouched at every layer; without LAS and RAR it is
    AlphaEdit-EAC with write-aware targets."""
    from eac_lightning.methods.alphaedit import AlphaEdit

    hp = BEACHyperParams(max_overlap=1, key_memory=0.0)
    model, method, stats = fresh(model_and_stats, BEAC, beac=hp, write_aware=True)
    method.setup(model, tokenizer, stats)
    targets = method.compute_targets(model, tokenizer, requests(range(4)))
    assert all(set(t.write_columns) == set(method.layers) for t in targets)
    union = torch.stack([t.anchors for t in targets]).any(0)
    deltas = method.write(model, tokenizer, targets).deltas
    for layer in method.layers:
        name = mlp_out_name(model, layer)
        assert (deltas[name][~union] == 0).all() and deltas[name][union].abs().sum() > 0
        planned = sum(t.delta.double()[:, None] * t.write_columns[layer].double()[None] for t in targets)
        torch.testing.assert_close(deltas[name].double(), planned.to(deltas[name].device), rtol=1e-5, atol=1e-7)
    assert method.batches == 1 and len(method.null_kkt) == 3
    # the ablation grid closes on AlphaEdit-EAC (write-aware)
    off = BEACHyperParams(las=False, rar=False, key_memory=0.0)
    model_b, beac, _ = fresh(model_and_stats, BEAC, beac=off, write_aware=True)
    model_a = copy.deepcopy(model_and_stats[0])
    alpha_eac = AlphaEdit(**SMALL, eac=EAC, write_aware=True)
    for got, want in zip(_run(model_b, beac, stats, tokenizer, BATCHES),
                         _run(model_a, alpha_eac, stats, tokenizer, BATCHES)):
        for name in alpha_eac.module_names:
            torch.testing.assert_close(got[name], want[name])


def test_beac_separates_two_corrections_about_one_subject(model_and_stats, tokenizer):
    """Two corrections about one subject have the same key at the first edited layer (|cos| 1 in C⁻¹): with
    ``alike_cosine`` their anchors are disjoint, the other edits' are not separated."""
    pair = [EditRequest(prompt="{} is located in", subject="Angola", target_new="Europe"),
            EditRequest(prompt="{} speaks", subject="Angola", target_new="English")]
    batch = pair + requests([0, 3])
    hp = BEACHyperParams(key_memory=0.0, alike_cosine=0.9)
    model, method, stats = fresh(model_and_stats, BEAC, beac=hp, write_aware=True)
    method.setup(model, tokenizer, stats)
    alike = method._alike(model, tokenizer, batch)
    assert alike[0, 1] and alike[1, 0] and not alike[0, 2:].any() and not alike[2, 3]
    anchors = torch.stack([t.anchors for t in method.compute_targets(model, tokenizer, batch)])
    assert int((anchors[0] & anchors[1]).sum()) == 0 and anchors[0].any() and anchors[1].any()


def test_write_aware_beac_refuses_what_its_write_cannot_do():
    with pytest.raises(ValueError, match="key_memory"):
        BEACMEMIT(beac=BEACHyperParams(key_memory=1.0), write_aware=True)
    method = BEAC(layers=[0, 1, 2], beac=BEACHyperParams(layers_per_anchor=1, key_memory=0.0),
                           write_aware=True)
    with pytest.raises(ValueError, match="layers_per_anchor"):
        method._check_write_aware()


def test_memit_residual_hook_is_memit_spreading():
    m = MEMIT(layers=[3, 4, 5])
    resid = torch.randn(8, 3, dtype=torch.float64)
    for i in range(3):
        assert torch.equal(m._layer_residual(i, [], resid), resid / (3 - i))


def _run(model, method, stats, tokenizer, batches):
    method.setup(model, tokenizer, stats)
    out = []
    for b in batches:
        out.append(edit(method, model, tokenizer, requests(b)).deltas)
    return out


BATCHES = [[0, 1], [2, 3]]


@pytest.mark.parametrize("cls", [BEACMEMIT, BEAC])
def test_rar_checkpoint_round_trip_and_resume(model_and_stats, tokenizer, cls):
    hp = BEACHyperParams(max_overlap=1, decay=0.5, key_memory=1.0 if cls is BEACMEMIT else 0.0,
                         refresh=0.0 if cls is BEACMEMIT else 1.0)
    # Uninterrupted: two batches.
    m_full, meth_full, stats = fresh(model_and_stats, cls, beac=hp)
    _run(m_full, meth_full, stats, tokenizer, BATCHES)
    # Interrupted after one batch: checkpoint method state and weights, restore into fresh objects, go on.
    m_a, meth_a, _ = fresh(model_and_stats, cls, beac=hp)
    _run(m_a, meth_a, stats, tokenizer, BATCHES[:1])
    buf = io.BytesIO()
    torch.save({"method": meth_a.state_dict(), "model": m_a.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    state = ckpt["method"]
    assert state["beac"]["batches"] == 1 and len(state["beac"]["history"]) == 1
    assert torch.equal(state["beac"]["usage"], meth_a.usage)
    m_b, meth_b, _ = fresh(model_and_stats, cls, beac=hp)
    m_b.load_state_dict(ckpt["model"])
    meth_b.load_state_dict(state)
    assert torch.equal(meth_b.usage, meth_a.usage) and meth_b.templates == meth_a.templates
    _run(m_b, meth_b, stats, tokenizer, BATCHES[1:])
    for name in meth_full.module_names:
        assert torch.equal(weight_view(m_b, name), weight_view(m_full, name)), name
    assert torch.equal(meth_b.usage, meth_full.usage)
    if cls is BEACMEMIT:  # RAR's anchor key record (B5) travels with the checkpoint too
        assert set(state["beac"]["key_record"]) == set(meth_full.module_names)
        for name in meth_full.module_names:
            b, full = meth_b.key_record[name], meth_full.key_record[name]
            assert torch.equal(b.keys, full.keys) and torch.equal(b.weight, full.weight)
            assert torch.equal(b.cells, full.cells)
    assert meth_b.history == meth_full.history and meth_b.batches == 2
    assert meth_b.refresh_record == meth_full.refresh_record
    assert torch.equal(meth_b.last_plan.masks, meth_full.last_plan.masks)
    # Without the restored record, the second batch is planned differently (the state is what makes them equal).
    m_c, meth_c, _ = fresh(model_and_stats, cls, beac=hp)
    m_c.load_state_dict(ckpt["model"])
    meth_c.templates = list(meth_a.templates)
    _run(m_c, meth_c, stats, tokenizer, BATCHES[1:])
    assert not torch.equal(meth_c.last_plan.masks, meth_full.last_plan.masks)
    # The record is rolling: each batch adds its edits (2, and those refreshed) × k anchors × 3 layers, and the
    # earlier batch decays by 0.5.
    k = math.ceil(model_and_stats[0].config.n_embd * 0.25)
    second = 2 + meth_full.history[-1].get("refreshed", 0)
    assert math.isclose(float(meth_full.usage.sum()), k * 3 * (second + 2 * 0.5))


def test_rar_refresh_rewrites_earlier_edits_that_no_longer_hold(model_and_stats, tokenizer):
    """RAR's refresh (docs/beac.md § 2.6): an earlier edit whose prompt no longer yields its target joins the next
    batch (within the budget ceil(refresh·n)), is written with it and moves to the newest slot of the window; an edit
    the batch makes again is not refreshed; the window travels with the checkpoint."""
    hp = BEACHyperParams(max_overlap=1, key_memory=0.0, refresh=0.5, refresh_window=2)
    model, method, stats = fresh(model_and_stats, BEAC, beac=hp, write_aware=False)
    method.setup(model, tokenizer, stats)
    w0 = snapshot(model, method.module_names)
    edit(method, model, tokenizer, requests([0, 1, 2, 3]))
    assert [r.subject for r in method.refresh_record[-1]] == [FACTS[i][1] for i in range(4)]
    restore_weights(model, w0)  # none of the first batch's edits holds any more
    # the batch edits fact 3 again: of 0-2, the budget ceil(0.5·2) = 1 is refreshed
    result = edit(method, model, tokenizer, requests([3, 4]))
    # the batch's own edits are what the run counts; the refreshed one is written, measured and recorded after them
    assert [rec.refreshed for rec in result.records] == [False, False, True]
    assert method.history[-1]["refreshed"] == 1.0
    old, newest = method.refresh_record
    refreshed = newest[2:]
    assert [r.subject for r in newest[:2]] == [FACTS[3][1], FACTS[4][1]] and len(refreshed) == 1
    assert refreshed[0].subject in {FACTS[i][1] for i in range(3)}
    assert result.records[2].request == refreshed[0] and result.records[2].delta_norm > 0
    assert {r.subject for r in old} == {FACTS[i][1] for i in range(3)} - {refreshed[0].subject}
    buf = io.BytesIO()
    torch.save(method.state_dict(), buf)
    buf.seek(0)
    _, restored, _ = fresh(model_and_stats, BEAC, beac=hp, write_aware=False)
    restored.load_state_dict(torch.load(buf, weights_only=True))
    assert restored.refresh_record == method.refresh_record
    # the window holds the latest refresh_window batches
    edit(method, model, tokenizer, requests([5]))
    assert len(method.refresh_record) == 2 and all(r in newest for r in method.refresh_record[0])
    assert all(r in method.refresh_record[-1] for r in old if r in sum(method.refresh_record, []))
    assert method.refresh_record[-1][0].subject == FACTS[5][1]


def test_rar_refresh_over_the_whole_stream_scores_a_seeded_draw(model_and_stats, tokenizer, monkeypatch):
    """``refresh_window: null`` keeps every earlier edit (each once, in the slot of its last write) and
    ``refresh_checks`` scores a uniform draw of that many before a batch, seeded by the batch's number: two runs
    draw alike, and at most the drawn edits are refreshed however large the budget."""
    import eac_lightning.evaluation as evaluation

    scored: list[list[str]] = []
    real = evaluation.score_targets

    def recording(model, tok, prompts, targets, *a, **k):
        scored.append(list(prompts))
        return real(model, tok, prompts, targets, *a, **k)

    monkeypatch.setattr(evaluation, "score_targets", recording)
    hp = BEACHyperParams(max_overlap=1, key_memory=0.0, refresh=4.0, refresh_window=None, refresh_checks=2)
    draws = []
    for _ in range(2):
        scored.clear()
        model, method, stats = fresh(model_and_stats, BEAC, beac=hp, write_aware=False)
        method.setup(model, tokenizer, stats)
        w0 = snapshot(model, method.module_names)
        for batch in ([0, 1, 2], [3], [4]):
            edit(method, model, tokenizer, requests(batch))
            restore_weights(model, w0)  # no earlier edit holds: every drawn one fails its check
        # per batch: the refresh's draw (none before the first), then the ledger's check of what was written; the
        # budget is ceil(4·1) = 4, but only the two drawn edits are scored, so two are refreshed
        assert [len(p) for p in scored] == [3, 2, 3, 2, 3]
        assert method.history[1]["refreshed"] == 2 and method.history[2]["refreshed"] == 2
        assert sorted(r.subject for b in method.refresh_record for r in b) == sorted(FACTS[i][1] for i in range(5))
        draws.append([scored[1], scored[3]])
    assert draws[0] == draws[1]


def test_rar_refresh_off_keeps_no_window(model_and_stats, tokenizer):
    model, method, stats = fresh(model_and_stats, BEAC, beac=BEACHyperParams(max_overlap=1, key_memory=0.0))
    _run(model, method, stats, tokenizer, BATCHES)
    assert method.refresh_record == [] and "refreshed" not in method.history[-1]
    with pytest.raises(ValueError, match="refresh_window"):
        BEACHyperParams(refresh_window=0)


def test_rar_off_keeps_no_record(model_and_stats, tokenizer):
    model, method, stats = fresh(model_and_stats, beac=BEACHyperParams(rar=False, max_overlap=1, key_memory=1.0))
    _run(model, method, stats, tokenizer, BATCHES[:1])
    assert method.usage is None and method.batches == 1 and method.key_record == {}


def test_rar_key_record_rolls_the_written_keys_and_their_anchor_rows(model_and_stats, tokenizer):
    """(B3'): after each batch the record holds its keys on the weights after its write, weight 1, with each edit's
    anchor dimensions; earlier entries decay by ρ."""
    from eac_lightning.methods.target import compute_keys

    model, method, stats = fresh(model_and_stats, beac=BEACHyperParams(max_overlap=1, decay=0.5, key_memory=1.0))
    keys, masks = [], []
    for b in BATCHES:
        _run(model, method, stats, tokenizer, [b])
        keys.append({l: compute_keys(model, tokenizer, requests(b), l, method.templates).double()
                     for l in method.layers})
        masks.append(method.last_plan.masks.any(1))
    for l in method.layers:
        record = method.key_record[mlp_out_name(model, l)]
        torch.testing.assert_close(record.keys, torch.cat([keys[0][l], keys[1][l]]))
        assert record.weight.tolist() == [0.5, 0.5, 1.0, 1.0]
        assert torch.equal(record.cells, torch.cat(masks))


def test_anchor_key_record_drops_faded_entries():
    record = AnchorKeyRecord(torch.ones(2, 3, dtype=torch.float64), torch.tensor([1.0, 0.02], dtype=torch.float64),
                             torch.ones(2, 4, dtype=torch.bool))
    rolled = record.rolled(0.4, torch.zeros(1, 3, dtype=torch.float64), torch.zeros(1, 4, dtype=torch.bool))
    assert rolled.weight.tolist() == [0.4, 1.0]  # 0.02 · 0.4 fell under the floor
    assert torch.equal(rolled.keys, torch.tensor([[1.0] * 3, [0.0] * 3], dtype=torch.float64))


def test_anchor_key_record_solve_is_the_per_row_problem(model_and_stats, tokenizer):
    """The Woodbury rows of :meth:`BEACMEMIT._layer_update` equal the direct solve of (B5) row by row:
    Δw_j = r_j Kᵀ(λC + KKᵀ + η Σ_{o anchors j} w_o k_o k_oᵀ)⁻¹."""
    model, method, stats = fresh(model_and_stats, beac=BEACHyperParams(key_memory=2.0))
    method.setup(model, tokenizer, stats)
    name = method.module_names[0]
    cov = stats.get(name)
    gen = torch.Generator().manual_seed(0)
    d_k, d, n, n_old = cov.matrix.shape[0], model.config.n_embd, 3, 7
    keys = torch.randn(d_k, n, generator=gen, dtype=torch.float64)
    resid = torch.randn(d, n, generator=gen, dtype=torch.float64)
    resid[::3] = 0  # rows no edit anchors here stay unwritten
    old = torch.randn(n_old, d_k, generator=gen, dtype=torch.float64)
    weight = torch.rand(n_old, generator=gen, dtype=torch.float64)
    cells = torch.rand(n_old, d, generator=gen) < 0.4
    method.key_record = {name: AnchorKeyRecord(old, weight, cells)}
    upd, edit_sq = method._layer_update(0, name, keys, resid)
    base = method.mom2_update_weight * cov.damped + keys @ keys.T
    for j in range(d):
        lhs = base + sum((2.0 * weight[o] * torch.outer(old[o], old[o]) for o in range(n_old) if cells[o, j]),
                         torch.zeros_like(base))
        torch.testing.assert_close(upd[j], resid[j] @ torch.linalg.solve(lhs, keys).T)
    # Each request's own share (the ledger's per-edit norm): the update of its residual column alone.
    for i in range(n):
        alone = torch.zeros_like(resid)
        alone[:, i] = resid[:, i]
        torch.testing.assert_close(edit_sq[i], method._layer_update(0, name, keys, alone)[0].pow(2).sum())


def test_memit_per_edit_norm_is_its_own_term(model_and_stats, tokenizer):
    """MEMIT's ΔW_l = R Aᵀ: request i's own term r_i a_iᵀ, whose squared norm the write reports per request."""
    model, method, stats = fresh(model_and_stats, cls=MEMIT)
    method.setup(model, tokenizer, stats)
    name = method.module_names[0]
    gen = torch.Generator().manual_seed(1)
    keys = torch.randn(stats.get(name).matrix.shape[0], 3, generator=gen, dtype=torch.float64)
    resid = torch.randn(model.config.n_embd, 3, generator=gen, dtype=torch.float64)
    upd, edit_sq = method._layer_update(0, name, keys, resid)
    for i in range(3):
        alone = torch.zeros_like(resid)
        alone[:, i] = resid[:, i]
        torch.testing.assert_close(edit_sq[i], method._layer_update(0, name, keys, alone)[0].pow(2).sum())


def test_rar_key_record_keeps_earlier_edits_in_their_anchor_rows(model_and_stats, tokenizer):
    """With RAR's anchor key record (B5) the second batch changes what the first batch's keys read in their own
    anchor rows far less than without it."""
    from eac_lightning.methods.target import compute_keys

    changes = {}
    for eta in (0.0, 1.0):
        model, method, stats = fresh(model_and_stats, beac=BEACHyperParams(max_overlap=1, key_memory=eta))
        method.mom2_update_weight = 0.1  # weak prior: the solve is free to overwrite what it does not remember
        _run(model, method, stats, tokenizer, BATCHES[:1])
        first = method.last_plan.masks.any(1)  # (n, d): the first batch's anchor dimensions
        keys = {l: compute_keys(model, tokenizer, requests(BATCHES[0]), l, method.templates).double().T
                for l in method.layers}
        deltas = _run(model, method, stats, tokenizer, BATCHES[1:])[0]
        changes[eta] = sum(
            float(((deltas[mlp_out_name(model, l)].double() @ keys[l]) * first.T).norm()) for l in method.layers
        )
    assert changes[1.0] < 0.5 * changes[0.0], changes


def test_load_state_rejects_a_malformed_key_record(model_and_stats):
    _, method, _ = fresh(model_and_stats)
    state = method.state_dict()
    name = "transformer.h.0.mlp.c_proj"
    state["beac"]["key_record"] = {name: {"keys": torch.zeros(3, 8), "weight": torch.ones(2),
                                          "cells": torch.zeros(3, 4, dtype=torch.bool)}}
    method.templates = ["{}"]
    with pytest.raises(ValueError, match=f"key_record of {name}.*inconsistent"):
        method.load_state_dict(state)
    assert method.templates == ["{}"] and method.key_record == {}  # nothing of the bad state was applied
    state["beac"]["key_record"] = {name: {"keys": torch.zeros(3, 8)}}
    with pytest.raises(ValueError, match=f"key_record of {name} is malformed"):
        method.load_state_dict(state)


def test_load_state_rejects_a_malformed_refresh_window_and_changes_nothing(model_and_stats):
    _, method, _ = fresh(model_and_stats, BEAC, beac=BEACHyperParams(key_memory=0.0, refresh=0.2))
    state = method.state_dict()
    state["templates"] = ["{} changed"]
    state["beac"]["batches"] = 7
    state["beac"]["refresh_record"] = [[{"prompt": "{} is in", "subject": "X", "target_new": "Y", "shell": "rm"}]]
    with pytest.raises(ValueError, match="refresh_record is malformed"):
        method.load_state_dict(state)
    assert method.batches == 0 and method.templates is None and method.refresh_record == []


def test_load_state_rejects_other_layers(model_and_stats):
    _, method, _ = fresh(model_and_stats)
    state = method.state_dict()
    state["beac"]["layers"] = [5, 6]
    with pytest.raises(ValueError, match="layers"):
        method.load_state_dict(state)


def test_key_memory_is_for_memits_solve_only():
    with pytest.raises(ValueError, match="key_memory"):
        BEAC(beac=BEACHyperParams(key_memory=1.0))


def test_beac_needs_anchors():
    with pytest.raises(ValueError, match="anchors"):
        BEACMEMIT(eac=EACHyperParams(anchors="none"))


def test_presets_load():
    from eac_lightning.editor import method_from_preset

    full = method_from_preset("beac")  # over AlphaEdit's solve, write-aware, with RAR's refresh
    assert isinstance(full, BEAC) and full.beac.las and full.beac.rar and full.label == "B-EAC"
    assert full.write_aware and full.l2 == 10.0
    # RAR's refresh over the whole stream: a batch's worth at most, from 1,000 earlier edits drawn per batch
    assert (full.beac.refresh, full.beac.refresh_window, full.beac.refresh_checks) == (1.0, None, 1000)
    assert not method_from_preset("beac-no-las").beac.las
    assert not method_from_preset("beac-no-rar").beac.rar
    assert [method_from_preset(p).label for p in ("beac-no-las", "beac-no-rar")] == ["B-EAC w/o LAS", "B-EAC w/o RAR"]
    over_memit = method_from_preset("beac-memit")
    assert isinstance(over_memit, BEACMEMIT) and over_memit.beac.key_memory == 1.0 and over_memit.label == "B-EAC (MEMIT)"
    assert [method_from_preset(p).label for p in ("beac-memit-no-las", "beac-memit-no-rar")] == [
        "B-EAC (MEMIT) w/o LAS", "B-EAC (MEMIT) w/o RAR"]


def test_null_space_solve_with_counted_keys_is_the_solve_without_their_earlier_entry():
    """B8 (docs/beac.md § 2.6): when the last keys of a batch are already in G (a re-written edit's first write),
    solving with only the first ``counted`` in KKᵀ equals the solve whose record never held them."""
    from eac_lightning.methods.alphaedit import null_space_solve

    g = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(12, 7, generator=g, dtype=torch.float64))
    old = torch.randn(12, 5, generator=g, dtype=torch.float64)  # earlier edits' keys
    keys = torch.randn(12, 4, generator=g, dtype=torch.float64)  # 3 new edits, then 1 re-written earlier edit
    keys[:, 3] = old[:, 4]
    kept = basis.T @ old[:, :4]
    without = kept @ kept.T
    every = basis.T @ old
    held = every @ every.T
    replaced = null_space_solve(basis, held, keys, 10.0, counted=3)
    torch.testing.assert_close(replaced, null_space_solve(basis, without, keys, 10.0), rtol=1e-10, atol=1e-12)
    # added again (the default), the re-written key counts twice and its column of the solve is smaller
    added = null_space_solve(basis, held, keys, 10.0)
    assert (keys[:, 3] @ added[:, 3]) < (keys[:, 3] @ replaced[:, 3])


@pytest.mark.parametrize("replaces", [False, True])
def test_rar_refreshed_key_replaces_its_entry_in_alphaedits_record(model_and_stats, tokenizer, replaces):
    """With ``refresh_replaces_key`` AlphaEdit's record grows by the batch's new edits' keys only (a re-written
    edit's key is in it once, from its first write), and the edit log's step holds what the record added, so a
    replay rebuilds the same record; without it the re-written keys are added again."""
    hp = BEACHyperParams(max_overlap=1, key_memory=0.0, refresh=2.0, refresh_window=None,
                         refresh_replaces_key=replaces)
    model, method, stats = fresh(model_and_stats, BEAC, beac=hp, write_aware=False)
    method.setup(model, tokenizer, stats)
    w0 = snapshot(model, method.module_names)
    edit(method, model, tokenizer, requests([0, 1, 2]))
    before = {n: g.clone() for n, g in method.null_kkt.items()}
    restore_weights(model, w0)  # none of the first batch's edits holds any more
    result = edit(method, model, tokenizer, requests([3]))
    assert [rec.refreshed for rec in result.records] == [False, True, True]
    for name, g in method.null_kkt.items():
        keys = method._step_keys[name].double()
        assert keys.shape[1] == (1 if replaces else 3)
        projected = method.null_bases[name].T @ keys
        torch.testing.assert_close(g - before[name], projected @ projected.T)
    replay = copy.deepcopy(method)
    replay.null_kkt = before
    replay.replay_step(method.step_state())
    for name, g in method.null_kkt.items():
        torch.testing.assert_close(replay.null_kkt[name], g)


def test_refresh_replaces_key_is_beac_only():
    with pytest.raises(ValueError, match="refresh_replaces_key"):
        BEACMEMIT(beac=BEACHyperParams(refresh=0.5, refresh_replaces_key=True))


def test_record_weight_scales_alphaedits_record_in_the_solve(model_and_stats, tokenizer):
    """B9 (docs/beac.md § 2.6): ``record_weight`` w solves (wG + U₀ᵀKKᵀU₀ + αI)⁻¹U₀ᵀK; at w = 1 it is AlphaEdit's Eq. 15,
    and a larger w moves less of what the earlier keys read."""
    from eac_lightning.methods.alphaedit import null_space_solve

    hp = BEACHyperParams(max_overlap=1, key_memory=0.0, record_weight=3.0)
    model, method, stats = fresh(model_and_stats, BEAC, beac=hp, write_aware=False)
    method.setup(model, tokenizer, stats)
    edit(method, model, tokenizer, requests([0, 1, 2]))
    name = method.module_names[0]
    g, basis = method.null_kkt[name], method.null_bases[name]
    keys = method._step_keys[name].double()[:, :2] + 0.1  # keys alike the recorded ones
    weighted = method._key_adjoint(0, name, keys)
    torch.testing.assert_close(weighted, null_space_solve(basis, 3.0 * g, keys, method.l2))
    method.beac.record_weight = 1.0
    plain = method._key_adjoint(0, name, keys)
    torch.testing.assert_close(plain, null_space_solve(basis, g, keys, method.l2))
    old = method._step_keys[name].double()
    # what the earlier keys read moves less: ‖K_oldᵀ A‖ shrinks as w grows
    assert (old.T @ weighted).norm() < (old.T @ plain).norm()
    with pytest.raises(ValueError, match="record_weight"):
        BEACMEMIT(beac=BEACHyperParams(record_weight=2.0))
