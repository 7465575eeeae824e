"""How large AlphaEdit's ridge α is against the null-space energy of the keys it writes, per edited layer.

AlphaEdit's solve (AlphaEdit Eq. 15, methods/alphaedit.py) is ΔWᵀ = (P(KKᵀ + K_pK_pᵀ) + αI)⁻¹PKRᵀ: a single key k
receives the share ‖Pk‖² / (‖Pk‖² + α) of its residual. α (10) and the null-space threshold (2e-2) are absolute, in
the units of the model's keys, so the same values reach different shares on different models. For the first
``--records`` CounterFact requests this reports, per edited layer of the method's preset (with the model's measured
settings), E‖k‖², E‖Pk‖², the share of the key in the null space, α / E‖Pk‖² and the null space's dimension.

    python benchmarks/alphaedit_ridge_scale.py --model testbed:tiny --out benchmarks/results/alphaedit_ridge_scale-tiny.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="testbed:small")
    ap.add_argument("--method", default="alphaedit-eac", help="a preset of the AlphaEdit family")
    ap.add_argument("--records", type=int, default=20, help="the first N shipped CounterFact records")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)

    from eac_lightning.data.sources import load_requests
    from eac_lightning.editor import Editor
    from eac_lightning.paths import ASSETS_DIR

    requests = load_requests(ASSETS_DIR / "data" / "counterfact", limit=args.records)
    editor = Editor.load(args.model, method=args.method, device="cpu")
    method = editor.method
    keys = method._batch_keys(editor.model, editor.tokenizer, requests)
    rows = []
    for layer, name in zip(sorted(keys), method.module_names):
        k = keys[layer].double()
        P = method.projector(name)
        kk, pk = k.pow(2).sum(0), (P @ k).pow(2).sum(0)
        rows.append({"layer": layer, "module": name, "key_energy": kk.mean().item(), "null_energy": pk.mean().item(),
                     "null_share": (pk / kk).mean().item(), "alpha_over_null_energy": method.l2 / pk.mean().item(),
                     "null_dims": int(torch.trace(P).round().item()), "key_dims": P.shape[0]})
        r = rows[-1]
        print(f"layer {layer}: E|k|² {r['key_energy']:.2f}  E|Pk|² {r['null_energy']:.3f}  share {r['null_share']:.3f}"
              f"  α/E|Pk|² {r['alpha_over_null_energy']:.2f}  null dims {r['null_dims']}/{r['key_dims']}")
    out = args.out or RESULTS / f"alphaedit_ridge_scale-{args.model.replace(':', '-')}.json"
    out.write_text(json.dumps({"model": args.model, "method": args.method, "records": args.records,
                               "l2": method.l2, "nullspace_threshold": method.nullspace_threshold, "layers": rows},
                              indent=1) + "\n")


if __name__ == "__main__":
    main()
