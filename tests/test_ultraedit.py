"""UltraEdit: the running moments of the lifelong normalisation, the ridge least-squares shift, the features it is
computed from, atomic writes, checkpoint round trips, and editing success on the tiny testbed."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model

from eac_lightning.data.requests import EditRequest
from eac_lightning.methods import UltraEdit
from eac_lightning.methods.base import restore_weights, snapshot
from eac_lightning.methods.edit import edit
from eac_lightning.methods.ultraedit import RunningMoments, ridge_shift
from eac_lightning.models.adapters import mlp_out_name, weight_view
from eac_lightning.models.encoding import encode_target
from eac_lightning.models.tracing import edit_output

REQS = [
    EditRequest(prompt="{} is located in", subject="The Eiffel Tower", target_new="Rome", source="test", source_index=0),
    EditRequest(prompt="{} speaks", subject="Danielle Darrieux", target_new="English", source="test", source_index=1),
    EditRequest(prompt="{} plays the", subject="Toko Yasuda", target_new="piano", source="test", source_index=2),
    EditRequest(prompt="{} is the capital of", subject="Rome", target_new="France", source="test", source_index=3),
]


@pytest.fixture()
def gpt2(tokenizer):
    return make_tiny_model("gpt2", len(tokenizer), seed=1)


def test_running_moments_merged_in_chunks_equal_the_moments_of_all_rows():
    torch.manual_seed(0)
    x = torch.randn(23, 7, dtype=torch.float64) * 3 + 1
    m = RunningMoments.empty(7)
    for chunk in (x[:1], x[1:9], x[9:10], x[10:]):
        m = m.merged(chunk)
    assert m.count == 23
    torch.testing.assert_close(m.mean, x.mean(0))
    torch.testing.assert_close(m.std(), x.std(0))  # unbiased, as the reference's σ
    torch.testing.assert_close(m.normalise(x), (x - x.mean(0)) / (x.std(0) + torch.finfo(torch.float32).eps))
    one = RunningMoments.empty(7).merged(x[:1])
    assert one.std().eq(0).all() and one.normalise(x[:1]).eq(0).all()  # one token: nothing to normalise against


@pytest.mark.parametrize("tokens", [5, 40])
def test_ridge_shift_solves_the_normal_equations(tokens):
    """ΔWᵀ = (KᵀK + λI)⁻¹KᵀV, computed through the T×T system, with fewer and with more tokens than key dims."""
    torch.manual_seed(0)
    k, v = torch.randn(tokens, 12), torch.randn(tokens, 6)
    for ridge in (1.0, 0.1):
        shift = ridge_shift(k, v, ridge)  # (d, d_k)
        kd, vd = k.double(), v.double()
        lhs = (kd.T @ kd + ridge * torch.eye(12, dtype=torch.float64)) @ shift.T
        torch.testing.assert_close(lhs, kd.T @ vd, atol=1e-9, rtol=1e-9)
        # the minimiser: the gradient of ‖KX − V‖² + λ‖X‖² vanishes
        x = shift.T.clone().requires_grad_(True)
        ((kd @ x - vd).pow(2).sum() + ridge * x.pow(2).sum()).backward()
        assert x.grad.abs().max() < 1e-9


def test_features_are_the_keys_and_output_gradients_at_target_predicting_tokens(gpt2, tokenizer):
    method = UltraEdit(layers=[1, 2])
    method.setup(gpt2, tokenizer)
    feats = method.compute_targets(gpt2, tokenizer, REQS[:2])
    n_tokens = sum(len(encode_target(tokenizer, r.target_new)) for r in REQS[:2])
    name = mlp_out_name(gpt2, 2)
    assert feats.keys[name].shape == (n_tokens, weight_view(gpt2, name).shape[1])
    assert feats.grads[name].shape == (n_tokens, weight_view(gpt2, name).shape[0])
    # The gradient of the chunk's mean target cross-entropy w.r.t. the module output, checked by a direct backward.
    r = REQS[0]
    prompt = tokenizer(r.prompt_text)["input_ids"]
    target = encode_target(tokenizer, r.target_new)
    ids = torch.tensor([prompt + target[:-1]])
    held = {}

    def keep(out):
        held["out"] = out.detach().requires_grad_(True)
        return held["out"]

    with torch.enable_grad(), edit_output(gpt2, name, keep):
        logits = gpt2(input_ids=ids).logits[0, len(prompt) - 1:]
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor(target))
        (grad,) = torch.autograd.grad(loss, held["out"])
    alone = method.compute_targets(gpt2, tokenizer, [r])
    torch.testing.assert_close(alone.grads[name], grad[0, len(prompt) - 1:], atol=1e-6, rtol=1e-5)


def test_write_solves_the_least_squares_system_of_the_normalised_pseudo_values(gpt2, tokenizer):
    method = UltraEdit(layers=[1, 2], lr=1e-2)
    method.setup(gpt2, tokenizer)
    before = snapshot(gpt2, method.module_names)
    feats = method.compute_targets(gpt2, tokenizer, REQS)
    deltas = method.write(gpt2, tokenizer, feats).deltas
    for name in method.module_names:
        dw = (weight_view(gpt2, name).detach() - before[name]).double()
        torch.testing.assert_close(deltas[name].double(), dw, atol=1e-6, rtol=0)
        k = feats.keys[name].double()
        z = method.moments[UltraEdit._shape_key(gpt2, name)].normalise(torch.cat([feats.keys[name],
                                                                                  feats.grads[name]], -1))
        k_hat, g_hat = z[:, :k.shape[1]], z[:, k.shape[1]:]
        values = -1e-2 * k_hat.pow(2).sum(-1, keepdim=True) * g_hat
        lhs = (k.T @ k + torch.eye(k.shape[1], dtype=torch.float64)) @ dw.T
        torch.testing.assert_close(lhs, k.T @ values, atol=1e-5 * values.abs().max().item(), rtol=1e-4)
        assert dw.norm() > 0
    # Both edited modules share one weight shape, so they share (and both fed) one set of moments.
    assert list(method.moments) == [UltraEdit._shape_key(gpt2, method.module_names[0])]
    n_tokens = feats.keys[method.module_names[0]].shape[0]
    assert method.moments[list(method.moments)[0]].count == 2 * n_tokens


def test_moments_survive_a_state_dict_round_trip_and_resume_gives_the_same_edit(gpt2, tokenizer):
    method = UltraEdit(layers=[2], lr=1e-2)
    method.setup(gpt2, tokenizer)
    base = snapshot(gpt2, method.module_names)
    edit(method, gpt2, tokenizer, REQS[:2])
    state = method.state_dict()
    after_first = snapshot(gpt2, method.module_names)
    uninterrupted = edit(method, gpt2, tokenizer, REQS[2:]).deltas

    restore_weights(gpt2, after_first)
    resumed = UltraEdit(layers=[2], lr=1e-2)
    resumed.setup(gpt2, tokenizer)
    resumed.load_state_dict({k: {s: {f: (v.clone() if torch.is_tensor(v) else v) for f, v in m.items()}
                                 for s, m in moments.items()} for k, moments in state.items()})
    again = edit(resumed, gpt2, tokenizer, REQS[2:]).deltas
    name = method.module_names[0]
    torch.testing.assert_close(again[name], uninterrupted[name], atol=0, rtol=0)
    fresh = UltraEdit(layers=[2], lr=1e-2)  # without the moments the same turn is a different edit
    fresh.setup(gpt2, tokenizer)
    restore_weights(gpt2, after_first)
    assert not torch.allclose(edit(fresh, gpt2, tokenizer, REQS[2:]).deltas[name], uninterrupted[name])
    restore_weights(gpt2, base)


def test_failed_write_leaves_weights_and_moments_unchanged(gpt2, tokenizer, monkeypatch):
    method = UltraEdit(layers=[1, 2], lr=1e-2)
    method.setup(gpt2, tokenizer)
    edit(method, gpt2, tokenizer, REQS[:1])
    moments = method.state_dict()
    before = snapshot(gpt2, method.module_names)
    feats = method.compute_targets(gpt2, tokenizer, REQS[1:])
    real = ridge_shift
    calls = []

    def nan_on_second(k, v, ridge):
        calls.append(1)
        return real(k, v, ridge) * (float("nan") if len(calls) == 2 else 1.0)

    monkeypatch.setattr("eac_lightning.methods.ultraedit.ridge_shift", nan_on_second)
    with pytest.raises(FloatingPointError, match="not finite"):
        method.write(gpt2, tokenizer, feats)
    for name, w in before.items():
        assert torch.equal(weight_view(gpt2, name), w)
    assert all(torch.equal(method.moments[k].mean, v["mean"]) and method.moments[k].count == v["count"]
               for k, v in moments["moments"].items())


def test_bad_configuration_is_named(gpt2, tokenizer):
    with pytest.raises(ValueError, match="either layers or modules"):
        UltraEdit(layers=[1], modules=["transformer.h.1.mlp.c_fc"])
    with pytest.raises(ValueError, match="no linear module 'transformer.h.9.mlp.c_proj'"):
        UltraEdit(modules=["transformer.h.9.mlp.c_proj"]).setup(gpt2, tokenizer)
    method = UltraEdit(modules=["transformer.h.1.mlp.c_fc"])  # an MLP input projection, as on LLaMA's gate/up_proj
    method.setup(gpt2, tokenizer)
    deltas = edit(method, gpt2, tokenizer, REQS[:2]).deltas
    assert deltas["transformer.h.1.mlp.c_fc"].shape == weight_view(gpt2, "transformer.h.1.mlp.c_fc").shape


def test_ultraedit_preset_writes_a_turn_of_edits_on_the_testbed(tiny_testbed):
    """The testbed preset (configs/testbed/ultraedit.yaml) on 20 CounterFact requests in one turn (the measured
    0.87 of docs/methods.md): reliability >= 0.8, from about 0.1 before."""
    import random

    from eac_lightning.data.sources import load_requests
    from eac_lightning.editor import method_from_preset
    from eac_lightning.evaluation.edit_metrics import (
        compute_locality_reference,
        evaluate_edit_metrics,
    )
    from eac_lightning.models.loading import load_model
    from eac_lightning.paths import CONFIGS_DIR, data_dir

    model, tok = load_model(str(tiny_testbed))
    method = method_from_preset("ultraedit", CONFIGS_DIR / "testbed" / "ultraedit.yaml")
    assert (method.layers, method.lr) == ([2, 3], 1e-3)
    method.setup(model, tok)
    records = load_requests(data_dir() / "counterfact")
    order = list(range(len(records)))
    random.Random(0).shuffle(order)  # the datamodule's order (seed 0): the quickstart's first 20 edits
    requests = [records[i] for i in order[:20]]
    ref = compute_locality_reference(model, tok, requests)
    before = evaluate_edit_metrics(model, tok, requests, ref, rome_scores=False)["reliability"]
    edit(method, model, tok, requests)
    after = evaluate_edit_metrics(model, tok, requests, ref, rome_scores=False)["reliability"]
    assert before < 0.2 and after >= 0.8
