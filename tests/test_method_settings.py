"""Measured method settings on a testbed replace the published values a config still holds, and only those."""

from __future__ import annotations

import yaml

from eac_lightning.methods.settings import apply_model_settings, method_key
from eac_lightning.paths import CONFIGS_DIR


def preset(name: str) -> dict:
    return yaml.safe_load((CONFIGS_DIR / "methods" / f"{name}.yaml").read_text())["model"]["method"]


def test_method_keys_name_the_presets():
    for name in ("rome", "rome-eac", "memit", "memit-eac", "alphaedit", "alphaedit-eac", "ft", "ft-en", "beac",
                 "beac-memit", "ultraedit"):
        assert method_key(preset(name)) == name
    assert method_key(preset("beac-no-las")) == "beac"  # ablations share B-EAC's measured settings
    assert method_key(preset("beac-memit-no-rar")) == "beac-memit"


def test_testbed_settings_replace_published_values_and_keep_the_users():
    spec = preset("memit")
    spec["init_args"]["target"]["lr"] = 0.25  # the user's own value: not in the overlay, kept
    new, applied = apply_model_settings("testbed:tiny", spec)
    args = new["init_args"]
    assert args["target"]["clamp_norm_factor"] == 4.0 and args["mom2_update_weight"] == 10.0
    assert args["write_aware"] is True and args["target"]["lr"] == 0.25
    assert applied["file"] == "configs/testbed/memit.yaml"
    assert applied["changed"]["mom2_update_weight"] == [20000.0, 10.0]
    assert spec["init_args"]["mom2_update_weight"] == 20000.0  # the input is not modified

    spec["init_args"]["mom2_update_weight"] = 50.0  # a value the user chose instead of the published one wins
    new, applied = apply_model_settings("testbed:tiny", spec)
    assert new["init_args"]["mom2_update_weight"] == 50.0 and "mom2_update_weight" not in applied["changed"]


def test_settings_apply_only_where_they_were_measured():
    # ROME's overlay was measured on tiny; on small the published ROME writes more (docs/testbed.md)
    assert apply_model_settings("testbed:tiny", preset("rome"))[1]
    assert apply_model_settings("testbed:small", preset("rome")) == (preset("rome"), {})
    assert apply_model_settings("gpt2-xl", preset("memit")) == (preset("memit"), {})


def test_a_testbed_entry_composes_overlays_measured_for_it_alone():
    # auto.yaml's {alphaedit-eac: [alphaedit-eac, alphaedit-eac-tiny]} on tiny: both files in order; small the first
    new, applied = apply_model_settings("testbed:tiny", preset("alphaedit-eac"))
    assert applied["file"] == "configs/testbed/alphaedit-eac.yaml + configs/testbed/alphaedit-eac-tiny.yaml"
    assert applied["changed"]["l2"] == [10.0, 0.3] and applied["changed"]["eac.gamma"] == [85.0, 50.0]
    assert new["init_args"]["target"]["clamp_norm_factor"] == 4.0 and new["init_args"]["write_aware"] is True
    new, applied = apply_model_settings("testbed:small", preset("alphaedit-eac"))
    assert applied["file"] == "configs/testbed/alphaedit-eac.yaml" and new["init_args"]["l2"] == 10.0
    spec = preset("alphaedit-eac")
    spec["init_args"]["l2"] = 2.0  # the user's own α is kept on tiny too
    assert apply_model_settings("testbed:tiny", spec)[0]["init_args"]["l2"] == 2.0
