"""Shared fixtures: an offline BPE tokenizer and tiny random models of every supported family."""

from __future__ import annotations

import os
from pathlib import Path

# One torch thread unless the caller chose (OMP_NUM_THREADS set): the tests' tensors are small, and torch's default of
# one thread per core oversubscribes a shared machine. The fast tier took 195 s under load with 2 threads and 73 s
# with 1 (2-core machine); set before torch is imported, so the CLI subprocesses the tests start inherit it too.
if "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"
    _ONE_THREAD = True
else:
    _ONE_THREAD = False

import pytest  # noqa: E402
import torch  # noqa: E402

if _ONE_THREAD:
    torch.set_num_threads(1)  # in case torch was imported before this file (a plugin)

from eac_lightning.paths import data_dir

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Keep test caches (statistics, testbeds) out of the user's cache unless one is given."""
    if "EAC_CACHE_DIR" not in os.environ:
        os.environ["EAC_CACHE_DIR"] = str(tmp_path_factory.mktemp("eac_cache"))
    yield


@pytest.fixture(scope="session")
def wikitext_lines() -> list[str]:
    path = data_dir() / "wikitext" / "wikitext-2_valid.txt"
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if len(ln.strip()) > 40]
    return lines[:1500]


@pytest.fixture(scope="session")
def tokenizer(wikitext_lines):
    from eac_lightning.models.tokenizer import train_bpe_tokenizer

    extra = [
        "The Eiffel Tower is located in Paris . Danielle Darrieux speaks French . Angola is located in Africa .",
        "Toko Yasuda plays the guitar . Rome is the capital of Italy . Apple was founded by Steve Jobs .",
    ]
    return train_bpe_tokenizer(wikitext_lines + extra * 5, vocab_size=512)


def make_tiny_model(family: str, vocab_size: int, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised 4-layer model of ``family`` built from a config (no download)."""
    from transformers import (
        AutoModelForCausalLM,
        FalconConfig,
        Gemma2Config,
        Gemma3TextConfig,
        GemmaConfig,
        GPT2Config,
        GPTJConfig,
        GPTNeoXConfig,
        LlamaConfig,
        MistralConfig,
        OPTConfig,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
    )

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if family == "gpt2":
        cfg = GPT2Config(n_layer=4, n_embd=64, n_head=4, n_positions=128, resid_pdrop=0.0, embd_pdrop=0.0,
                         attn_pdrop=0.0, **common)
    elif family == "gptj":
        cfg = GPTJConfig(n_layer=4, n_embd=64, n_head=4, n_positions=128, rotary_dim=8, resid_pdrop=0.0,
                         embd_pdrop=0.0, attn_pdrop=0.0, **common)
    elif family == "gpt_neox":
        cfg = GPTNeoXConfig(num_hidden_layers=4, hidden_size=64, num_attention_heads=4, intermediate_size=256,
                            max_position_embeddings=128, **common)
    elif family == "llama":
        cfg = LlamaConfig(num_hidden_layers=4, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                          intermediate_size=128, max_position_embeddings=128, **common)
    elif family == "mistral":
        cfg = MistralConfig(num_hidden_layers=4, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=128, max_position_embeddings=128, **common)
    elif family == "qwen2":
        cfg = Qwen2Config(num_hidden_layers=4, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                          intermediate_size=128, max_position_embeddings=128, **common)
    elif family in GATED:
        config_class = {"qwen3": Qwen3Config, "gemma": GemmaConfig, "gemma2": Gemma2Config,
                        "gemma3_text": Gemma3TextConfig, "phi3": Phi3Config}[family]
        cfg = config_class(num_hidden_layers=4, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=16, intermediate_size=128, max_position_embeddings=128, **common)
    elif family == "falcon":
        cfg = FalconConfig(num_hidden_layers=4, hidden_size=64, num_attention_heads=4, hidden_dropout=0.0,
                           attention_dropout=0.0, **common)
    elif family == "opt":
        cfg = OPTConfig(num_hidden_layers=4, hidden_size=64, num_attention_heads=4, ffn_dim=128,
                        word_embed_proj_dim=64, max_position_embeddings=128, dropout=0.0, **common)
    else:
        raise ValueError(family)
    model = AutoModelForCausalLM.from_config(cfg)
    return model.eval()


GATED = ["qwen3", "gemma", "gemma2", "gemma3_text", "phi3"]  # llama-like gated MLPs (Phi-3's gate_up fused)
FAMILIES = ["gpt2", "gptj", "gpt_neox", "llama", "mistral", "qwen2", *GATED, "falcon", "opt"]


@pytest.fixture(scope="session")
def tiny_gpt2(tokenizer):
    return make_tiny_model("gpt2", len(tokenizer))


@pytest.fixture(scope="session")
def tiny_testbed(_isolated_cache) -> Path:
    """The ``tiny`` knowledge testbed as it ships in the package (read it, never write to it)."""
    from eac_lightning.testbed import shipped_testbed

    folder = shipped_testbed("tiny")
    assert folder is not None, "the package ships testbed:tiny (eac_lightning/assets/testbeds/tiny)"
    return folder


def wikitext_stats(model, tokenizer, wikitext_lines, folder: Path):
    """Key statistics of layers 1 and 2 of ``model`` over 2048 WikiText tokens, cached in ``folder``."""
    from eac_lightning.models.adapters import mlp_out_name
    from eac_lightning.stats.covariance import CovarianceStore

    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(wikitext_lines[:300]), encoding="utf-8")
    store = CovarianceStore(model, tokenizer, corpus=str(corpus), num_tokens=2048, seq_len=64, batch_size=8,
                            directory=folder)
    store.prefetch([mlp_out_name(model, l) for l in (1, 2)])
    return store


@pytest.fixture(scope="module")
def stats(gpt2, tokenizer, wikitext_lines, tmp_path_factory):
    """Key statistics of layers 1 and 2 of the module's own ``gpt2`` fixture, over 2048 WikiText tokens."""
    return wikitext_stats(gpt2, tokenizer, wikitext_lines, tmp_path_factory.mktemp("stats"))
