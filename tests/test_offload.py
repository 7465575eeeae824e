"""A model larger than one device, proxied on the CPU: the layers above the edited ones are offloaded to disk
through accelerate's big-model dispatch (``load_model(..., device_map=...)``), and ROME and MEMIT write the same
deltas as on the whole model in memory."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("accelerate")

from conftest import make_tiny_model  # noqa: E402

from eac_lightning.data.requests import EditRequest  # noqa: E402
from eac_lightning.methods import MEMIT, ROME, ContextTemplateParams, TargetHyperParams  # noqa: E402
from eac_lightning.methods.edit import edit
from eac_lightning.models.loading import load_model  # noqa: E402

CTX = ContextTemplateParams(length_count=[[3, 2]])
REQS = [EditRequest(prompt="{} is located in", subject="The Eiffel Tower", target_new="Rome"),
        EditRequest(prompt="{} speaks", subject="Danielle Darrieux", target_new="English")]
# Layers 0-1 (edited) and the embeddings in memory, layers 2-3 on disk, the head back in memory.
DEVICE_MAP = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
              "model.layers.1": "cpu", "model.layers.2": "disk", "model.layers.3": "disk", "model.norm": "cpu",
              "lm_head": "cpu"}


@pytest.fixture(scope="module")
def saved(tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("offload")
    make_tiny_model("llama", len(tokenizer)).save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    return folder


@pytest.mark.parametrize("method", [
    lambda: ROME(layer=1, context=CTX, mom2_adjustment=False, target=TargetHyperParams(num_steps=5)),
    lambda: MEMIT(layers=[0, 1], context=CTX, target=TargetHyperParams(num_steps=5), mom2_update_weight=100.0),
], ids=["rome", "memit"])
def test_disk_offloaded_model_gets_the_deltas_of_the_whole_model(saved, method):
    from eac_lightning.stats.covariance import Covariance

    whole, tok = load_model(str(saved / "model"))
    dispatched, _ = load_model(str(saved / "model"), device_map=DEVICE_MAP, offload_folder=str(saved / "offload"))
    assert dispatched.model.layers[3].mlp.down_proj.weight.device.type == "meta"  # really on disk
    deltas = []
    for model in (whole, dispatched):
        m = method()

        class IdentityStats:  # C = I for both: the comparison is of the dispatch, not of the statistics
            def prefetch(self, names):
                pass

            def get(self, name, d=128):
                return Covariance(torch.eye(d, dtype=torch.float64), 1, damping=0.0)

        m.setup(model, tok, IdentityStats())
        torch.manual_seed(0)
        deltas.append(edit(m, model, tok, REQS).deltas)
    assert deltas[0].keys() == deltas[1].keys()
    for name in deltas[0]:
        assert deltas[0][name].abs().max() > 0
        torch.testing.assert_close(deltas[1][name], deltas[0][name], atol=1e-6, rtol=1e-5)
