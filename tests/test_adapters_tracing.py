"""Architecture adapters and tracing on tiny random models of every supported family (no downloads)."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, make_tiny_model
from torch import nn

from eac_lightning.models.adapters import (
    ARCHITECTURES,
    UnsupportedArchitectureError,
    get_spec,
    key_dim,
    mlp_out_name,
    num_layers,
    weight_view,
)
from eac_lightning.models.tracing import (
    add_at_positions,
    capture,
    edit_output,
    layers_from,
)

VOCAB = 128


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    return {f: make_tiny_model(f, VOCAB) for f in FAMILIES}


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two right-padded sequences (the layout the methods use)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return ids, mask


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_resolves_every_named_module(models, family):
    model = models[family]
    spec = get_spec(model)
    assert spec is ARCHITECTURES[model.config.model_type]
    assert num_layers(model) == 4
    for template in (spec.mlp_out, spec.mlp, spec.attn):
        model.get_submodule(template.format(3))
    for name in (spec.embed, spec.final_norm, spec.lm_head, spec.layer(0)):
        model.get_submodule(name)
    # The LM head maps the final hidden size to the vocabulary.
    assert model.get_submodule(spec.lm_head).weight.shape == (VOCAB, model.config.hidden_size)


@pytest.mark.parametrize("family", FAMILIES)
def test_weight_view_is_out_by_in_and_writes_through(models, family):
    """weight_view is (out, in) for every family, including GPT-2's Conv1D stored as (in, out), and is a view."""
    model = models[family]
    name = mlp_out_name(model, 1)
    module = model.get_submodule(name)
    hidden = model.config.hidden_size
    w = weight_view(model, name)
    assert w.shape[0] == hidden
    assert key_dim(model, name) == w.shape[1] > hidden
    if family == "gpt2":
        assert module.weight.shape == (w.shape[1], hidden)  # Conv1D: stored (in, out)
    else:
        assert module.weight.shape == w.shape
    # The module computes y = W x (+ b) with W the (out, in) view.
    with capture(model, [name]) as rec:
        ids, mask = _batch()
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    bias = getattr(module, "bias", None)
    expected = rec[name].input @ w.T + (bias if bias is not None else 0)
    torch.testing.assert_close(rec[name].output, expected, atol=1e-5, rtol=1e-5)
    # Writing to the view writes the stored weight.
    before = module.weight.detach().clone()
    with torch.no_grad():
        w[0, 1] += 1.0
    changed = (module.weight.detach() != before).nonzero().tolist()
    assert changed == ([[1, 0]] if family == "gpt2" else [[0, 1]])
    with torch.no_grad():
        w[0, 1] -= 1.0


@pytest.mark.parametrize("family", FAMILIES)
def test_layers_from_equals_full_forward(models, family):
    """Running layers start..L-1 from a captured layer input reproduces the full forward (all families, all starts)."""
    model = models[family]
    spec = get_spec(model)
    ids, mask = _batch()
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
        for start in range(num_layers(model)):
            with capture(model, [spec.layer(start)]) as rec:
                model(input_ids=ids, attention_mask=mask)
            with layers_from(model, start) as run:
                out = run(rec[spec.layer(start)].input, mask)
            valid = mask.bool()
            torch.testing.assert_close(out[valid], full[valid], atol=1e-5, rtol=1e-4)
            assert num_layers(model) == 4  # the layer list is restored on exit


@pytest.mark.parametrize("family", FAMILIES)
def test_add_at_positions_changes_exactly_those_positions(models, family):
    model = models[family]
    spec = get_spec(model)
    ids, mask = _batch()
    d = model.config.hidden_size
    rows, cols = torch.tensor([0, 1]), torch.tensor([3, 5])
    delta = torch.randn(2, d)
    with torch.no_grad():
        with capture(model, [spec.layer(2)]) as ref:
            model(input_ids=ids, attention_mask=mask)
        with add_at_positions(model, spec.layer(1), delta, rows, cols), capture(model, [spec.layer(2)]) as rec:
            model(input_ids=ids, attention_mask=mask)
    diff = rec[spec.layer(2)].input - ref[spec.layer(2)].input  # next layer's input = this layer's output
    expected = torch.zeros_like(diff)
    expected[rows, cols] = delta
    torch.testing.assert_close(diff, expected, atol=1e-5, rtol=1e-5)
    # One vector broadcast to every position.
    with torch.no_grad(), add_at_positions(model, spec.layer(1), delta[0], rows, cols), capture(
        model, [spec.layer(2)]
    ) as rec:
        model(input_ids=ids, attention_mask=mask)
    diff = rec[spec.layer(2)].input - ref[spec.layer(2)].input
    torch.testing.assert_close(diff[rows, cols], delta[0].expand(2, d), atol=1e-5, rtol=1e-5)
    assert _hook_count(model) == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_no_hook_survives_an_exception(models, family):
    model = models[family]
    spec = get_spec(model)
    before = _hook_count(model)
    layers = list(model.get_submodule(spec.layers))
    ids, mask = _batch()
    names = [spec.layer(0), mlp_out_name(model, 1)]
    with pytest.raises(RuntimeError, match="boom"):
        with capture(model, names):
            raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        with edit_output(model, names[1], lambda x: x * 2):
            raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        with add_at_positions(model, names[0], torch.zeros(model.config.hidden_size), torch.tensor([0]),
                              torch.tensor([0])):
            model(input_ids=ids, attention_mask=mask)
            raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        with layers_from(model, 2):
            assert num_layers(model) == 2
            raise RuntimeError("boom")
    assert _hook_count(model) == before
    assert list(model.get_submodule(spec.layers)) == layers


def test_capture_records_decoder_layer_input_and_output(models):
    """Consecutive decoder layers: the output of layer i is the input of layer i+1."""
    model = models["llama"]
    spec = get_spec(model)
    ids, mask = _batch()
    with torch.no_grad(), capture(model, [spec.layer(0), spec.layer(1)]) as rec:
        model(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(rec[spec.layer(0)].output, rec[spec.layer(1)].input)
    assert not rec[spec.layer(0)].output.requires_grad


def test_unknown_architecture_names_it_and_says_how_to_add_it(tmp_path):
    from transformers import AutoModelForCausalLM, BloomConfig

    from eac_lightning.models.loading import load_model

    cfg = BloomConfig(vocab_size=64, hidden_size=16, n_layer=1, n_head=2)
    model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(UnsupportedArchitectureError) as err:
        get_spec(model)
    msg = str(err.value)
    assert "'bloom'" in msg
    assert "adapter" in msg and "mlp_out" in msg and "ARCHITECTURES" in msg  # says how to declare it
    assert "gpt2" in msg and "opt" in msg  # lists the known families
    # load_model fails early (before the tokenizer) with the same message.
    model.save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError, match="'bloom'"):
        load_model(str(tmp_path))


def test_a_model_folder_states_its_editing_defaults(tmp_path):
    """Model loading reads edit layers and the key-statistics corpus from the folder's editing.json (whatever
    trained the model writes it); without one, the rule of thumb and WikiText; a malformed one names the file."""
    from transformers import AutoModelForCausalLM

    from eac_lightning.models.loading import (
        EDITING_DEFAULTS,
        default_layers,
        default_stats_corpus,
        write_editing_defaults,
    )

    make_tiny_model("gpt2", VOCAB).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert default_layers(model).source.startswith("rule of thumb")
    assert default_stats_corpus(model, "wikitext") == "wikitext"

    (tmp_path / "sample.jsonl").write_text('{"text": "a b c"}\n')
    write_editing_defaults(tmp_path, 2, [1, 2], "sample.jsonl")
    layers = default_layers(model)
    assert (layers.rome, layers.memit, layers.source) == (2, (1, 2), str(tmp_path / EDITING_DEFAULTS))
    assert default_stats_corpus(model, "wikitext") == str(tmp_path / "sample.jsonl")

    (tmp_path / EDITING_DEFAULTS).write_text("[1, 2]")
    with pytest.raises(ValueError, match=EDITING_DEFAULTS):
        default_layers(model)


BLOOM_ADAPTER = {
    "model_type": "bloom", "layers": "transformer.h", "mlp_out": "transformer.h.{}.mlp.dense_4h_to_h",
    "mlp": "transformer.h.{}.mlp", "attn": "transformer.h.{}.self_attention",
    "embed": "transformer.word_embeddings", "final_norm": "transformer.ln_f",
}


@pytest.mark.parametrize("as_file", [False, True])
def test_adapter_declared_as_data_makes_a_new_family_editable(tmp_path, tokenizer, as_file, monkeypatch):
    """A dense family without an entry becomes editable from module names alone (a dict or a YAML file), and a
    ROME edit through it writes v* at k* like a built-in family's."""
    import yaml
    from transformers import AutoModelForCausalLM, BloomConfig

    from eac_lightning.data.requests import EditRequest
    from eac_lightning.methods import ROME, ContextTemplateParams
    from eac_lightning.methods.target import compute_keys
    from eac_lightning.models.loading import load_model

    monkeypatch.setattr("eac_lightning.models.adapters.ARCHITECTURES", dict(ARCHITECTURES))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(BloomConfig(vocab_size=len(tokenizer), hidden_size=32, n_layer=3,
                                                         n_head=4)).eval()
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    adapter = BLOOM_ADAPTER
    if as_file:
        (tmp_path / "bloom.yaml").write_text(yaml.safe_dump(BLOOM_ADAPTER))
        adapter = str(tmp_path / "bloom.yaml")
    model, tok = load_model(str(tmp_path / "m"), adapter=adapter)
    assert get_spec(model).mlp_out == BLOOM_ADAPTER["mlp_out"]
    method = ROME(layer=1, context=ContextTemplateParams(length_count=[[3, 1]]), mom2_adjustment=False)
    method.setup(model, tok, None)
    req = EditRequest(prompt="{} is located in", subject="The Eiffel Tower", target_new="Rome")
    w0 = weight_view(model, mlp_out_name(model, 1)).detach().clone()
    targets = method.compute_targets(model, tok, [req])
    k = compute_keys(model, tok, [req], 1, method.templates)[0]
    method.write(model, tok, targets)
    w1 = weight_view(model, mlp_out_name(model, 1)).detach()
    torch.testing.assert_close(w1 @ k, w0 @ k + targets[0].delta, atol=1e-4, rtol=1e-4)


def test_adapter_with_a_wrong_module_name_says_which_field(monkeypatch):
    from transformers import AutoModelForCausalLM, BloomConfig

    from eac_lightning.models.adapters import register_adapter

    monkeypatch.setattr("eac_lightning.models.adapters.ARCHITECTURES", dict(ARCHITECTURES))
    model = AutoModelForCausalLM.from_config(BloomConfig(vocab_size=64, hidden_size=16, n_layer=1, n_head=2))
    with pytest.raises(UnsupportedArchitectureError, match="mlp_out=.*dense_out"):
        register_adapter(model, {**BLOOM_ADAPTER, "mlp_out": "transformer.h.{}.mlp.dense_out"})
    with pytest.raises(ValueError, match="unknown field.*mlp_in"):
        register_adapter(model, {**BLOOM_ADAPTER, "mlp_in": "x"})
    with pytest.raises(ValueError, match="missing field.*final_norm"):
        register_adapter(model, {k: v for k, v in BLOOM_ADAPTER.items() if k != "final_norm"})
    assert "bloom" not in __import__("eac_lightning.models.adapters", fromlist=["x"]).ARCHITECTURES


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_mixture_of_experts_is_refused_saying_why(family, monkeypatch):
    from transformers import AutoConfig, AutoModelForCausalLM

    from eac_lightning.models.adapters import register_adapter

    cfg = AutoConfig.for_model(family, vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=1, moe_intermediate_size=32,
                               shared_expert_intermediate_size=32, num_local_experts=4, num_experts=4)
    model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(UnsupportedArchitectureError, match="mixture-of-experts.*4 experts.*dense"):
        get_spec(model)
    # declaring an adapter does not get round it
    monkeypatch.setattr("eac_lightning.models.adapters.ARCHITECTURES", dict(ARCHITECTURES))
    with pytest.raises(UnsupportedArchitectureError, match="mixture-of-experts"):
        register_adapter(model, {"layers": "model.layers", "mlp_out": "model.layers.{}.mlp", "mlp": "model.layers.{}.mlp",
                                 "attn": "model.layers.{}.self_attn", "embed": "model.embed_tokens",
                                 "final_norm": "model.norm"})


def test_fused_gelu_is_gpt2s_gelu_new(tokenizer):
    """Loading swaps GPT-2's five-operation gelu_new for torch's fused tanh GELU: same logits, none left."""
    from transformers.activations import NewGELUActivation

    from eac_lightning.models.loading import fuse_activations

    model = make_tiny_model("gpt2", len(tokenizer), seed=3)
    ids = tokenizer(["The Eiffel Tower is located in"], return_tensors="pt")["input_ids"]
    assert any(type(m) is NewGELUActivation for m in model.modules())
    with torch.no_grad():
        before = model(ids).logits
        after = fuse_activations(model)(ids).logits
    assert not any(type(m) is NewGELUActivation for m in model.modules())
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
