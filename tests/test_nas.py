"""NAS (Norm-Anchor Scaling, arXiv 2602.02543): the rescale of each solved value vector to the unedited model's
reference norm, the reference measured once and kept in the method's state through undo, replay and resume, the
switch on AlphaEdit, AlphaEdit-EAC and B-EAC, and the ``nas`` preset on the testbed."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from cli_tools import current_deltas, run_cli, write_config
from conftest import make_tiny_model, wikitext_stats

from eac_lightning.data.requests import EditRequest
from eac_lightning.editor import Editor, method_from_preset
from eac_lightning.methods import (
    NAS,
    AlphaEdit,
    ContextTemplateParams,
    EACHyperParams,
    NASHyperParams,
    TargetHyperParams,
    edit,
)
from eac_lightning.methods import nas as nas_module
from eac_lightning.methods.base import Written
from eac_lightning.methods.beac import BEAC, BEACMEMIT
from eac_lightning.methods.memit import MEMIT
from eac_lightning.methods.nas import (
    NormAnchor,
    cache_file,
    mlp_output_at_subject,
    rescaled_shift,
    trimmed_mean,
)
from eac_lightning.models.adapters import mlp_out_name, weight_view
from eac_lightning.session import EditLog, EditSession

CTX = ContextTemplateParams(length_count=[[4, 2]])
Z = TargetHyperParams(num_steps=4, clamp_norm_factor=4.0)
SMALL_REFERENCE = NASHyperParams(reference_requests=8)
REQS = [EditRequest(prompt="{} is located in", subject=s, target_new=t, source="t", source_index=i)
        for i, (s, t) in enumerate([("The Eiffel Tower", "Rome"), ("Danielle Darrieux", "English"),
                                    ("Toko Yasuda", "piano"), ("Apple A5", "Google")])]


@pytest.fixture(scope="module")
def model_and_stats(tokenizer, wikitext_lines, tmp_path_factory):
    model = make_tiny_model("gpt2", len(tokenizer), seed=4)
    return model, wikitext_stats(model, tokenizer, wikitext_lines, tmp_path_factory.mktemp("nas_stats"))


@pytest.fixture
def model(model_and_stats):
    model, _ = model_and_stats
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    yield model
    model.load_state_dict(saved)


def _threshold(model, stats) -> float:
    """A null-space threshold above every eigenvalue (P = I): AlphaEdit's write on this random model's keys."""
    return 2 * max(float(torch.linalg.eigvalsh(stats.get(mlp_out_name(model, l)).matrix).max()) for l in (1, 2))


def _alphaedit(model, stats, **kw) -> AlphaEdit:
    return AlphaEdit(layers=[1, 2], context=CTX, target=Z, nullspace_threshold=_threshold(model, stats), **kw)


# ---------------------------------------------------------------------------------------------- the rescale


def test_the_rescaled_value_vector_has_the_reference_norm_and_its_direction():
    torch.manual_seed(0)
    m, delta = torch.randn(6, 32), torch.randn(6, 32)
    delta[5] = -m[5]  # v* = 0: nothing to rescale
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-6)):
        m_, d_ = m.to(dtype), delta.to(dtype)
        new = rescaled_shift(m_, d_, 3.0)
        assert new.dtype == dtype
        v, v_new = (m_ + d_).double(), (m_ + new).double()
        assert torch.allclose(v_new[:5].norm(dim=1), torch.full((5,), 3.0, dtype=torch.float64), rtol=tol, atol=0)
        cos = torch.nn.functional.cosine_similarity(v[:5], v_new[:5], dim=1)
        assert torch.allclose(cos, torch.ones(5, dtype=torch.float64), atol=tol)
        assert v_new[5].abs().max() <= 1e-6  # left as it was
    # The skip rule (reference code NAS/compute_z.py): a v* longer than 2ρ is not written (v* = m: δ' = 0 exactly).
    m[:2], delta[:2] = 5 * m[:2], 5 * delta[:2]  # two value vectors 5x as long as the others
    norms = (m + delta).norm(dim=1)
    rho = float(norms[2:5].max())
    new = rescaled_shift(m.double(), delta.double(), rho, skip_ratio=2.0)
    long = norms > 2 * rho
    assert long.any() and (~long[:5]).any()
    assert new[long].eq(0).all()
    kept = ~long & (norms > 0)
    assert torch.allclose((m.double() + new)[kept].norm(dim=1), torch.full((int(kept.sum()),), rho, dtype=torch.float64))


def test_the_reference_is_the_mean_without_the_largest_five_percent():
    values = torch.arange(1.0, 41.0)  # 40 norms: the largest floor(0.05 * 40) = 2 are left out
    assert trimmed_mean(values, 0.95) == (sum(range(1, 39)) / 38, 2)
    assert trimmed_mean(values[:19], 0.95) == (10.0, 0)  # fewer than 20: nothing is left out
    assert trimmed_mean(values, 1.0) == (20.5, 0)


def test_settings_are_checked():
    for bad in ({"reference_requests": 0}, {"trim_quantile": 0.0}, {"trim_quantile": 1.5}, {"skip_ratio": -1.0},
                {"reference_data": ""}):
        with pytest.raises(ValueError):
            NASHyperParams(**bad)
    with pytest.raises(ValueError, match="positive and finite"):
        NormAnchor.from_state({"norm": float("nan"), "layer": 2, "requests": 1, "dropped": 0, "raw_mean": 1.0})


# ------------------------------------------------------------------------------------------ the switch


def test_nas_writes_alphaedit_targets_rescaled_to_the_measured_reference(model, model_and_stats, tokenizer):
    stats = model_and_stats[1]
    plain, anchored = _alphaedit(model, stats), _alphaedit(model, stats, nas=SMALL_REFERENCE)
    plain.setup(model, tokenizer, stats)
    anchored.setup(model, tokenizer, stats)
    assert (plain.label, anchored.label) == ("AlphaEdit", "NAS")
    rho = anchored.norm_anchor
    assert rho.layer == 2 and rho.requests == 8 and rho.dropped == 0 and rho.norm == pytest.approx(rho.raw_mean)
    assert math.isfinite(rho.norm) and rho.norm > 0
    solved = plain.compute_targets(model, tokenizer, REQS[:3])
    rescaled = anchored.compute_targets(model, tokenizer, REQS[:3])
    m = mlp_output_at_subject(model, tokenizer, REQS[:3], 2).double()
    for i, (s, r) in enumerate(zip(solved, rescaled)):
        assert torch.equal(s.v0, r.v0)  # z' = (h − m) + ρ·v*/‖v*‖: the residual before the MLP is kept
        v, v_new = m[i] + s.delta.double(), m[i] + r.delta.double()
        assert v_new.norm().item() == pytest.approx(rho.norm, rel=1e-6)
        assert torch.nn.functional.cosine_similarity(v, v_new, dim=0).item() == pytest.approx(1.0, abs=1e-6)
    assert "nas" not in plain.state_dict() and anchored.state_dict()["nas"] == rho.state()


def test_with_the_switch_off_the_update_is_alphaedit_s(model, model_and_stats, tokenizer):
    """nas=None is AlphaEdit bit for bit; and with ρ set to a request's own ‖v*‖, NAS writes what AlphaEdit writes
    (the rescale is the only change)."""
    stats = model_and_stats[1]
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    updates = []
    for method in (_alphaedit(model, stats), _alphaedit(model, stats, nas=None)):
        method.setup(model, tokenizer, stats)
        updates.append(edit(method, model, tokenizer, REQS[:1]).deltas)
        model.load_state_dict(saved)
    assert all(torch.equal(updates[0][n], updates[1][n]) for n in updates[0])
    anchored = _alphaedit(model, stats, nas=NASHyperParams(reference_requests=2))
    anchored.setup(model, tokenizer, stats)
    (target,) = anchored._solve_targets(model, tokenizer, REQS[:1])
    own = (mlp_output_at_subject(model, tokenizer, REQS[:1], 2)[0].double() + target.delta.double()).norm().item()
    anchored.norm_anchor = NormAnchor(own, 2, 1, 0, own)
    same = edit(anchored, model, tokenizer, REQS[:1]).deltas
    for n, d in updates[0].items():
        assert torch.allclose(same[n], d, rtol=1e-4, atol=1e-6 * d.abs().max().item()), n


def test_the_switch_on_alphaedit_eac_and_b_eac(model, model_and_stats, tokenizer):
    stats = model_and_stats[1]
    t = _threshold(model, stats)
    eac = EACHyperParams(gamma=80.0)
    methods = {
        "AlphaEdit-EAC + NAS": AlphaEdit(layers=[1, 2], context=CTX, target=Z, nullspace_threshold=t, eac=eac,
                                         nas=SMALL_REFERENCE),
        "B-EAC + NAS": BEAC(layers=[1, 2], context=CTX, target=Z, nullspace_threshold=t, eac=eac, nas=SMALL_REFERENCE),
        "B-EAC (MEMIT) + NAS": BEACMEMIT(layers=[1, 2], context=CTX, target=Z, mom2_update_weight=10.0, eac=eac,
                                         nas=SMALL_REFERENCE),
    }
    assert MEMIT(layers=[1, 2], nas=SMALL_REFERENCE).label == "MEMIT + NAS"
    m = mlp_output_at_subject(model, tokenizer, REQS[:2], 2).double()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    for label, method in methods.items():
        assert method.label == label
        method.setup(model, tokenizer, stats)
        targets = method.compute_targets(model, tokenizer, REQS[:2])
        for i, target in enumerate(targets):
            assert (m[i] + target.delta.double()).norm().item() == pytest.approx(method.norm_anchor.norm, rel=1e-6)
        written = method.write(model, tokenizer, targets)
        assert all(torch.isfinite(d).all() and d.norm() > 0 for d in written.deltas.values()), label
        model.load_state_dict(saved)


# ------------------------------------------------------------------------------------ measured once, kept


def test_the_reference_is_measured_once_and_restored_by_undo_and_replay(model, model_and_stats, tokenizer, tmp_path,
                                                                        monkeypatch):
    stats = model_and_stats[1]
    calls = []
    measure = nas_module.measure_norm_anchor

    def counted(*args, **kwargs):
        calls.append(args[2])
        return measure(*args, **kwargs)

    monkeypatch.setattr(nas_module, "measure_norm_anchor", counted)
    params = NASHyperParams(reference_requests=6, seed=3)
    live = _alphaedit(model, stats, nas=params)
    live.setup(model, tokenizer, stats)
    rho = live.norm_anchor
    assert calls == [2]
    path = cache_file(stats, 2, Z, params)
    assert path.exists() and NormAnchor.from_state(json.loads(path.read_text())) == rho
    session = EditSession(model, live, EditLog(tmp_path / "history"), snapshot_every=2)
    session.start({"test": "nas"})
    for i, batch in enumerate([REQS[0:2], REQS[2:3], REQS[3:4]], 1):
        result = edit(live, model, tokenizer, batch)
        session.commit(Written(result.deltas, None, result.factors), step=i, position=i, requests=batch)
    assert live.norm_anchor == rho and calls == [2]  # the edited model is never measured
    live_deltas = {k: v.clone() for k, v in session.deltas.items()}

    # A fresh method on the unedited model: setup reads the statistics cache (no measurement), and the replay puts
    # the logged ρ in place of whatever it holds.
    with torch.no_grad():
        for n, w0 in session.base_weights.items():
            weight_view(model, n).copy_(w0)
    fresh = _alphaedit(model, stats, nas=params)
    fresh.setup(model, tokenizer, stats)
    assert calls == [2] and fresh.norm_anchor == rho
    fresh.norm_anchor = NormAnchor(123.0, 2, 1, 0, 123.0)
    replay = EditSession(model, fresh, EditLog(tmp_path / "history"), base_weights=session.base_weights)
    replay.checkout(EditLog(tmp_path / "history").head())
    assert fresh.norm_anchor == rho
    assert all(torch.equal(live_deltas[k], replay.deltas[k]) for k in live_deltas)
    root = replay.log.lineage(replay.head)[0]
    fresh.norm_anchor = None
    replay.checkout(root)  # back to the unedited model: its state after setup holds ρ
    assert fresh.norm_anchor == rho and calls == [2]
    # A state measured at another layer is refused before anything changes.
    with pytest.raises(ValueError, match="layer 1"):
        fresh.load_state_dict({**fresh.state_dict(), "nas": {**rho.state(), "layer": 1}})
    assert fresh.norm_anchor == rho


def test_editor_undo_keeps_the_reference(model, model_and_stats, tokenizer):
    stats = model_and_stats[1]
    method = _alphaedit(model, stats, nas=SMALL_REFERENCE)
    editor = Editor(model, tokenizer, method, stats)
    rho = method.norm_anchor
    first = editor.edit(REQS[:2]).deltas
    editor.undo()
    assert method.norm_anchor == rho
    again = editor.edit(REQS[:2]).deltas
    assert all(torch.equal(first[n], again[n]) for n in first)


# ------------------------------------------------------------------------------------------------ presets


def test_the_nas_preset_is_alphaedit_with_the_reference_code_s_settings():
    method = method_from_preset("nas")
    alphaedit = method_from_preset("alphaedit")
    assert type(method) is NAS and isinstance(method, AlphaEdit) and method.label == "NAS"
    assert method.nas == NASHyperParams() and method.eac is None
    assert (method.target, method.context, method.nullspace_threshold, method.l2) == (
        alphaedit.target, alphaedit.context, alphaedit.nullspace_threshold, alphaedit.l2)
    on_small = method_from_preset("nas", model="testbed:small")  # AlphaEdit's clamp, not its write-aware z
    assert on_small.method_settings["file"] == "configs/testbed/nas.yaml"
    assert (on_small.target.clamp_norm_factor, on_small.write_aware) == (4.0, False)
    assert method_from_preset("nas", model="testbed:tiny").method_settings["file"] == "configs/testbed/nas.yaml"


# ---------------------------------------------------------------------------------------------- the CLI


@pytest.mark.slow
def test_kill_and_resume_of_a_nas_run_equals_an_uninterrupted_one(tmp_path):
    """Through the CLI on testbed:tiny: the resumed run takes ρ from its edit log (and the statistics cache), never
    from the edited weights, and writes bit for bit what an uninterrupted run writes."""
    from eac_lightning.session.log import unflatten

    method = {"class_path": "eac_lightning.methods.NAS",
              "init_args": {"target": {"num_steps": 4, "clamp_norm_factor": 4.0}, "context": {"length_count": [[5, 2]]},
                            "write_aware": True, "nas": {"reference_requests": 16}}}
    extra = {"model": {"method": method}, "data": {"batch_size": 2}}
    runs = {name: tmp_path / name for name in ("full", "killed")}
    for name, root in runs.items():
        write_config(tmp_path / f"{name}.yaml", root, num_edits=6, extra=extra)
    full = run_cli("fit", "--config", str(tmp_path / "full.yaml"))
    assert "NAS: reference norm" in full.stderr  # measured by the first run on this model, then cached
    killer = tmp_path / "kill.yaml"
    killer.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "run_probes.KillAfter", "init_args": {"steps": 1}}]}}))
    assert run_cli("fit", "--config", str(tmp_path / "killed.yaml"), "--config", str(killer), check=False).returncode
    resumed = run_cli("fit", "--config", str(tmp_path / "killed.yaml"), "--ckpt_path", "last")
    assert "NAS: reference norm" not in resumed.stderr
    d_full, d_resumed = current_deltas(runs["full"]), current_deltas(runs["killed"])
    assert d_full.keys() == d_resumed.keys() and all(torch.equal(d_full[k], d_resumed[k]) for k in d_full)
    states = []
    for root in runs.values():
        log = EditLog(root / "history")
        header, tensors = log.snapshot(log.head())
        states.append(unflatten(header["method"], tensors)["nas"])
    assert states[0] == states[1] and states[0]["requests"] == 16
    assert json.loads((runs["killed"] / "summary.json").read_text())["method"] == "NAS"


@pytest.mark.slow
def test_the_nas_preset_writes_two_batches_of_ten_on_testbed_small(tmp_path):
    """The preset as a user runs it (the quickstart stream, the testbed overlay configs/testbed/nas.yaml): 2 batches
    of 10 on testbed:small, reliability >= 0.8 (measured 0.95 with ρ over the whole shipped CounterFact sample;
    AlphaEdit 1.00; with AlphaEdit's write-aware overlay 0.80). ρ is measured over 100 of the sample's requests here
    rather than its 500, to bound the test's time (the published loop runs every step of each)."""
    root = tmp_path / "run"
    run_cli("fit", "--config", "configs/quickstart.yaml", "--config", "configs/methods/nas.yaml",
            "--model.method.init_args.nas.reference_requests", "100",
            "--model.model", "testbed:small", "--data.num_edits", "20", "--data.batch_size", "10",
            "--eval.tasks", "[]", "--eval.probes", "[]", "--eval.literature_metrics", "false", "--eval.every", "0",
            "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false")
    summary = json.loads((root / "summary.json").read_text())
    assert summary["method"] == "NAS" and summary["edits_applied"] == 20
    assert summary["edit_metrics"]["reliability"] >= 0.8
