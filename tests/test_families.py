"""Every supported family takes a ROME edit through the Python API with key statistics (C⁻¹ in the update), on a
tiny random model built from its transformers config class (no download)."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, make_tiny_model

from eac_lightning.data.requests import EditRequest
from eac_lightning.editor import Editor
from eac_lightning.methods import ROME, ContextTemplateParams, TargetHyperParams
from eac_lightning.methods.target import compute_keys
from eac_lightning.models.adapters import mlp_out_name, weight_view
from eac_lightning.stats.covariance import CovarianceStore

REQ = EditRequest(prompt="{} is located in", subject="The Eiffel Tower", target_new="Rome")


@pytest.fixture(scope="module")
def corpus(wikitext_lines, tmp_path_factory):
    path = tmp_path_factory.mktemp("families") / "corpus.txt"
    path.write_text("\n".join(wikitext_lines[:200]), encoding="utf-8")
    return path


@pytest.mark.parametrize("family", FAMILIES)
def test_rome_edit_through_the_editor_on_every_family(tokenizer, corpus, family):
    model = make_tiny_model(family, len(tokenizer))
    stats = CovarianceStore(model, tokenizer, corpus=str(corpus), num_tokens=1024, seq_len=64, batch_size=8,
                            directory=corpus.parent)
    method = ROME(layer=1, context=ContextTemplateParams(length_count=[[3, 1]]), target=TargetHyperParams(num_steps=5))
    method.setup(model, tokenizer, stats)
    name = mlp_out_name(model, 1)
    cov = stats.get(name)
    assert cov.matrix.shape == (weight_view(model, name).shape[1],) * 2  # keys in (batch, seq, d) layout (OPT)
    w0 = weight_view(model, name).detach().clone()
    k = compute_keys(model, tokenizer, [REQ], 1, method.templates)[0]
    targets = method.compute_targets(model, tokenizer, [REQ])
    deltas = method.write(model, tokenizer, targets).deltas
    w1 = weight_view(model, name).detach()
    d = deltas[name]
    assert torch.isfinite(d).all() and d.norm() > 0
    assert torch.linalg.matrix_rank(d.double(), rtol=1e-5) == 1
    torch.testing.assert_close(w1 @ k, w0 @ k + targets[0].delta, atol=1e-4 * (1 + (w0 @ k).abs().max().item()),
                               rtol=1e-4)
    # and through Editor.edit, which undoes exactly (the Editor owns the weights from here: W = W_base + D)
    editor = Editor(model, tokenizer, method, stats)
    before = weight_view(model, name).detach().clone()
    editor.edit(REQ)
    assert not torch.equal(weight_view(model, name), before)
    editor.undo()
    assert torch.equal(weight_view(model, name), before)
