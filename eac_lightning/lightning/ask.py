"""``eac-lightning ask``: what the unedited and the edited model say, side by side."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def _checkpoint_of(run_or_ckpt: str) -> Path:
    path = Path(run_or_ckpt)
    if path.is_dir():
        path = path / "checkpoints" / "last.ckpt"
    if not path.is_file():
        raise SystemExit(f"{run_or_ckpt}: neither a checkpoint nor a run folder with checkpoints/last.ckpt")
    return path


def _run_prompts(ckpt: Path, count: int) -> list[tuple[str, str]]:
    """(prompt, new target) of the run's own edits, from the ledger beside the checkpoint."""
    ledger = ckpt.parent.parent / "edits.jsonl"
    if not ledger.exists():
        raise SystemExit(f"no prompt given and no edit ledger at {ledger}")
    rows = [json.loads(line) for line in ledger.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [(r["prompt"].replace("{}", r["subject"]), r["target_new"]) for r in rows[:count]]


@torch.no_grad()
def _continue(model, tok, prompts: list[str], max_new_tokens: int) -> list[str]:
    enc = tok(prompts, return_tensors="pt", padding=True)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return [" ".join(t.split()) for t in texts]  # one line each


def ask_command(run: str, prompt: list[str] | None = None, edits: int = 5, max_new_tokens: int = 8) -> None:
    """Print the unedited and the edited model's greedy continuation of a prompt, side by side.

    Args:
        run: a run folder (``runs/quickstart``) or an eac-lightning checkpoint.
        prompt: prompts to continue (e.g. ``"The Eiffel Tower is located in"``); none: the first ``edits`` edits of
            the run's own ledger, with their new targets.
        edits: how many of the run's edits to show when no prompt is given.
        max_new_tokens: length of each continuation.
    """
    from eac_lightning.lightning.checkpoint import AtomicCheckpointIO
    from eac_lightning.lightning.module import CKPT_KEY
    from eac_lightning.methods.base import apply_deltas
    from eac_lightning.models.loading import load_model

    ckpt = _checkpoint_of(run)
    state = AtomicCheckpointIO().load_checkpoint(ckpt).get(CKPT_KEY)
    if state is None:
        raise SystemExit(f"{ckpt} was not written by eac-lightning (no '{CKPT_KEY}' section)")
    pairs = [(p, "") for p in prompt] if prompt else _run_prompts(ckpt, edits)
    model, tok = load_model(state["model"])
    prompts = [p for p, _ in pairs]
    before = _continue(model, tok, prompts, max_new_tokens)
    apply_deltas(model, state["deltas"])
    after = _continue(model, tok, prompts, max_new_tokens)
    print(f"{state['model']} + {len(state['deltas'])} edited matrices from {ckpt}")
    for (p, target), b, a in zip(pairs, before, after):
        print(f"\n{p}" + (f"   (new target: {target})" if target else ""))
        print(f"  unedited: {b}")
        print(f"  edited:   {a}")
