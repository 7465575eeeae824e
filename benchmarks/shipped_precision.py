"""What storing a testbed's weights in float16 changes: the build's figures (fact accuracy, held-out paraphrases,
neighbourhood, SST-2, WikiText-2 perplexity) measured on the float32 build and on the shipped float16 weights
loaded as float32, side by side, plus the largest weight difference.

    python benchmarks/shipped_precision.py --build /tmp/tb/small --shipped eac_lightning/assets/testbeds/small \
        --out benchmarks/results/shipped_precision_small.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from eac_lightning.testbed.build import measure
from eac_lightning.testbed.presets import TestbedPreset, preset_corpus

KEYS = ("fact_accuracy", "heldout_paraphrase_accuracy", "neighbourhood_accuracy", "attribute_accuracy",
        "sst2_heldout_accuracy", "wikitext2_test_perplexity")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", type=Path, required=True, help="the float32 build folder")
    ap.add_argument("--shipped", type=Path, required=True, help="the shipped folder")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    info = json.loads((args.build / "testbed.json").read_text())
    preset = TestbedPreset.from_dict(info["preset"])
    corpus = preset_corpus(preset, info["fact_files"], info["seed"])
    tok = AutoTokenizer.from_pretrained(args.shipped)
    rows = {}
    for name, folder in (("float32 build", args.build), ("float16 shipped", args.shipped)):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        figs = measure(model, tok, corpus, preset)
        rows[name] = {k: figs[k] for k in KEYS}
        print(name, rows[name], flush=True)
    a, b = load_file(args.build / "model.safetensors"), load_file(args.shipped / "model.safetensors")
    rows["max_abs_weight_difference"] = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
