"""``eac-lightning fit`` on a placed model (accelerate's big-model dispatch, proxied on the CPU): a small llama with
two of its four layers on disk edits like the whole model, resumes like an uninterrupted placed run, and refuses a
placement that offloads an edited layer."""

from __future__ import annotations

import pytest
import torch
import yaml
from cli_tools import current_deltas, run_cli, write_config
from conftest import make_tiny_model

pytest.importorskip("accelerate")
pytestmark = pytest.mark.slow

# Layers 0-1 (ROME edits layer 1) and the embeddings in memory, layers 2-3 on disk, the head back in memory.
DEVICE_MAP = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
              "model.layers.1": "cpu", "model.layers.2": "disk", "model.layers.3": "disk", "model.norm": "cpu",
              "lm_head": "cpu"}


@pytest.fixture(scope="module")
def llama(tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("placed") / "llama"
    make_tiny_model("llama", len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _config(path, root, llama, placed: bool, num_edits: int = 3):
    method = {"class_path": "eac_lightning.methods.ROME",
              "init_args": {"layer": 1, "target": {"num_steps": 5}, "context": {"length_count": [[3, 2]]}}}
    model = {"model": str(llama), "method": method, "stats_tokens": 2000}
    if placed:
        model.update(device_map=DEVICE_MAP, offload_folder=str(root.parent / f"{root.name}-offload"))
    return write_config(path, root, num_edits=num_edits, extra={"model": model, "data": {"num_retention": 0},
                                                                "eval": {"every": 0}})


def test_a_placed_model_edits_like_the_whole_model_and_resumes_exactly(llama, tmp_path):
    whole, placed, killed = tmp_path / "whole", tmp_path / "placed", tmp_path / "killed"
    run_cli("fit", "--config", str(_config(tmp_path / "whole.yaml", whole, llama, placed=False)))
    proc = run_cli("fit", "--config", str(_config(tmp_path / "placed.yaml", placed, llama, placed=True)))
    assert "model placement (--model.device_map): cpu:" in proc.stderr and "disk: model.layers.2" in proc.stderr
    a, b = current_deltas(whole), current_deltas(placed)
    assert a.keys() == b.keys() == {"model.layers.1.mlp.down_proj"}
    for k in a:
        assert a[k].abs().max() > 0
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4)
    # exported: the whole model with the placed run's edits
    run_cli("export", str(placed), str(tmp_path / "exported"))
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "exported")
    base = AutoModelForCausalLM.from_pretrained(llama)
    (name, delta), = a.items()
    w_e, w_b = exported.get_submodule(name).weight, base.get_submodule(name).weight
    torch.testing.assert_close(w_e - w_b, delta, atol=1e-5, rtol=1e-4)
    # stopped after one edit and resumed: the uninterrupted placed run, bit for bit
    cfg = _config(tmp_path / "killed.yaml", killed, llama, placed=True)
    kill = tmp_path / "kill.yaml"
    kill.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "run_probes.KillAfter", "init_args": {"steps": 1}}]}}))
    assert run_cli("fit", "--config", str(cfg), "--config", str(kill), check=False).returncode
    run_cli("fit", "--config", str(cfg), "--ckpt_path", "last")
    c = current_deltas(killed)
    assert all(torch.equal(c[k], b[k]) for k in b)


def test_a_placement_that_offloads_the_edited_layer_is_refused_by_name(llama, tmp_path):
    cfg = _config(tmp_path / "bad.yaml", tmp_path / "bad", llama, placed=True)
    proc = run_cli("fit", "--config", str(cfg), "--model.method.init_args.layer", "2", check=False)
    assert proc.returncode != 0
    assert "offloads model.layers.2.mlp.down_proj to disk" in proc.stderr and "Traceback" not in proc.stderr
