"""Measured method settings on a testbed replace the published values a config still holds, and only those."""

from __future__ import annotations

import pytest
import yaml

from eac_lightning.methods.settings import apply_model_settings, method_key
from eac_lightning.paths import CONFIGS_DIR


def preset(name: str) -> dict:
    """The preset's method as the command line's parser hands it to the resolver: every setting at its value (the
    file states only what differs from the class defaults)."""
    from jsonargparse import ArgumentParser

    from eac_lightning.methods import EditMethod

    spec = yaml.safe_load((CONFIGS_DIR / "methods" / f"{name}.yaml").read_text())["model"]["method"]
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--method", type=EditMethod)
    return parser.parse_object({"method": spec}).method.as_dict()


def test_method_keys_name_the_presets():
    for name in ("rome", "rome-eac", "memit", "memit-eac", "alphaedit", "alphaedit-eac", "ft", "ft-en", "beac",
                 "beac-memit", "ultraedit"):
        assert method_key(preset(name)) == name
    assert method_key(preset("beac-no-las")) == "beac"  # ablations share B-EAC's measured settings
    assert method_key(preset("beac-memit-no-rar")) == "beac-memit"


def test_testbed_settings_replace_the_presets_and_keep_every_value_given():
    spec = preset("memit")
    spec["init_args"]["target"]["lr"] = 0.25  # given by the user: not in the overlay, kept
    new, applied = apply_model_settings("testbed:tiny", spec, {("target", "lr")})
    args = new["init_args"]
    assert args["target"]["clamp_norm_factor"] == 4.0 and args["mom2_update_weight"] == 10.0
    assert args["write_aware"] is True and args["target"]["lr"] == 0.25
    assert applied["file"] == "configs/testbed/memit.yaml"
    assert applied["changed"]["mom2_update_weight"] == [20000.0, 10.0]
    assert applied["sources"]["mom2_update_weight"] == "measured" and applied["sources"]["target.lr"] == "yours"
    assert spec["init_args"]["mom2_update_weight"] == 20000.0  # the input is not modified

    spec["init_args"]["mom2_update_weight"] = 50.0  # a value the user chose instead of the published one wins
    new, applied = apply_model_settings("testbed:tiny", spec, {("mom2_update_weight",)})
    assert new["init_args"]["mom2_update_weight"] == 50.0 and "mom2_update_weight" not in applied["changed"]
    # Given, even where it equals the published value: kept (the parser's record decides, not the value).
    spec = preset("memit")
    new, applied = apply_model_settings("testbed:tiny", spec, {("target", "clamp_norm_factor")})
    assert new["init_args"]["target"]["clamp_norm_factor"] == 0.75 == preset("memit")["init_args"]["target"][
        "clamp_norm_factor"]
    assert applied["sources"]["target.clamp_norm_factor"] == "yours"
    # A given prefix covers its leaves: --model.method.init_args.eac null keeps every EAC setting off.
    spec = preset("memit-eac")
    spec["init_args"]["eac"] = None
    new, _ = apply_model_settings("testbed:tiny", spec, {("eac",)})
    assert new["init_args"]["eac"] is None


def test_given_leaves_are_read_from_the_command_line_and_the_users_own_config_files(tmp_path):
    from eac_lightning.methods.settings import given_leaves

    mine = tmp_path / "mine.yaml"
    mine.write_text(yaml.safe_dump({"model": {"method": {"init_args": {"l2": 2.0, "eac": {"gamma": 70.0}}}}}))
    argv = ["fit", "--config", str(CONFIGS_DIR / "quickstart.yaml"), "--config", "configs/methods/memit.yaml",
            "--config", str(mine), "--model.method.init_args.target.clamp_norm_factor", "0.75",
            "--model.method.init_args.context={length_count: [[5, 2]]}", "--model.method.write_aware", "false",
            "--data.num_edits", "3", "--model.method", "eac_lightning.methods.MEMIT"]
    assert given_leaves(argv) == {("l2",), ("eac", "gamma"), ("target", "clamp_norm_factor"), ("context",),
                                  ("write_aware",)}


def test_settings_apply_only_where_they_were_measured():
    # ROME's overlay was measured on tiny; on small the published ROME writes more (docs/testbed.md)
    assert apply_model_settings("testbed:tiny", preset("rome"))[1]
    assert apply_model_settings("testbed:small", preset("rome")) == (preset("rome"), {})
    # ROME-EAC's overlay was measured for single edits; in a stream it drifts more than ROME: not by default
    assert apply_model_settings("testbed:tiny", preset("rome-eac")) == (preset("rome-eac"), {})
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
    assert apply_model_settings("testbed:tiny", spec, {("l2",)})[0]["init_args"]["l2"] == 2.0


@pytest.mark.slow
def test_a_clamp_given_on_the_command_line_is_kept_on_a_testbed_even_at_the_published_value(tmp_path):
    import json
    import subprocess
    import sys

    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "eac_lightning.lightning.cli", "fit", "--config", "configs/quickstart.yaml",
         "--config", "configs/methods/memit.yaml", "--model.model", "testbed:tiny", "--data.num_edits", "1",
         "--model.method.init_args.target.clamp_norm_factor", "0.75", "--trainer.default_root_dir", str(run),
         "--model.stats_tokens", "2000", "--eval.tasks", "[]", "--eval.probes", "[]",
         "--eval.every", "0", "--trainer.enable_progress_bar", "false"],
        cwd=CONFIGS_DIR.parents[1], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("method settings:") == 1 and "yours: target.clamp_norm_factor" in proc.stderr
    record = json.loads((run / "summary.json").read_text())["method_settings"]
    assert record["sources"]["target.clamp_norm_factor"] == "yours"
    assert record["changed"]["mom2_update_weight"] == [20000.0, 10.0]  # the measured settings still apply
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["method"]["init_args"]["target"]["clamp_norm_factor"] == 0.75


def test_a_nested_setting_can_be_set_to_null_on_the_command_line():
    """``--model.method.init_args.beac.refresh_window null`` (jsonargparse alone refuses a null for an Optional field
    of a dataclass inside init_args) reaches the method as None, and is recorded as the user's setting."""
    import subprocess
    import sys

    from eac_lightning.lightning.cli import nested_nulls_as_mappings
    from eac_lightning.methods.settings import given_leaves

    argv = ["fit", "--model.method.init_args.beac.refresh_window", "null", "--model.method.init_args.beac.refresh=0.5",
            "--model.method.init_args.nas.seed=~", "--trainer.logger", "null"]
    assert nested_nulls_as_mappings(argv) == [
        "fit", "--model.method.init_args.beac", "{refresh_window: null}", "--model.method.init_args.beac.refresh=0.5",
        "--model.method.init_args.nas", "{seed: null}", "--trainer.logger", "null"]
    assert ("beac", "refresh_window") in given_leaves(argv)
    proc = subprocess.run(
        [sys.executable, "-m", "eac_lightning.lightning.cli", "fit", "--config", "configs/methods/beac.yaml",
         "--model.model", "testbed:tiny", "--model.method.init_args.beac.refresh_checks", "null",
         "--model.method.init_args.beac.alike_cosine", "null", "--model.method.init_args.beac.refresh_window", "20",
         "--print_config"],
        cwd=CONFIGS_DIR.parents[1], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    beac = yaml.safe_load(proc.stdout)["model"]["method"]["init_args"]["beac"]
    # the preset's 1,000 checks and τ = 0.9 became null; its refresh share is kept
    assert beac["refresh_checks"] is None and beac["alike_cosine"] is None and beac["refresh_window"] == 20
    assert beac["refresh"] == 1.0
