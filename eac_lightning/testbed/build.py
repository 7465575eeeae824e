"""Building, shipping and finding the offline knowledge testbed.

No model hub is reachable, so every benchmark needs a model that really stores the CounterFact / ZsRE facts it
edits. :func:`build_testbed` trains one (:mod:`eac_lightning.testbed.training`), measures it and saves it in plain
Hugging Face format::

    out/config.json, model.safetensors, tokenizer.json, ...   # AutoModelForCausalLM / AutoTokenizer.from_pretrained
    out/testbed.json                                          # preset, measured figures, corpus statistics
    out/editing.json                                          # edit layers and stats corpus, read by model loading
    out/facts.jsonl                                           # every trained fact (prompt, subject, target, source)
    out/heldout.jsonl                                         # the held-out paraphrases the figures are measured on
    out/stats_corpus.jsonl                                    # a sample of the training stream: the corpus of C
    out/logs/                                                 # Lightning CSVLogger

The reference builds of ``tiny`` and ``small`` ship inside the package (``eac_lightning/assets/testbeds``, with
the sha256 of every file in ``testbed.json``), so ``testbed:small`` loads with no build; :func:`testbed_path`
finds them, and builds into the cache (:func:`ensure_testbed`) only a preset that does not ship or whose recipe
changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from eac_lightning.models.loading import EDITING_DEFAULTS, write_editing_defaults
from eac_lightning.paths import ASSETS_DIR, cache_dir
from eac_lightning.testbed.corpus import Corpus
from eac_lightning.testbed.packing import SequencePacker
from eac_lightning.testbed.presets import (
    TESTBED_FORMAT,
    TestbedPreset,
    get_preset,
    preset_corpus,
)
from eac_lightning.testbed.training import train_testbed

STATS_CORPUS = "stats_corpus.jsonl"
STATS_CORPUS_TOKENS = 200_000  # twice the key statistics' default average (CovarianceStore.num_tokens)
#: where the reference builds ship
SHIPPED_DIR = ASSETS_DIR / "testbeds"


def write_stats_corpus(out: str | os.PathLike, packer: SequencePacker, tok, seed: int,
                       num_tokens: int = STATS_CORPUS_TOKENS) -> Path:
    """Write ``out/stats_corpus.jsonl``: fresh packed epochs of the training stream (``packer``, the one the model
    was trained with), decoded, one block per line.

    ROME and MEMIT take C = E[kkᵀ] over the edited model's pre-training text (Wikipedia for GPT-2; ROME Sec. 3.1);
    the testbed's pre-training text is this stream of fact sentences, WikiText and SST-2, so its C comes from here,
    not from WikiText alone. Measured on ``testbed:small`` (docs/testbed.md): with C over WikiText alone an edit's
    update also moves the neighbourhood prompts, whose keys are fact-sentence keys C has not seen.
    """
    rng = np.random.default_rng([seed, 1])  # another draw of the training distribution than the one trained on
    path = Path(out) / STATS_CORPUS
    tmp = path.with_suffix(".jsonl.tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8") as fh:
        while n < num_tokens:
            data = packer.epoch(rng)
            for ids, keep in zip(data.input_ids, data.loss_mask):
                if n >= num_tokens:
                    break
                ids = ids[keep]
                fh.write(json.dumps({"text": tok.decode(ids.tolist(), skip_special_tokens=True)},
                                    ensure_ascii=False) + "\n")
                n += len(ids)
    os.replace(tmp, path)
    return path


def first_token_accuracy(model, tok, prompts: Sequence[str], targets: Sequence[str], batch_size: int = 64) -> float:
    """Share of prompts whose greedy next token is the first token of ``" " + target`` (the testbed's fact accuracy)."""
    from eac_lightning.evaluation.probes import greedy_matches

    if not prompts:
        return float("nan")
    return float(np.mean(greedy_matches(model, tok, prompts, targets, first_token_only=True, batch_size=batch_size)))


def sst2_accuracy(model, tok, rows: Sequence[tuple[str, int]], batch_size: int = 32) -> float:
    """Share of SST-2 (text, label) rows whose label word is the more likely one after the EAC sentiment prompt
    (the general-ability task's scoring, :func:`eac_lightning.evaluation.tasks.classify`)."""
    from eac_lightning.evaluation.tasks import (
        LABEL_WORDS,
        TASKS,
        TaskExample,
        example_scores,
        format_sentiment,
    )

    if not rows:
        return float("nan")
    examples = [TaskExample(format_sentiment(t), [LABEL_WORDS["sst2"][y]], list(TASKS["sst2"].choices))
                for t, y in rows]
    return float(np.mean(example_scores("sst2", model, tok, examples, batch_size)))


def measure(model, tok, corpus: Corpus, preset: TestbedPreset) -> dict[str, Any]:
    """The figures of ``testbed.json``, overall and by source file."""
    from eac_lightning.evaluation.probes import perplexity
    from eac_lightning.evaluation.scoring import model_max_length

    model.eval()
    figs: dict[str, Any] = {}

    def acc(items):
        return first_token_accuracy(model, tok, [f.prompt for f in items], [f.target for f in items])

    facts = corpus.facts_of_kind("fact")
    trained = corpus.train_facts
    figs["fact_accuracy"] = acc(facts)
    figs["trained_prompt_accuracy"] = acc([f for f in trained if f.kind != "neighbourhood"])
    figs["heldout_paraphrase_accuracy"] = acc(corpus.heldout_facts)
    figs["neighbourhood_accuracy"] = acc(corpus.facts_of_kind("neighbourhood"))
    figs["attribute_accuracy"] = acc(corpus.facts_of_kind("attribute"))
    by_source: dict[str, dict[str, float]] = {}
    for src in sorted({f.source for f in trained}):
        name = Path(src).parent.name or Path(src).stem
        by_source[name] = {
            "fact_accuracy": acc([f for f in facts if f.source == src]),
            "heldout_paraphrase_accuracy": acc([f for f in corpus.heldout_facts if f.source == src]),
            "neighbourhood_accuracy": acc([f for f in corpus.facts_of_kind("neighbourhood") if f.source == src]),
        }
    figs["by_source"] = by_source
    figs["sst2_heldout_accuracy"] = sst2_accuracy(model, tok, corpus.sst2_heldout)
    figs["sst2_train_accuracy"] = sst2_accuracy(model, tok, corpus.sst2_train)
    # Windows of the model's context, each token scored once with at least half a window of context.
    ids = tok(corpus.wikitext_test, add_special_tokens=False)["input_ids"][:preset.ppl_tokens]
    figs["wikitext2_test_perplexity"] = perplexity(model, tok, ids, window=model_max_length(model))
    figs["wikitext2_test_tokens"] = max(0, len(ids) - 1)
    return figs


def build_testbed(
    out: str | os.PathLike,
    preset: str | TestbedPreset = "small",
    facts: Sequence[str | os.PathLike] | None = None,
    seed: int = 0,
    progress: bool = True,
    **overrides: Any,
) -> dict[str, Any]:
    """Build a testbed into ``out`` and return the contents of its ``testbed.json``.

    Args:
        out: output folder (created; existing files of the same name are overwritten).
        preset: ``tiny``, ``small``, ``base`` or a :class:`TestbedPreset`.
        facts: fact files/folders (CounterFact ROME or flat format, ZsRE MEND format); default the shipped
            ``counterfact`` and ``zsre`` folders.
        seed: seeds tokenizer data order, packing, initialisation and training (same seed, same model).
        progress: show Lightning's progress bar.
        **overrides: fields of the preset to change (e.g. ``epochs=5``).
    """
    t_start = time.time()
    p = get_preset(preset)
    if overrides:
        p = p.replace(**overrides)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = preset_corpus(p, facts, seed)
    model, tok, packer, train_seconds, steps = train_testbed(p, corpus, seed, log_dir=out, progress=progress)
    figures = measure(model, tok, corpus, p)
    model.save_pretrained(out, safe_serialization=True)
    save_tokenizer(tok, out)
    with open(out / "facts.jsonl", "w", encoding="utf-8") as fh:
        for f in corpus.train_facts:
            fh.write(json.dumps(f.to_dict(), ensure_ascii=False) + "\n")
    with open(out / "heldout.jsonl", "w", encoding="utf-8") as fh:
        for f in corpus.heldout_facts:
            fh.write(json.dumps(f.to_dict(), ensure_ascii=False) + "\n")
    write_stats_corpus(out, packer, tok, seed)
    info = {
        "format": TESTBED_FORMAT,
        "preset": p.to_dict(),
        "preset_fingerprint": p.fingerprint(),
        "seed": seed,
        "fact_files": sorted({f.source for f in corpus.train_facts}),
        "n_parameters": int(sum(t.numel() for t in model.parameters())),
        "train_seconds": round(train_seconds, 1),
        "train_steps": steps,
        "train_tokens": steps * p.batch_size * p.block_len,
        **{k: v for k, v in figures.items()},
        "build_seconds": round(time.time() - t_start, 1),
        "edit_layer": p.edit_layer,
        "memit_layers": list(p.memit_layers),
        "stats_corpus": STATS_CORPUS,
        "corpus": corpus.stats,
        "torch_threads": torch.get_num_threads(),
        "versions": _versions(),
    }
    (out / "testbed.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    write_editing_defaults(out, p.edit_layer, p.memit_layers, STATS_CORPUS)  # what model loading reads
    return info


def save_tokenizer(tok, out: str | os.PathLike) -> None:
    """Save the tokenizer so that any Hugging Face tool loads it as a plain fast tokenizer with left padding.

    ``padding_side`` is only saved when it is an init argument, and transformers 5 names its own class
    (``TokenizersBackend``) in ``tokenizer_config.json``; ``PreTrainedTokenizerFast`` loads in 4.x and 5.x alike.
    """
    tok.padding_side = "left"
    tok.init_kwargs["padding_side"] = "left"
    tok.save_pretrained(out)
    path = Path(out) / "tokenizer_config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["padding_side"] = "left"
    path.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")


def _versions() -> dict[str, str]:
    import lightning
    import tokenizers
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "lightning": lightning.__version__, "tokenizers": tokenizers.__version__}


def testbed_dir(preset: str | TestbedPreset, seed: int = 0) -> Path:
    """Where :func:`ensure_testbed` keeps a preset: ``<cache_dir>/testbed/<preset>-seed<seed>-<fingerprint>``."""
    p = get_preset(preset)
    return cache_dir() / "testbed" / f"{p.name}-seed{seed}-{p.fingerprint()}"


def ensure_testbed(preset: str | TestbedPreset, seed: int = 0, progress: bool = True) -> Path:
    """The folder of a built testbed, building it on first use.

    The build runs in a temporary folder beside the target and is renamed into place when complete, so an
    interrupted build never leaves a half-written testbed, and a concurrent build of the same preset just yields
    the one that finished first. A changed preset definition has a new fingerprint, hence a new folder.
    """
    final = testbed_dir(preset, seed)
    if (final / "testbed.json").exists():
        _sync_cached_build(final, get_preset(preset))
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        build_testbed(tmp, preset, seed=seed, progress=progress)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "testbed.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _sync_cached_build(folder: Path, preset: TestbedPreset) -> None:
    """Bring a cached build's edit layers (``testbed.json``, ``editing.json``) up to date without retraining (they
    are chosen by tracing and edit checks after a build; the model does not depend on them)."""
    path = folder / "testbed.json"
    info = json.loads(path.read_text(encoding="utf-8"))
    if info.get("edit_layer") != preset.edit_layer or info.get("memit_layers") != list(preset.memit_layers):
        info["edit_layer"], info["memit_layers"] = preset.edit_layer, list(preset.memit_layers)
        info["preset"].update(edit_layer=preset.edit_layer, memit_layers=list(preset.memit_layers))
        _write_json(path, info)
    write_editing_defaults(folder, info["edit_layer"], info["memit_layers"], info["stats_corpus"])


def _write_json(path: Path, info: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------------
# The shipped reference builds
# ----------------------------------------------------------------------------------------------------------------

#: the files of a build that ship (the CSV training log stays behind)
SHIPPED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "facts.jsonl", "heldout.jsonl", STATS_CORPUS, EDITING_DEFAULTS)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def ship_testbed(build: str | os.PathLike, weights_dtype: str = "float32", dest: Path | None = None) -> Path:
    """Copy a build into the package as its reference testbed (``assets/testbeds/<preset>``), the weights stored
    in ``weights_dtype`` (``float16`` halves the size; loading upcasts to the dtype asked for), and record the
    sha256 of every shipped file in its ``testbed.json`` (``shipped``), which :func:`verify_shipped` checks."""
    from safetensors.torch import load_file, save_file

    build = Path(build)
    info = json.loads((build / "testbed.json").read_text(encoding="utf-8"))
    dest = dest or SHIPPED_DIR / info["preset"]["name"]
    dest.mkdir(parents=True, exist_ok=True)
    for name in SHIPPED_FILES:
        if (build / name).exists():
            shutil.copyfile(build / name, dest / name)
    write_editing_defaults(dest, info["edit_layer"], info["memit_layers"], info["stats_corpus"])
    if weights_dtype != "float32":
        tensors = load_file(build / "model.safetensors")
        save_file({k: v.to(getattr(torch, weights_dtype)).contiguous() for k, v in tensors.items()},
                  dest / "model.safetensors", metadata={"format": "pt"})
    files = {name: _sha256(dest / name) for name in SHIPPED_FILES if (dest / name).exists()}
    info["shipped"] = {"weights_dtype": weights_dtype, "sha256": files, **_shipped_accuracy(dest)}
    _write_json(dest / "testbed.json", info)
    return dest


#: facts whose accuracy a shipped testbed records, for a quick re-check of its weights (tests/test_testbed.py)
SHIPPED_CHECK_FACTS = 200


def _shipped_accuracy(folder: Path) -> dict[str, float]:
    """Fact accuracy of the shipped weights as loaded (float32): over all facts, and over the first
    :data:`SHIPPED_CHECK_FACTS`, the sample a test re-measures."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    facts = [json.loads(line) for line in (folder / "facts.jsonl").read_text(encoding="utf-8").splitlines()]
    facts = [f for f in facts if f["kind"] == "fact"]
    sample = facts[:SHIPPED_CHECK_FACTS]
    return {
        "fact_accuracy": first_token_accuracy(model, tok, [f["prompt"] for f in facts], [f["target"] for f in facts]),
        "sample_fact_accuracy": first_token_accuracy(model, tok, [f["prompt"] for f in sample],
                                                     [f["target"] for f in sample]),
    }


class ShippedTestbedError(RuntimeError):
    """A shipped testbed's files do not match the fingerprint recorded when it was shipped."""


def verify_shipped(folder: str | os.PathLike) -> dict[str, Any]:
    """Check every file of a shipped testbed against the sha256 in its ``testbed.json``; returns that record."""
    folder = Path(folder)
    info = json.loads((folder / "testbed.json").read_text(encoding="utf-8"))
    for name, digest in info["shipped"]["sha256"].items():
        if not (folder / name).exists() or _sha256(folder / name) != digest:
            raise ShippedTestbedError(f"{folder / name} does not match the sha256 recorded in {folder}/testbed.json "
                                      "(reinstall the package, or rebuild with eac-lightning testbed)")
    return info


def shipped_testbed(preset: str) -> Path | None:
    """The shipped build of ``preset`` if it was built with the preset's current recipe, else None."""
    folder = SHIPPED_DIR / preset
    meta = folder / "testbed.json"
    if not meta.exists():
        return None
    info = json.loads(meta.read_text(encoding="utf-8"))
    current = get_preset(preset).fingerprint()
    if info.get("preset_fingerprint") != current or info.get("seed") != 0:
        warnings.warn(f"the shipped testbed:{preset} was built from another recipe ({info.get('preset_fingerprint')} "
                      f"vs the preset's {current}); building the current recipe into the cache instead")
        return None
    return folder


def testbed_path(name: str) -> Path:
    """The folder of ``testbed:<name>``: the shipped reference build, else a cached build (built on first use)."""
    return shipped_testbed(name) or ensure_testbed(name)


def testbed_command(out: str, preset: str = "small", facts: list[str] | None = None, seed: int = 0,
                    ship: bool = False, weights_dtype: str = "float32") -> None:
    """Train the offline knowledge testbed: a GPT-2 causal LM that knows real CounterFact/ZsRE facts.

    The model, its BPE tokenizer (Hugging Face format), ``testbed.json`` (measured figures), ``facts.jsonl``
    (every trained fact) and a CSV training log are written to ``out``.

    Args:
        out: output folder.
        preset: model size and recipe: ``tiny`` (tests, < 1 minute), ``small`` (default, < 30 minutes on a
            2-core CPU) or ``base`` (GPT-2-small size, for a GPU).
        facts: fact files or folders (CounterFact ROME/flat format, ZsRE MEND format); default the shipped
            ``counterfact`` and ``zsre`` folders.
        seed: random seed; the same seed gives the same model.
        ship: also install the build as the package's reference ``testbed:<preset>`` (maintainers: the shipped
            builds are committed to the repository, docs/testbed.md).
        weights_dtype: dtype of the shipped weights (``float32`` or ``float16``).
    """
    info = build_testbed(out, preset, facts=facts, seed=seed)
    if ship:
        print(f"shipped as {ship_testbed(out, weights_dtype)}")
    keys = ("n_parameters", "train_seconds", "fact_accuracy", "heldout_paraphrase_accuracy", "neighbourhood_accuracy",
            "sst2_heldout_accuracy", "wikitext2_test_perplexity", "edit_layer")
    print(json.dumps({k: info[k] for k in keys}, indent=2))
