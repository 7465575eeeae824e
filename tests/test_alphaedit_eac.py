"""AlphaEdit-EAC: EAC's anchors and scored elastic net on AlphaEdit's z (EAC Eq. 1-6), AlphaEdit's null-space write,
for single edits and batches (plain and write-aware targets), and its presets."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model

from eac_lightning.data.requests import EditRequest
from eac_lightning.editor import METHOD_PRESETS, method_from_preset
from eac_lightning.methods import (
    AlphaEdit,
    ContextTemplateParams,
    EACHyperParams,
    TargetHyperParams,
)
from eac_lightning.methods.eac import anchor_count
from eac_lightning.models.adapters import mlp_out_name, weight_view
from eac_lightning.paths import CONFIGS_DIR

Z = TargetHyperParams(num_steps=8, clamp_norm_factor=0.75)
CTX = ContextTemplateParams(length_count=[[4, 2]])
EAC = EACHyperParams(gamma=80.0)
REQS = [
    EditRequest(prompt="{} is located in", subject="The Eiffel Tower", target_new="Rome", source="test", source_index=0),
    EditRequest(prompt="{} speaks", subject="Danielle Darrieux", target_new="English", source="test", source_index=1),
]


@pytest.fixture(scope="module")
def gpt2(tokenizer):
    return make_tiny_model("gpt2", len(tokenizer), seed=1)


@pytest.mark.parametrize("batch, write_aware", [(1, False), (2, False), (2, True)])
def test_alphaedit_eac_z_is_zero_outside_its_anchors_and_the_write_stays_in_the_null_space(
        gpt2, tokenizer, stats, batch, write_aware):
    names = [mlp_out_name(gpt2, l) for l in (1, 2)]
    threshold = max(torch.linalg.eigvalsh(stats.get(n).matrix).median().item() for n in names)
    method = AlphaEdit(layers=[1, 2], context=CTX, target=Z, nullspace_threshold=threshold, eac=EAC,
                       write_aware=write_aware)
    assert method.label == "AlphaEdit-EAC"
    method.setup(gpt2, tokenizer, stats)
    saved = {n: weight_view(gpt2, n).detach().clone() for n in names}
    try:
        targets = method.compute_targets(gpt2, tokenizer, REQS[:batch])
        d = targets[0].v0.shape[0]
        for t in targets:  # EAC Eq. 2-3: round((100-γ)%·d) anchors, every other dimension of δ exactly zero
            assert t.anchors is not None and int(t.anchors.sum()) == anchor_count(d, EAC.gamma)
            assert t.delta[~t.anchors].eq(0).all() and t.delta[t.anchors].ne(0).any()
        deltas = method.write(gpt2, tokenizer, targets).deltas
        for n in names:  # AlphaEdit Eq. 12-15: ΔW(I − P) = 0, keys in the protected subspace are left unchanged
            dw = deltas[n].double()  # the update itself (the float32 weights round a change this small)
            assert not torch.equal(weight_view(gpt2, n), saved[n])
            P = method.projector(n)
            assert dw.norm() > 0
            assert (dw @ (torch.eye(P.shape[0], dtype=torch.float64) - P)).norm() <= 1e-5 * dw.norm()
            assert method.null_kkt[n].trace() > 0
    finally:
        for n, w in saved.items():
            weight_view(gpt2, n).data.copy_(w)


def test_alphaedit_eac_presets_compose_alphaedit_with_eac():
    method = method_from_preset("alphaedit-eac")
    plain = method_from_preset("alphaedit")
    assert type(method) is AlphaEdit and method.label == "AlphaEdit-EAC" and plain.label == "AlphaEdit"
    assert (method.nullspace_threshold, method.l2, method.target) == (plain.nullspace_threshold, plain.l2, plain.target)
    assert method.eac == method_from_preset("memit-eac").eac  # EAC values shared with MEMIT-EAC
    tb = method_from_preset(METHOD_PRESETS / "alphaedit-eac.yaml", CONFIGS_DIR / "testbed" / "alphaedit-eac.yaml")
    assert tb.write_aware and tb.eac is not None and tb.target.clamp_norm_factor == 4.0


def _known_stream_reliability(folder, *overlays, settings_for: str | None = "testbed:tiny") -> float:
    """Reliability after a stream of single edits of the first 20 shipped CounterFact records (all known to
    testbed:tiny; ``--data.shuffle false`` on the CLI) with ``overlays`` and, with ``settings_for``, that model's
    measured settings."""
    from eac_lightning.data.sources import load_requests
    from eac_lightning.evaluation.edit_metrics import compute_locality_reference, evaluate_edit_metrics
    from eac_lightning.methods.edit import edit
    from eac_lightning.models.loading import load_model
    from eac_lightning.paths import data_dir
    from eac_lightning.stats.covariance import CovarianceStore

    model, tok = load_model(str(folder))
    method = method_from_preset("alphaedit-eac", *overlays, model=settings_for)
    method.setup(model, tok, CovarianceStore(model, tok, num_tokens=100_000))  # the CLI's stats_tokens
    requests = load_requests(data_dir() / "counterfact", limit=20)
    ref = compute_locality_reference(model, tok, requests)
    for r in requests:
        edit(method, model, tok, [r])
    return evaluate_edit_metrics(model, tok, requests, ref, rome_scores=False)["reliability"]


@pytest.mark.slow
def test_alphaedit_eac_writes_a_single_edit_stream_on_tiny_with_its_ridge_scaled(tiny_testbed):
    """AlphaEdit's α = 10 is 5-7 times the null-space energy of tiny's keys and writes none of 20 known facts; tiny's
    measured settings (configs/testbed/auto.yaml: alphaedit-eac.yaml + alphaedit-eac-tiny.yaml, α 0.3, P50;
    docs/methods.md) apply by default there and write >= 0.8 (measured 0.80); small keeps α = 10."""
    on_tiny = method_from_preset("alphaedit-eac", model="testbed:tiny")
    assert (on_tiny.l2, on_tiny.eac.gamma, on_tiny.target.clamp_norm_factor, on_tiny.write_aware) == (
        0.3, 50.0, 4.0, True)
    assert method_from_preset("alphaedit-eac", model="testbed:small").l2 == 10.0
    alpha_10 = CONFIGS_DIR / "testbed" / "alphaedit-eac.yaml"  # the overlay small uses, without tiny's ridge
    assert _known_stream_reliability(tiny_testbed, alpha_10, settings_for=None) <= 0.1
    assert _known_stream_reliability(tiny_testbed) >= 0.8
