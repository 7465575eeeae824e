"""ROME's causal tracing: where does a model recall a fact?

Meng et al., 2022, "Locating and Editing Factual Associations in GPT", §2.1 (code: ``experiments/causal_trace.py``
of github.com/kmeng01/rome). For a prompt whose greedy answer is the true object:

1. clean run: record every layer's hidden state, MLP output and attention output at every token;
2. corrupted runs: Gaussian noise of 3x the empirical standard deviation of the token embeddings (ROME's ν) is
   added to the embeddings of the subject tokens, several noise samples;
3. corrupted-with-restoration runs: one state (a layer's hidden state, MLP output or attention output at one
   token; or a window of consecutive layers, ROME's ``window``) is set back to its clean value.

The indirect effect of a state is P[answer | corrupted, state restored] - P[answer | corrupted]. Averaged over
facts (the *average indirect effect*, AIE) and grouped by token position the way ROME's Figure 2 groups them
(first / middle / last subject token, first subsequent token, further tokens, last token), it shows where the
model uses the subject: for GPT-2 XL, MLPs at the last subject token in the middle layers, which is why ROME and
MEMIT edit there. :func:`choose_layers` turns the MLP curve at the last subject token into a preset's
``edit_layer`` / ``memit_layers``.
"""

from __future__ import annotations

import json
import math
import os
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from eac_lightning.models.adapters import get_spec, num_layers
from eac_lightning.models.tracing import capture, edit_output

KINDS = ("hidden", "mlp", "attn")
CATEGORIES = (
    "first subject token",
    "middle subject tokens",
    "last subject token",
    "first subsequent token",
    "further tokens",
    "last token",
)


@dataclass
class TraceFact:
    """A prompt to trace: the model should continue ``prompt`` with ``" " + target``."""

    prompt: str
    subject: str
    target: str


@dataclass
class FactTrace:
    """Causal trace of one fact.

    Attributes:
        scores: (kinds, tokens, layers) P[answer] with the state restored (corrupted subject).
        low: P[answer] on the corrupted run (no restoration), averaged over noise samples.
        high: P[answer] on the clean run.
        tokens: the prompt's tokens (decoded).
        subject_range: (first, last + 1) token indices of the subject.
    """

    scores: torch.Tensor
    low: float
    high: float
    tokens: list[str]
    subject_range: tuple[int, int]

    def categories(self) -> torch.Tensor:
        """(kinds, 6, layers) indirect effects grouped as ROME's Figure 2 (NaN where a group is empty)."""
        s0, s1 = self.subject_range
        n = self.scores.shape[1]
        groups = [
            [s0],
            list(range(s0 + 1, s1 - 1)),
            [s1 - 1],
            [s1] if s1 < n - 1 else [],
            list(range(s1 + 1, n - 1)),
            [n - 1],
        ]
        effect = self.scores - self.low
        out = torch.full((effect.shape[0], len(groups), effect.shape[2]), float("nan"))
        for g, idx in enumerate(groups):
            if idx:
                out[:, g] = effect[:, idx].mean(1)
        return out


@dataclass
class TraceResult:
    """Average indirect effects over facts.

    Attributes:
        aie: (kinds, categories, layers) average indirect effect (see :data:`KINDS`, :data:`CATEGORIES`).
        low, high: mean corrupted and clean P[answer].
        n_facts: facts traced.
        noise: the noise standard deviation used (3x the embedding std unless given).
        window: consecutive layers restored together.
        per_fact: the individual traces.
    """

    aie: torch.Tensor
    low: float
    high: float
    n_facts: int
    noise: float
    window: int
    per_fact: list[FactTrace] = field(default_factory=list, repr=False)

    def curve(self, kind: str = "mlp", category: str = "last subject token") -> torch.Tensor:
        """AIE by layer of one kind of state at one token group."""
        return self.aie[KINDS.index(kind), CATEGORIES.index(category)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "kinds": list(KINDS),
            "categories": list(CATEGORIES),
            "aie": [[[None if math.isnan(v) else round(float(v), 5) for v in row] for row in k] for k in self.aie],
            "low": self.low,
            "high": self.high,
            "n_facts": self.n_facts,
            "noise": self.noise,
            "window": self.window,
        }


def _subject_range(tok, prompt: str, subject: str) -> tuple[int, int] | None:
    """(first, last + 1) token indices of the last occurrence of ``subject`` in ``prompt`` (character offsets)."""
    pos = prompt.rfind(subject)
    if pos < 0:
        return None
    enc = tok(prompt, add_special_tokens=False, return_offsets_mapping=True)
    idx = [i for i, (s, e) in enumerate(enc["offset_mapping"]) if s < pos + len(subject) and e > pos]
    return (idx[0], idx[-1] + 1) if idx else None


@torch.no_grad()
def embedding_noise_std(model, tok, subjects: Sequence[str]) -> float:
    """ROME's ``collect_embedding_std``: the standard deviation of the token embeddings of the subjects."""
    spec = get_spec(model)
    emb = model.get_submodule(spec.embed)
    ids = [i for s in subjects for i in tok(s, add_special_tokens=False)["input_ids"]]
    vecs = emb(torch.tensor(ids, device=next(model.parameters()).device))
    return float(vecs.float().std())


def _module_names(model, kind: str) -> list[str]:
    spec = get_spec(model)
    n = num_layers(model)
    if kind == "hidden":
        return [spec.layer(i) for i in range(n)]
    template = spec.mlp if kind == "mlp" else spec.attn
    return [template.format(i) for i in range(n)]


@torch.no_grad()
def trace_fact(
    model,
    tok,
    fact: TraceFact,
    noise: float,
    samples: int = 10,
    window: int = 1,
    kinds: Sequence[str] = KINDS,
    seed: int = 0,
    batch_rows: int = 512,
) -> FactTrace | None:
    """Trace one fact (ROME ``calculate_hidden_flow``); ``None`` when the subject is not found in the prompt.

    All (layer, token, noise sample) restorations of one kind run as rows of batched forward passes. Row r adds
    noise sample ``r % samples`` to the subject embeddings and restores its layer window at its token.
    """
    device = next(model.parameters()).device
    spec = get_spec(model)
    n_layers = num_layers(model)
    ids = tok(fact.prompt, add_special_tokens=False)["input_ids"]
    rng_span = _subject_range(tok, fact.prompt, fact.subject)
    if rng_span is None:
        return None
    s0, s1 = rng_span
    target = tok(" " + fact.target.strip(), add_special_tokens=False)["input_ids"][0]
    T = len(ids)
    x = torch.tensor(ids, device=device)[None]
    gen = torch.Generator().manual_seed(seed)
    d = model.get_submodule(spec.embed).weight.shape[1]
    noise_vecs = (torch.randn(samples, s1 - s0, d, generator=gen) * noise).to(device)

    def corrupt(sample_of_row: torch.Tensor):
        def fn(emb: torch.Tensor) -> torch.Tensor:
            emb = emb.clone()
            emb[:, s0:s1] = emb[:, s0:s1] + noise_vecs[sample_of_row].to(emb.dtype)
            return emb

        return fn

    # Clean run: every state of every kind.
    names = {k: _module_names(model, k) for k in kinds}
    all_names = [n for k in kinds for n in names[k]]
    with capture(model, all_names) as rec:
        logits = model(input_ids=x, use_cache=False).logits
    high = float(torch.softmax(logits[0, -1].float(), -1)[target])
    clean = {n: rec[n].output[0] for n in all_names}

    # Corrupted baseline.
    rows = torch.arange(samples, device=device)
    with edit_output(model, spec.embed, corrupt(rows)):
        logits = model(input_ids=x.expand(samples, T), use_cache=False).logits
    low = float(torch.softmax(logits[:, -1].float(), -1)[:, target].mean())

    scores = torch.zeros(len(kinds), T, n_layers)
    jobs = [(layer, t) for layer in range(n_layers) for t in range(T)]
    per_batch = max(1, batch_rows // samples)
    for ki, kind in enumerate(kinds):
        for b in range(0, len(jobs), per_batch):
            chunk = jobs[b : b + per_batch]
            n_rows = len(chunk) * samples
            sample_of_row = torch.arange(n_rows, device=device) % samples
            layer_of_row = torch.tensor([j[0] for j in chunk], device=device).repeat_interleave(samples)
            tok_of_row = torch.tensor([j[1] for j in chunk], device=device).repeat_interleave(samples)
            with ExitStack() as stack:
                stack.enter_context(edit_output(model, spec.embed, corrupt(sample_of_row)))
                for layer, name in enumerate(names[kind]):
                    # ROME's window: restoring "layer l" restores layers l - w//2 .. l + (w - 1) - w//2.
                    lo = layer_of_row - window // 2
                    hit = (lo <= layer) & (layer < lo + window)
                    if not bool(hit.any()):
                        continue
                    r_idx = hit.nonzero().squeeze(1)
                    t_idx = tok_of_row[r_idx]

                    def restore(out: torch.Tensor, r_idx=r_idx, t_idx=t_idx, name=name) -> torch.Tensor:
                        out = out.clone()
                        out[r_idx, t_idx] = clean[name][t_idx].to(out.dtype)
                        return out

                    stack.enter_context(edit_output(model, name, restore))
                logits = model(input_ids=x.expand(n_rows, T), use_cache=False).logits
            p = torch.softmax(logits[:, -1].float(), -1)[:, target].reshape(len(chunk), samples).mean(1)
            for (layer, t), v in zip(chunk, p.tolist()):
                scores[ki, t, layer] = v
    return FactTrace(scores, low, high, [tok.decode([i]) for i in ids], (s0, s1))


def average_trace(
    model,
    tok,
    facts: Sequence[TraceFact],
    noise: float | None = None,
    samples: int = 10,
    window: int = 1,
    seed: int = 0,
    progress: bool = True,
) -> TraceResult:
    """Trace every fact and average the indirect effects by token group (ROME Figure 2).

    ``noise`` defaults to 3x :func:`embedding_noise_std` of the facts' subjects (ROME §2.1).
    """
    if noise is None:
        noise = 3.0 * embedding_noise_std(model, tok, [f.subject for f in facts])
    traces = []
    it = facts
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(facts, desc="causal trace", unit="fact", dynamic_ncols=True)
    was_training = model.training
    model.eval()
    try:
        for i, f in enumerate(it):
            tr = trace_fact(model, tok, f, noise, samples=samples, window=window, seed=seed + i)
            if tr is not None:
                traces.append(tr)
    finally:
        model.train(was_training)
    if not traces:
        raise ValueError("no traceable fact: none of the subjects was found in its prompt")
    cats = torch.stack([t.categories() for t in traces])  # (facts, kinds, 6, layers)
    aie = torch.from_numpy(np.nanmean(cats.numpy(), axis=0)) if len(traces) else cats[0]
    return TraceResult(
        aie=aie, low=float(np.mean([t.low for t in traces])), high=float(np.mean([t.high for t in traces])),
        n_facts=len(traces), noise=float(noise), window=window, per_fact=traces,
    )


def choose_layers(result: TraceResult, max_memit_layers: int | None = None, rel: float = 0.5) -> tuple[int, list[int]]:
    """ROME's edit layer and MEMIT's layer range from the MLP curve at the last subject token.

    The edit layer is the layer of the largest AIE (ROME §2 chooses the peak of this curve). The MEMIT range grows
    from it over adjacent layers whose AIE is at least ``rel`` of the peak (MEMIT §4 spreads the edit over the
    critical range), at most ``max_memit_layers`` (default: a third of the layers, at least 2).
    """
    curve = torch.nan_to_num(result.curve("mlp", "last subject token"), nan=0.0)
    n = len(curve)
    best = int(curve.argmax())
    cap = max_memit_layers or max(2, n // 3)
    layers = [best]
    lo, hi = best, best
    while len(layers) < cap:
        cand = [(float(curve[i]), i) for i in (lo - 1, hi + 1) if 0 <= i < n]
        if not cand:
            break
        v, i = max(cand)
        if v < rel * float(curve[best]) and len(layers) >= 2:
            break
        layers.append(i)
        lo, hi = min(lo, i), max(hi, i)
    return best, sorted(layers)


def plot_trace(result: TraceResult, path: str | os.PathLike, title: str | None = None) -> Path:
    """ROME-Figure-2-style heatmaps (hidden state, MLP, attention) of the AIE by token group and layer, as PNG
    (``{n}`` in ``title`` becomes the number of facts)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    titles = {"hidden": "single restored layer (hidden state)", "mlp": "restored MLP output",
              "attn": "restored attention output"}
    cmaps = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}
    fig, axes = plt.subplots(1, len(KINDS), figsize=(4.2 * len(KINDS), 3.2), constrained_layout=True)
    for ax, kind in zip(axes, KINDS):
        data = result.aie[KINDS.index(kind)].numpy()
        im = ax.imshow(np.nan_to_num(data, nan=0.0), cmap=cmaps[kind], aspect="auto", vmin=min(0.0, np.nanmin(data)))
        ax.set_yticks(range(len(CATEGORIES)))
        ax.set_yticklabels(CATEGORIES if kind == KINDS[0] else [""] * len(CATEGORIES), fontsize=8)
        ax.set_xticks(range(data.shape[1]))
        ax.set_xlabel("layer" + (f" (window {result.window})" if result.window > 1 else ""))
        ax.set_title(titles[kind], fontsize=9)
        fig.colorbar(im, ax=ax, shrink=0.8, label="AIE")
    stats = f"(clean p={result.high:.2f}, corrupted p={result.low:.2f})"
    title = title.replace("{n}", str(result.n_facts)) if title else f"Average indirect effect over {result.n_facts} facts"
    fig.suptitle(f"{title} {stats}", fontsize=10)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def load_trace_facts(model_dir: str | os.PathLike | None, limit: int | None = None) -> list[TraceFact]:
    """CounterFact facts to trace: a testbed's trained ``fact`` prompts (``facts.jsonl``) when present, else the
    shared CounterFact records' true facts."""
    out: list[TraceFact] = []
    path = Path(model_dir) / "facts.jsonl" if model_dir else None
    if path is not None and path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            f = json.loads(line)
            if f["kind"] == "fact" and f.get("subject") and "counterfact" in f["source"]:
                out.append(TraceFact(f["prompt"], f["subject"], f["target"]))
    else:
        from eac_lightning.paths import data_dir
        from eac_lightning.testbed.corpus import load_fact_requests

        reqs = load_fact_requests([data_dir() / "counterfact"])
        out = [TraceFact(r.prompt_text, r.subject, r.target_true) for r in reqs]
    return out[:limit] if limit else out


def load_model_and_tokenizer(model: str):
    """A model by path, or ``testbed:<preset>`` (built into the cache on first use), through the project's
    loader; returns (model, tokenizer, folder or None)."""
    from eac_lightning.models.loading import load_model, resolve_model_path

    path = Path(resolve_model_path(model))
    m, tok = load_model(str(path))
    return m, tok, path if path.exists() else None


def run_trace(
    model, tok, facts: Sequence[TraceFact], out: str | os.PathLike, num_facts: int = 50, samples: int = 10,
    window: int = 1, seed: int = 0, title: str | None = None, progress: bool = True,
) -> dict[str, Any]:
    """Trace the first ``num_facts`` known facts, write ``trace.json``, ``trace.pt`` and ``trace.png`` to ``out``
    and return the JSON summary (with the chosen layers)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    from eac_lightning.evaluation.probes import greedy_matches

    # ROME traces only known facts: those whose greedy next token is the answer's first token.
    knows = greedy_matches(model, tok, [f.prompt for f in facts], [f.target for f in facts], first_token_only=True,
                           batch_size=64)
    known = [f for f, k in zip(facts, knows) if k][:num_facts]
    if not known:
        raise ValueError("the model knows none of the facts (greedy first token); nothing to trace")
    result = average_trace(model, tok, known, samples=samples, window=window, seed=seed, progress=progress)
    edit_layer, memit_layers = choose_layers(result)
    summary = {
        **result.to_dict(),
        "facts_offered": len(facts),
        "mlp_last_subject_token": [round(float(v), 5) for v in result.curve("mlp", "last subject token")],
        "mlp_last_token": [round(float(v), 5) for v in result.curve("mlp", "last token")],
        "attn_last_token": [round(float(v), 5) for v in result.curve("attn", "last token")],
        "edit_layer": edit_layer,
        "memit_layers": memit_layers,
    }
    (out / "trace.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    torch.save({"aie": result.aie, "per_fact": [t.scores for t in result.per_fact]}, out / "trace.pt")
    plot_trace(result, out / "trace.png", title)
    return summary


def trace_command(
    model: str, out: str, num_facts: int = 50, samples: int = 10, window: int = 1, seed: int = 0
) -> None:
    """Causal tracing (Meng et al., 2022): where the model recalls facts, averaged over known CounterFact facts.

    Corrupts the subject embeddings with Gaussian noise (3x the embedding standard deviation) and restores each
    layer's hidden state, MLP output and attention output at each token; writes the average indirect effects
    (``trace.json``, ``trace.pt``), a heatmap (``trace.png``) and the edit layers they suggest.

    Args:
        model: a Hugging Face model folder, or ``testbed:tiny`` / ``testbed:small`` (built on first use).
        out: output folder.
        num_facts: how many known facts to trace (the testbed's CounterFact facts, else the shared CounterFact).
        samples: noise samples per restoration.
        window: consecutive layers restored together (ROME uses 10 on 48-layer GPT-2 XL).
        seed: seed of the noise.
    """
    m, tok, path = load_model_and_tokenizer(model)
    facts = load_trace_facts(path)
    summary = run_trace(m, tok, facts, out, num_facts=num_facts, samples=samples, window=window, seed=seed)
    keys = ("n_facts", "high", "low", "mlp_last_subject_token", "edit_layer", "memit_layers")
    print(json.dumps({k: summary[k] for k in keys}, indent=2))
