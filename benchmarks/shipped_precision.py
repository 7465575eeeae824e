"""What storing a testbed's weights in float16 changes: the build's figures (fact accuracy, held-out paraphrases,
neighbourhood, SST-2, WikiText-2 perplexity) measured on the float32 build and on the shipped float16 weights
loaded as float32, side by side, plus the largest weight difference.

    python benchmarks/shipped_precision.py --build /tmp/tb/small --shipped eac_lightning/assets/testbeds/small \
        --out benchmarks/results/shipped_precision_small.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

KEYS = ("fact_accuracy", "heldout_paraphrase_accuracy", "neighbourhood_accuracy", "attribute_accuracy",
        "sst2_heldout_accuracy", "wikitext2_test_perplexity")
LABELS = ("fact accuracy", "held-out paraphrase accuracy", "neighbourhood accuracy", "attribute accuracy",
          "SST-2 held-out accuracy", "WikiText-2 test perplexity")
BUILDS = ("float32 build", "float16 shipped")


def table(results: dict) -> str:
    """Each figure on the float32 build and on the shipped float16 weights (docs/testbed.md, "Shipped weights")."""
    lines = ["| figure | " + " | ".join(BUILDS) + " |", "|---|---|---|"]
    for key, label in zip(KEYS, LABELS):
        places = 3 if key == "wikitext2_test_perplexity" else 4
        lines.append(f"| {label} | " + " | ".join(f"{results[b][key]:.{places}f}" for b in BUILDS) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", type=Path, required=True, help="the float32 build folder")
    ap.add_argument("--shipped", type=Path, required=True, help="the shipped folder")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    import torch  # the measurement only: table() above needs none of these
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eac_lightning.testbed.build import measure
    from eac_lightning.testbed.presets import TestbedPreset, preset_corpus

    info = json.loads((args.build / "testbed.json").read_text())
    preset = TestbedPreset.from_dict(info["preset"])
    corpus = preset_corpus(preset, info["fact_files"], info["seed"])
    tok = AutoTokenizer.from_pretrained(args.shipped)
    rows: dict = {"command": "python benchmarks/shipped_precision.py " + " ".join(sys.argv[1:])}
    for name, folder in zip(BUILDS, (args.build, args.shipped)):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        figs = measure(model, tok, corpus, preset)
        rows[name] = {k: figs[k] for k in KEYS}
        print(name, rows[name], flush=True)
    a, b = load_file(args.build / "model.safetensors"), load_file(args.shipped / "model.safetensors")
    rows["max_abs_weight_difference"] = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
