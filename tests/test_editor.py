"""The Python API (edit, undo, failures that leave nothing behind) and the method / published presets."""

from __future__ import annotations

import re
import sys
from dataclasses import asdict, is_dataclass
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml
from conftest import REPO, make_tiny_model, wikitext_stats

from eac_lightning.data.requests import EditRequest, MalformedRequestError
from eac_lightning.editor import METHOD_PRESETS, Editor, method_from_preset
from eac_lightning.methods import (
    ROME,
    AlphaEdit,
    ContextTemplateParams,
    EditOptimisationError,
    TargetHyperParams,
)
from eac_lightning.models.adapters import mlp_out_name

CTX = ContextTemplateParams(length_count=[[4, 2]])
Z = TargetHyperParams(num_steps=6, clamp_norm_factor=0.75)
REQS = [
    EditRequest(prompt="{} is located in", subject="The Eiffel Tower", target_new="Rome", source="t", source_index=0,
                neighborhood_prompts=["Rome is the capital of"], neighborhood_answers=["Italy"]),
    EditRequest(prompt="{} speaks", subject="Danielle Darrieux", target_new="English", source="t", source_index=1),
]
PUBLISHED = sorted((REPO / "configs" / "published").glob("*/*.yaml"))
OWN_PRESETS = ["rome", "rome-eac", "memit", "memit-eac", "alphaedit", "ft", "ft-en"]


@pytest.fixture(scope="module")
def model_and_stats(tokenizer, wikitext_lines, tmp_path_factory):
    model = make_tiny_model("gpt2", len(tokenizer), seed=2)
    return model, wikitext_stats(model, tokenizer, wikitext_lines, tmp_path_factory.mktemp("editor_stats"))


@pytest.fixture
def model(model_and_stats):
    model, _ = model_and_stats
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    yield model
    model.load_state_dict(saved)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _equal(model, state) -> bool:
    now = model.state_dict()
    return all(torch.equal(state[k], now[k]) for k in state)


def test_edit_evaluate_undo_is_bit_exact(model, model_and_stats, tokenizer):
    stats = model_and_stats[1]
    editor = Editor(model, tokenizer, ROME(layer=1, context=CTX), stats)
    original = _state(model)
    d1 = editor.edit(REQS[0]).deltas
    after_first = _state(model)
    assert not _equal(model, original) and list(d1) == [mlp_out_name(model, 1)]
    editor.edit([REQS[1]])
    assert editor.requests == REQS
    scores = editor.evaluate()
    assert {"reliability", "generalization", "locality"} <= set(scores)
    assert all(0.0 <= scores[k] <= 1.0 for k in ("reliability", "locality"))
    editor.undo()
    assert _equal(model, after_first) and editor.requests == REQS[:1]
    editor.undo()
    assert _equal(model, original) and editor.requests == []  # bit-exact, not just close
    with pytest.raises(IndexError, match="nothing to undo"):
        editor.undo()


def test_undo_restores_the_method_state(model, model_and_stats, tokenizer):
    """AlphaEdit's accumulated K_p K_pᵀ is undone with the weights: a redo gives the very same update."""
    stats = model_and_stats[1]
    c = stats.get(mlp_out_name(model, 1)).matrix
    method = AlphaEdit(layers=[1, 2], context=CTX, target=Z, nullspace_threshold=float(torch.linalg.eigvalsh(c).max()) * 2)
    editor = Editor(model, tokenizer, method, stats)
    first = editor.edit(REQS[0]).deltas
    assert set(method.null_kkt) == set(first)
    editor.undo()
    assert method.null_kkt == {}
    again = editor.edit(REQS[0]).deltas
    assert all(torch.equal(first[n], again[n]) for n in first)


def test_malformed_request_changes_nothing(model, model_and_stats, tokenizer):
    editor = Editor(model, tokenizer, ROME(layer=1, context=CTX), model_and_stats[1])
    original = _state(model)
    bad = EditRequest(prompt="{} is located in", subject="Paris", target_new=" ", source="t", source_index=5)
    with pytest.raises(MalformedRequestError, match=r"t \(row 5\): field 'target_new'"):
        editor.edit([REQS[0], bad])
    assert _equal(model, original)
    assert editor.requests == [] and editor.reference == {}
    with pytest.raises(IndexError):
        editor.undo()


def test_failed_optimisation_changes_nothing(model, model_and_stats, tokenizer):
    hp = TargetHyperParams()
    hp.weight_decay = float("nan")  # refused when built; set afterwards it makes the optimisation NaN
    method = ROME(layer=1, context=CTX, target=hp)
    editor = Editor(model, tokenizer, method, model_and_stats[1])
    original = _state(model)
    with pytest.raises(EditOptimisationError, match=r"t \(row 0\).*non-finite"):
        editor.edit(REQS[0])
    assert _equal(model, original) and editor.requests == []
    with pytest.raises(IndexError):
        editor.undo()


# ---------------------------------------------------------------------------------------------------- presets


def _subset_matches(obj, expected: dict, where: str) -> None:
    """Every key of ``expected`` equals the attribute of ``obj`` (recursing into dataclass hyper-parameters)."""
    for key, value in expected.items():
        actual = getattr(obj, key)
        if isinstance(value, dict):
            assert is_dataclass(actual), f"{where}: {key} is {actual!r}"
            _subset_matches(actual, value, f"{where}.{key}")
        elif isinstance(value, float) or isinstance(actual, float):
            assert actual == pytest.approx(value), f"{where}.{key}: {actual!r} != {value!r}"
        else:
            assert actual == value, f"{where}.{key}: {actual!r} != {value!r}"


@pytest.mark.parametrize("name", OWN_PRESETS)
def test_method_presets_instantiate_with_their_values(name):
    spec = yaml.safe_load((METHOD_PRESETS / f"{name}.yaml").read_text())["model"]["method"]
    method = method_from_preset(name)
    assert f"{type(method).__module__.rsplit('.', 1)[0]}.{type(method).__name__}" == spec["class_path"]
    _subset_matches(method, spec.get("init_args") or {}, name)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(FileNotFoundError, match=r"no method preset 'romee'.*rome-eac"):
        method_from_preset("romee")


def _published_cases():
    cases = []
    for path in PUBLISHED:
        bases = [path.stem] + (["ft-en"] if path.stem == "ft" else [])
        cases += [pytest.param(path, base, id=f"{path.parent.name}/{path.stem}<-{base}") for base in bases]
    return cases


def test_published_presets_cover_every_model_and_method():
    assert {p.parent.name for p in PUBLISHED} == {"gpt2-xl", "gpt-j-6b", "llama3-8b"}
    for model in ("gpt2-xl", "gpt-j-6b", "llama3-8b"):
        assert {"rome", "memit", "alphaedit", "ft"} <= {p.stem for p in PUBLISHED if p.parent.name == model}


@pytest.fixture(scope="module")
def compose(tmp_path_factory):
    """Compose config files the way ``eac-lightning fit --config A --config B`` does (the real CLI, not run)."""
    from eac_lightning.data.datamodule import EditDataModule
    from eac_lightning.lightning.cli import EditingCLI
    from eac_lightning.lightning.module import EditingModule

    root = tmp_path_factory.mktemp("cli")

    def run(*configs: Path):
        args = [a for c in configs for a in ("--config", str(c))]
        with mock.patch.object(sys, "argv", ["eac-lightning"]):  # pytest's own arguments are not the CLI's
            cli = EditingCLI(EditingModule, EditDataModule, run=False,
                             args=args + ["--trainer.default_root_dir", str(root), "--trainer.logger", "false",
                                            "--seed_everything", "0"])
        return cli.model

    return run


@pytest.mark.parametrize("path, base", _published_cases())
def test_published_preset_composes_after_its_method_preset(compose, path, base):
    text = path.read_text()
    # Every preset names the file its values come from.
    assert re.search(r"(kmeng01/(rome|memit)|jianghoucheng/AlphaEdit|zjunlp/EasyEdit) hparams/\S+", text), path
    published = yaml.safe_load(text)["model"]
    module = compose(METHOD_PRESETS / f"{base}.yaml", path)
    assert module.model_name == published["model"]
    method = module.method
    base_spec = yaml.safe_load((METHOD_PRESETS / f"{base}.yaml").read_text())["model"]["method"]
    assert f"{type(method).__module__.rsplit('.', 1)[0]}.{type(method).__name__}" == base_spec["class_path"]
    _subset_matches(method, published["method"]["init_args"], str(path))
    # What the published file leaves out still comes from the method preset (e.g. FT-EN's elastic net).
    base_eac = (base_spec.get("init_args") or {}).get("eac")
    if base_eac and "eac" not in published["method"]["init_args"]:
        _subset_matches(method.eac, base_eac, f"{path} <- {base}")
    if "eac" in published["method"]["init_args"]:
        assert {"lam": 5.0e-7, "penalty_scale": "absolute"}.items() <= asdict(method.eac).items()


# each overlay named after its method preset (others: ultraedit-single.yaml in test_ultraedit.py,
# alphaedit-eac-tiny.yaml in test_alphaedit_eac.py)
TESTBED_OVERLAYS = sorted(p for p in (REPO / "configs" / "testbed").glob("*.yaml")
                          if p.name != "auto.yaml" and (REPO / "configs" / "methods" / p.name).exists())


@pytest.mark.parametrize("path", TESTBED_OVERLAYS, ids=[p.stem for p in TESTBED_OVERLAYS])
def test_testbed_overlay_composes_after_its_method_preset(compose, path, tmp_path):
    """configs/testbed/<m>.yaml changes only the values it names (write-aware targets, MEMIT's λ and clamp,
    ROME-EAC's γ and penalties) over configs/methods/<m>.yaml, through the real CLI and through method_from_preset
    alike."""
    assert "measured here" in path.read_text(), path
    overlay = yaml.safe_load(path.read_text())["model"]["method"]["init_args"]
    preset = method_from_preset(path.stem)  # the preset file states only what differs from the class defaults
    write_aware = True in (overlay.get("write_aware"), getattr(preset, "write_aware", None))  # B-EAC's default
    assert write_aware or "not write-aware" in path.read_text(), path  # B-EAC over MEMIT says why not
    hub_name = tmp_path / "model.yaml"  # a hub name is not resolved at parse time; testbed:small would be built
    hub_name.write_text("model:\n  model: gpt2\n")
    composed = compose(METHOD_PRESETS / path.name, path, hub_name).method
    for method in (composed, method_from_preset(path.stem, path)):
        _subset_matches(method, overlay, str(path))
        if getattr(preset, "eac", None):  # the EAC values the overlay does not name stay the preset's
            kept = {k: v for k, v in asdict(preset.eac).items() if k not in overlay.get("eac", {})}
            _subset_matches(method.eac, kept, f"{path} <- {path.name}")
        if hasattr(preset, "context"):  # UltraEdit has no prefix contexts
            assert method.context.length_count == preset.context.length_count
        if hasattr(preset, "target"):  # the target settings the overlay does not name stay the preset's
            kept = {k: v for k, v in asdict(preset.target).items() if k not in overlay.get("target", {})}
            _subset_matches(method.target, kept, f"{path} <- {path.name}")


def test_a_refused_write_leaves_the_method_state_of_the_last_edit(model, model_and_stats, tokenizer, monkeypatch):
    """AlphaEdit records a batch's keys inside its write; a write refused afterwards (a non-finite result) must not
    leave them in K_pK_pᵀ: the Editor returns the method to its logged state."""
    stats = model_and_stats[1]
    c = stats.get(mlp_out_name(model, 1)).matrix
    method = AlphaEdit(layers=[1, 2], context=CTX, target=Z, nullspace_threshold=float(torch.linalg.eigvalsh(c).max()) * 2)
    editor = Editor(model, tokenizer, method, stats)
    editor.edit(REQS[0])
    kept = {n: k.clone() for n, k in method.null_kkt.items()}
    weights = _state(model)
    real = type(method)._write

    def poisoned(self, *args):
        written = real(self, *args)  # the keys are recorded in here
        for d in written.deltas.values():
            d.view(-1)[0] = float("nan")
        return written

    monkeypatch.setattr(type(method), "_write", poisoned)
    with pytest.raises(FloatingPointError, match="NaN/inf"):
        editor.edit(REQS[1])
    assert all(torch.equal(method.null_kkt[n], kept[n]) for n in kept)
    assert _equal(model, weights) and editor.requests == REQS[:1]
