"""Half-precision weights: the model keeps its dtype, the edit path computes in float32/float64 and casts the
update once, and edits still take."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model

from eac_lightning.data.requests import EditRequest
from eac_lightning.editor import Editor
from eac_lightning.methods import (
    MEMIT,
    ROME,
    ContextTemplateParams,
    EACHyperParams,
    TargetHyperParams,
)
from eac_lightning.models.adapters import mlp_out_name
from eac_lightning.models.encoding import encode_right_padded, encode_target
from eac_lightning.stats.covariance import CovarianceStore

CTX = ContextTemplateParams(length_count=[[3, 2]])
REQ = EditRequest(prompt="{} is located in", subject="The Eiffel Tower", target_new="Rome")
METHODS = {
    "rome": lambda: ROME(layer=1, context=CTX, target=TargetHyperParams(num_steps=10)),
    "rome-eac": lambda: ROME(layer=1, context=CTX, target=TargetHyperParams(num_steps=10), eac=EACHyperParams()),
    "memit": lambda: MEMIT(layers=[1, 2], context=CTX, target=TargetHyperParams(num_steps=10, clamp_norm_factor=4.0),
                           mom2_update_weight=100.0),
    "memit-eac": lambda: MEMIT(layers=[1, 2], context=CTX, target=TargetHyperParams(num_steps=10, clamp_norm_factor=4.0),
                               mom2_update_weight=100.0, eac=EACHyperParams()),
}


def _llama(vocab_size: int, dtype: torch.dtype) -> torch.nn.Module:
    """A tiny random llama whose weights are large enough (init std 0.2) for an edit at the subject to move the
    output: at the usual 0.02 the logits are near-uniform and no target is reachable under ROME's norm clamp."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab_size, num_hidden_layers=4, hidden_size=64, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=128, initializer_range=0.2, pad_token_id=0)
    return AutoModelForCausalLM.from_config(cfg).eval().to(dtype)


def _target_logprob(model, tok, req: EditRequest) -> float:
    """log P(target | prompt), teacher-forced."""
    target = encode_target(tok, req.target_new)
    ids, _ = encode_right_padded(tok, [req.prompt_text + tok.decode(target)], "cpu")
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    n = ids.shape[1]
    return sum(logp[n - len(target) - 1 + i, t].item() for i, t in enumerate(target))


@pytest.fixture(scope="module")
def corpus(wikitext_lines, tmp_path_factory):
    path = tmp_path_factory.mktemp("dtype") / "corpus.txt"
    path.write_text("\n".join(wikitext_lines[:200]), encoding="utf-8")
    return path


def _edit(tokenizer, corpus, method: str, dtype: torch.dtype):
    """(model, deltas, stats, gain in log P(target)) of one edit of a fresh tiny llama in ``dtype``."""
    model = _llama(len(tokenizer), dtype)
    stats = CovarianceStore(model, tokenizer, corpus=str(corpus), num_tokens=1024, seq_len=64, batch_size=8,
                            directory=corpus.parent)
    editor = Editor(model, tokenizer, METHODS[method](), stats)
    before = _target_logprob(model, tokenizer, REQ)
    deltas = editor.edit(REQ).deltas
    return model, deltas, stats, _target_logprob(model, tokenizer, REQ) - before


@pytest.mark.parametrize("method", sorted(METHODS))
def test_bfloat16_llama_stays_bfloat16_and_finite_and_the_edit_takes(tokenizer, corpus, method):
    model, deltas, stats, gain = _edit(tokenizer, corpus, method, torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert all(torch.isfinite(p).all() for p in model.parameters())
    for d in deltas.values():
        assert d.dtype == torch.bfloat16 and torch.isfinite(d).all() and d.abs().max() > 0
    assert stats.get(mlp_out_name(model, 1)).matrix.dtype == torch.float64  # statistics are not bf16
    # The edit takes as it does in float32 (gains on this random model: ROME ~3.8 nats, MEMIT ~0.7).
    _, _, _, gain32 = _edit(tokenizer, corpus, method, torch.float32)
    assert gain > 0.05 and gain > 0.5 * gain32


def test_editor_load_takes_dtype_and_device(tmp_path, tokenizer):
    model = make_tiny_model("llama", len(tokenizer))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    editor = Editor.load(str(tmp_path), ROME(layer=1, context=CTX, mom2_adjustment=False), dtype="bfloat16",
                         device="cpu", num_tokens=512)
    assert {p.dtype for p in editor.model.parameters()} == {torch.bfloat16}
    assert editor.stats.num_tokens == 512  # what is not a load option still reaches the statistics
    with pytest.raises(ValueError, match="int8.*floating-point"):
        Editor.load(str(tmp_path), "rome", dtype="int8")


@pytest.mark.slow
def test_float16_on_cpu_edits_without_a_non_finite_loss(tiny_testbed):
    """float16 weights on the CPU: the quickstart's ROME-EAC once stopped at a NaN loss at step 1 on this request
    (δ and ‖v₀‖² were float16); the optimisation now runs in float32 and the edit is finite and float16."""
    from eac_lightning.editor import method_from_preset
    from eac_lightning.paths import CONFIGS_DIR

    method = method_from_preset(str(CONFIGS_DIR / "quickstart.yaml"))
    method.context = CTX
    editor = Editor.load(str(tiny_testbed), method, device="cpu", dtype="float16", num_tokens=4096)
    req = EditRequest(prompt="{} plays the instrument", subject="Friedrich Gulda", target_new="violin")
    before = _target_logprob(editor.model, editor.tokenizer, req)
    deltas = editor.edit(req).deltas
    assert all(d.dtype == torch.float16 and torch.isfinite(d).all() for d in deltas.values())
    assert all(torch.isfinite(p).all() for p in editor.model.parameters())
    assert _target_logprob(editor.model, editor.tokenizer, req) > before



@pytest.mark.slow
def test_fit_in_bfloat16_edits_as_float32_does_and_records_where_the_time_went(tmp_path):
    """``eac-lightning fit --model.dtype bfloat16``: ROME's edits of the tiny testbed with bfloat16 weights take as
    they do in float32 (the same edits reach their targets in the ledger's teacher-forced check after each write, at
    least one does, and each update's norm is float32's within 2 %), and summary.json says where the time went."""
    import json

    from cli_tools import run_cli, write_config

    rome = {"class_path": "eac_lightning.methods.ROME",
            "init_args": {"target": {"num_steps": 20}, "context": {"length_count": [[5, 2]]}}}
    ledgers, summaries = {}, {}
    for dtype in ("float32", "bfloat16"):
        cfg = write_config(tmp_path / f"{dtype}.yaml", tmp_path / dtype, num_edits=3,
                           extra={"model": {"dtype": dtype, "method": rome, "method_settings": "auto"},
                                  "data": {"num_retention": 0}, "eval": {"every": 0, "tasks": [], "probes": []}})
        run_cli("fit", "--config", str(cfg))
        ledgers[dtype] = [json.loads(x) for x in (tmp_path / dtype / "edits.jsonl").read_text().splitlines()]
        summaries[dtype] = json.loads((tmp_path / dtype / "summary.json").read_text())
    half, full = ledgers["bfloat16"], ledgers["float32"]
    assert [r["success"] for r in half] == [r["success"] for r in full] and any(r["success"] for r in half), half
    for a, b in zip(half, full):
        assert a["delta_norm"] == pytest.approx(b["delta_norm"], rel=0.02)
    summary = summaries["bfloat16"]
    phases = summary["phase_seconds"]
    assert {"statistics", "setup", "target", "keys", "solve", "write", "evaluation"} <= set(phases)
    assert all(v >= 0 for v in phases.values()) and phases["target"] > phases["write"]
    # the edit steps' phases fit inside the run's wall time (which leaves out the statistics and the setup)
    steps = sum(v for k, v in phases.items() if k not in ("statistics", "setup"))
    assert steps <= summary["wall_seconds"] + 1
    assert summary["edit_steps"] == 3 and {"target", "solve"} <= set(summary["phase_seconds_first_step"])
