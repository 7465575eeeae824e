"""``eac-lightning ask``: what the unedited and the edited model say, side by side."""

from __future__ import annotations

from pathlib import Path

import torch

from eac_lightning.models.adapters import weight_view


def _run_prompts(run: Path, count: int) -> list[tuple[str, str]]:
    """(prompt, new target) of the run's own edits, from its ledger (rollback events and a cut-off last line are
    skipped)."""
    from eac_lightning.lightning.run_folder import read_ledger

    ledger = run / "edits.jsonl"
    if not ledger.exists():
        raise FileNotFoundError(f"no prompt given and no edit ledger at {ledger}; give prompts with --prompt")
    rows = [r for r in read_ledger(ledger) if "edit" in r and "prompt" in r]
    return [(r["prompt"].replace("{}", r["subject"]), r["target_new"]) for r in rows[:count]]


@torch.no_grad()
def _continue(model, tok, prompts: list[str], max_new_tokens: int) -> list[str]:
    enc = tok(prompts, return_tensors="pt", padding=True)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return [" ".join(t.split()) for t in texts]  # one line each


def ask_command(run: str, prompt: list[str] | str | None = None, edits: int = 5, max_new_tokens: int = 8) -> None:
    """Print the unedited and the edited model's greedy continuation of a prompt, side by side.

    Args:
        run: a run folder (``runs/quickstart``) or an eac-lightning checkpoint.
        prompt: prompts to continue (``--prompt "The Eiffel Tower is located in"``, or a list; prompts may also
            follow the run folder); none: the first ``edits`` edits of the run's own ledger, with their new targets.
        edits: how many of the run's edits to show when no prompt is given.
        max_new_tokens: length of each continuation.
    """
    from eac_lightning.lightning.export import load_edited_model

    prompt = [prompt] if isinstance(prompt, str) else prompt
    edited = load_edited_model(run)  # checks the base model and every entry it replays
    pairs = [(p, "") for p in prompt] if prompt else _run_prompts(edited.run, edits)
    prompts = [p for p, _ in pairs]
    model, tok, session = edited.model, edited.tokenizer, edited.session
    after = _continue(model, tok, prompts, max_new_tokens)
    with torch.no_grad():
        for name, w0 in session.base_weights.items():  # the unedited model: base weights back in place
            weight_view(model, name).copy_(w0)
    before = _continue(model, tok, prompts, max_new_tokens)
    print(f"{edited.identity['model']} + {session.depth} edit steps ({len(session.deltas)} edited matrices) from "
          f"{edited.run}")
    for (p, target), b, a in zip(pairs, before, after):
        print(f"\n{p}" + (f"   (new target: {target})" if target else ""))
        print(f"  unedited: {b}")
        print(f"  edited:   {a}")
