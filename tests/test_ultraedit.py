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
from eac_lightning.methods.ultraedit import RunningMoments, ridge_factors, ridge_shift
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
def test_ridge_shift_with_the_covariance_metric_solves_its_normal_equations(tokens):
    """ridge_metric covariance: ΔWᵀ = (KᵀK + λC)⁻¹KᵀV, computed as C⁻¹Kᵀ(KC⁻¹Kᵀ + λI)⁻¹V."""
    torch.manual_seed(0)
    k, v = torch.randn(tokens, 12), torch.randn(tokens, 6)
    a = torch.randn(12, 12, dtype=torch.float64)
    cov = a @ a.T / 12 + 0.1 * torch.eye(12, dtype=torch.float64)
    for ridge in (1.0, 0.1):
        shift = ridge_shift(k, v, ridge, lambda x: torch.linalg.solve(cov, x))
        kd, vd = k.double(), v.double()
        torch.testing.assert_close((kd.T @ kd + ridge * cov) @ shift.T, kd.T @ vd, atol=1e-9, rtol=1e-9)


@pytest.fixture()
def corpus_stats(gpt2, tokenizer, wikitext_lines, tmp_path):
    """Key statistics of the function's ``gpt2`` over 2048 WikiText tokens (the corpus of the prior, too)."""
    from eac_lightning.stats.covariance import CovarianceStore

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(wikitext_lines[:300]), encoding="utf-8")
    return CovarianceStore(gpt2, tokenizer, corpus=str(corpus), num_tokens=2048, seq_len=64, batch_size=8,
                           directory=tmp_path)


def test_prior_tokens_seed_the_moments_so_a_first_single_token_turn_writes(gpt2, tokenizer, corpus_stats):
    """prior_tokens (a documented deviation): the moments start from the features of that many corpus tokens, so
    the first turn of a single-edit stream is normalised against them; unseeded, a one-token turn's moments hold
    one row, normalise it to zero and write nothing (module docstring)."""
    one_token = [EditRequest(prompt="{} is located in", subject="Toko Yasuda", target_new="the", source="test",
                             source_index=0)]
    assert len(encode_target(tokenizer, one_token[0].target_new)) == 1
    plain = UltraEdit(layers=[1], value_step_size=1e-2)
    plain.setup(gpt2, tokenizer, corpus_stats)
    assert plain.moments == {}
    base = snapshot(gpt2, plain.module_names)
    assert all(d.abs().max() == 0 for d in edit(plain, gpt2, tokenizer, one_token).deltas.values())
    restore_weights(gpt2, base)

    seeded = UltraEdit(layers=[1], value_step_size=1e-2, prior_tokens=300)
    seeded.setup(gpt2, tokenizer, corpus_stats)
    (key, moments), = seeded.moments.items()
    assert moments.count == 300 and moments.std().min() > 0
    deltas = edit(seeded, gpt2, tokenizer, one_token).deltas
    assert all(d.abs().max() > 0 for d in deltas.values())
    assert seeded.moments[key].count == 301
    two = UltraEdit(layers=[1, 2], prior_tokens=300)  # modules of one shape share moments: both feed the prior
    two.setup(gpt2, tokenizer, corpus_stats)
    assert [m.count for m in two.moments.values()] == [600]
    restore_weights(gpt2, base)
    with pytest.raises(ValueError, match="prior_tokens needs"):
        UltraEdit(layers=[1], prior_tokens=10).setup(gpt2, tokenizer)
    with pytest.raises(ValueError, match="ridge_metric 'covariance' needs"):
        UltraEdit(layers=[1], ridge_metric="covariance").setup(gpt2, tokenizer)
    with pytest.raises(ValueError, match="ridge_metric must be"):
        UltraEdit(ridge_metric="C")


def test_covariance_ridge_write_solves_its_system(gpt2, tokenizer, corpus_stats):
    """The written shift is the covariance-metric ridge fit of the turn's raw keys to its pseudo values."""
    method = UltraEdit(layers=[1], value_step_size=1e-2, ridge_metric="covariance")
    method.setup(gpt2, tokenizer, corpus_stats)
    feats = method.compute_targets(gpt2, tokenizer, REQS)
    base = snapshot(gpt2, method.module_names)
    deltas = method.write(gpt2, tokenizer, feats).deltas
    name = method.module_names[0]
    k = feats.keys[name].double()
    z = method.moments[UltraEdit._shape_key(gpt2, name)].normalise(torch.cat([feats.keys[name],
                                                                              feats.grads[name]], -1))
    values = -1e-2 * z[:, :k.shape[1]].pow(2).sum(-1, keepdim=True) * z[:, k.shape[1]:]
    cov = corpus_stats.get(name).damped
    lhs = (k.T @ k + cov) @ deltas[name].double().T
    torch.testing.assert_close(lhs, k.T @ values, atol=1e-5 * values.abs().max().item(), rtol=1e-4)
    restore_weights(gpt2, base)


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
    method = UltraEdit(layers=[1, 2], value_step_size=1e-2)
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
    method = UltraEdit(layers=[2], value_step_size=1e-2)
    method.setup(gpt2, tokenizer)
    base = snapshot(gpt2, method.module_names)
    edit(method, gpt2, tokenizer, REQS[:2])
    state = method.state_dict()
    after_first = snapshot(gpt2, method.module_names)
    uninterrupted = edit(method, gpt2, tokenizer, REQS[2:]).deltas

    restore_weights(gpt2, after_first)
    resumed = UltraEdit(layers=[2], value_step_size=1e-2)
    resumed.setup(gpt2, tokenizer)
    resumed.load_state_dict({k: {s: {f: (v.clone() if torch.is_tensor(v) else v) for f, v in m.items()}
                                 for s, m in moments.items()} for k, moments in state.items()})
    again = edit(resumed, gpt2, tokenizer, REQS[2:]).deltas
    name = method.module_names[0]
    torch.testing.assert_close(again[name], uninterrupted[name], atol=0, rtol=0)
    fresh = UltraEdit(layers=[2], value_step_size=1e-2)  # without the moments the same turn is a different edit
    fresh.setup(gpt2, tokenizer)
    restore_weights(gpt2, after_first)
    assert not torch.allclose(edit(fresh, gpt2, tokenizer, REQS[2:]).deltas[name], uninterrupted[name])
    restore_weights(gpt2, base)


def test_failed_write_leaves_weights_and_moments_unchanged(gpt2, tokenizer, monkeypatch):
    method = UltraEdit(layers=[1, 2], value_step_size=1e-2)
    method.setup(gpt2, tokenizer)
    edit(method, gpt2, tokenizer, REQS[:1])
    moments = method.state_dict()
    before = snapshot(gpt2, method.module_names)
    feats = method.compute_targets(gpt2, tokenizer, REQS[1:])
    real = ridge_factors
    calls = []

    def nan_on_second(*args):
        calls.append(1)
        left, right = real(*args)
        return left * (float("nan") if len(calls) == 2 else 1.0), right

    monkeypatch.setattr("eac_lightning.methods.ultraedit.ridge_factors", nan_on_second)
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


def _testbed_reliability(folder, overrides: dict, single: bool) -> tuple[float, float]:
    """(before, after) reliability of the testbed preset (configs/testbed/ultraedit.yaml, with ``overrides``; in
    single-edit turns also configs/testbed/ultraedit-single.yaml) on the quickstart's 20 CounterFact requests: one
    turn, or a stream of single-edit turns (``single``), as the CLI."""
    import yaml
    import random

    from eac_lightning.data.sources import load_requests
    from eac_lightning.editor import method_from_preset
    from eac_lightning.evaluation.edit_metrics import (
        compute_locality_reference,
        evaluate_edit_metrics,
    )
    from eac_lightning.models.loading import load_model
    from eac_lightning.paths import CONFIGS_DIR, data_dir
    from eac_lightning.stats.covariance import CovarianceStore

    model, tok = load_model(str(folder))
    method = method_from_preset("ultraedit", CONFIGS_DIR / "testbed" / "ultraedit.yaml")
    if single:
        single_overlay = yaml.safe_load((CONFIGS_DIR / "testbed" / "ultraedit-single.yaml").read_text())
        overrides = {**single_overlay["model"]["method"]["init_args"], **overrides}
    for k, v in overrides.items():
        setattr(method, k, v)
    method.setup(model, tok, CovarianceStore(model, tok, num_tokens=100_000))  # the CLI's stats_tokens
    records = load_requests(data_dir() / "counterfact")
    order = list(range(len(records)))
    random.Random(0).shuffle(order)  # the datamodule's order (seed 0): the quickstart's first 20 edits
    requests = [records[i] for i in order[:20]]
    ref = compute_locality_reference(model, tok, requests)
    before = evaluate_edit_metrics(model, tok, requests, ref, rome_scores=False)["reliability"]
    for turn in ([[r] for r in requests] if single else [requests]):
        edit(method, model, tok, turn)
    return before, evaluate_edit_metrics(model, tok, requests, ref, rome_scores=False)["reliability"]


@pytest.mark.slow
def test_ultraedit_writes_a_turn_of_edits_on_the_testbed(tiny_testbed):
    """20 CounterFact requests in one turn (UltraEdit's own protocol: turns of many edits) with the testbed preset's
    η and layers (published normalisation and ridge): reliability >= 0.8 (measured 0.87), from about 0.1 before.
    The seeded moments are for single-edit streams: their rows are per-token gradients, a turn of 20 edits has the
    gradients of each chunk's mean loss (10 edits, ~30 tokens), ~30 times smaller, and writes ~0.1 (docs/methods.md)."""
    from eac_lightning.editor import method_from_preset
    from eac_lightning.paths import CONFIGS_DIR

    method = method_from_preset("ultraedit", CONFIGS_DIR / "testbed" / "ultraedit.yaml")
    assert (method.layers, method.value_step_size, method.prior_tokens, method.ridge_metric) == (
        [2, 3], 1e-3, 0, "identity")
    before, after = _testbed_reliability(tiny_testbed, {}, single=False)
    assert before < 0.2 and after >= 0.8


@pytest.mark.slow
def test_seeded_moments_and_covariance_ridge_write_a_single_edit_stream_on_the_testbed(tiny_testbed):
    """20 single-edit turns on testbed:tiny (the CLI's quickstart stream; docs/methods.md, "UltraEdit"): the
    single-edit overlay's two deviations (prior_tokens, ridge_metric covariance) write >= 0.8 (measured 0.87); the
    published normalisation and ridge with the same η and layers write about half (0.49)."""
    _, published = _testbed_reliability(tiny_testbed, {"prior_tokens": 0, "ridge_metric": "identity"}, single=True)
    _, preset = _testbed_reliability(tiny_testbed, {}, single=True)
    assert published < 0.6 and preset >= 0.8
