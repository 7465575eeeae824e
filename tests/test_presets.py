"""Each method setting lives in one place: the class defaults are the published values, a preset states only what
differs from them, an ablation preset only its switch, a testbed overlay only what was measured differently
(configs/methods/README.md). These tests pin that the presets resolve as they did when they restated everything."""

from __future__ import annotations

import dataclasses
import functools
import inspect

import pytest
import yaml
from jsonargparse import ArgumentParser

from eac_lightning.editor import METHOD_PRESETS, method_from_preset
from eac_lightning.methods import EditMethod
from eac_lightning.methods.settings import AUTO_FILE, SETTINGS_DIR, leaves, settings_files
from eac_lightning.paths import CONFIGS_DIR

PRESETS = sorted(p.stem for p in METHOD_PRESETS.glob("*.yaml"))
ABLATIONS = {"beac-no-las": ("beac", "beac.las"), "beac-no-rar": ("beac", "beac.rar"),
             "beac-memit-no-las": ("beac-memit", "beac.las"), "beac-memit-no-rar": ("beac-memit", "beac.rar")}
MODELS = ["testbed:tiny", "testbed:small", None]


def method_spec(path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))["model"]["method"]


def settings(method: EditMethod) -> dict:
    """The method's settings as flat ``{"target.clamp_norm_factor": 0.75, ...}`` (its constructor arguments)."""
    out = {"class": type(method).__name__}
    for name in inspect.signature(type(method).__init__).parameters:
        value = getattr(method, name, None)
        if dataclasses.is_dataclass(value):
            out.update({f"{name}.{k}": v for k, v in dataclasses.asdict(value).items()})
        else:
            out[name] = value
    return out


@functools.lru_cache(maxsize=None)
def resolved(name: str, *overlays, model: str | None = None) -> dict:
    """:func:`settings` of ``method_from_preset(name, *overlays, model=model)`` (overlay files), computed once."""
    return settings(method_from_preset(name, *overlays, model=model))


def composed(*files) -> dict:
    """The ``model.method`` of config files composed in order by the config parser, as ``--config A --config B``
    composes them on the command line (a later class keeps the settings given before it that it accepts)."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--method", type=EditMethod)
    args = []
    for path in files:
        method = (yaml.safe_load(path.read_text(encoding="utf-8")).get("model") or {}).get("method")
        if method is not None:
            args += ["--method", yaml.safe_dump(method, default_flow_style=True, width=10_000)]
    return settings(parser.instantiate_classes(parser.parse_args(args)).method)


def class_default(spec: dict, leaf: tuple[str, ...]):
    """The class's own default for a setting path (``("target", "clamp_norm_factor")``); a nested setting of a
    group that is off by default (``eac: None``) has none."""
    module, _, name = spec["class_path"].rpartition(".")
    cls = getattr(__import__(module, fromlist=[name]), name)
    value = inspect.signature(cls.__init__).parameters[leaf[0]].default
    for key in leaf[1:]:
        if value is None:
            return inspect.Parameter.empty
        value = getattr(value, key)
    return value


@pytest.mark.parametrize("name", PRESETS)
def test_a_preset_states_only_what_differs_from_its_class_defaults(name):
    """A value equal to the class default is allowed only with a comment on its line saying why."""
    path = METHOD_PRESETS / f"{name}.yaml"
    spec = method_spec(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    for leaf, value in leaves(spec.get("init_args") or {}):
        if value == class_default(spec, leaf):
            line = next(ln for ln in lines if ln.strip().startswith(f"{leaf[-1]}:") or f" {leaf[-1]}:" in ln
                        or f"{{{leaf[-1]}:" in ln)
            assert "#" in line, f"{path.name}: {'.'.join(leaf)} restates the class default {value!r} without a reason"


@pytest.mark.parametrize("ablation", sorted(ABLATIONS))
@pytest.mark.parametrize("model", MODELS)
def test_an_ablation_preset_is_its_parent_with_one_switch_off(ablation, model):
    parent, switch = ABLATIONS[ablation]
    spec = method_spec(METHOD_PRESETS / f"{ablation}.yaml")
    assert spec["class_path"] == method_spec(METHOD_PRESETS / f"{parent}.yaml")["class_path"]
    assert [".".join(leaf) for leaf, _ in leaves(spec["init_args"])] == [switch]
    mine, theirs = (resolved(n, model=model) for n in (ablation, parent))
    assert theirs[switch] is True and mine[switch] is False
    assert {k: v for k, v in mine.items() if k != switch} == {k: v for k, v in theirs.items() if k != switch}


# The published values each preset resolves to (the class defaults and the presets' differences), pinned: a change
# of a class default or a preset shows here. Sources: the presets' and classes' comments.
PUBLISHED = {
    "rome": {"target.clamp_norm_factor": 4.0, "target.num_steps": 20, "target.lr": 0.5, "target.kl_factor": 0.0625,
             "context.length_count": [[5, 10], [10, 10]], "mom2_adjustment": True, "eac": None},
    "memit": {"target.clamp_norm_factor": 0.75, "target.num_steps": 20, "target.lr": 0.5,
              "context.length_count": [[10, 5]], "mom2_update_weight": 20000.0, "eac": None, "write_aware": False},
    "alphaedit": {"target.clamp_norm_factor": 0.75, "context.length_count": [[10, 5]], "nullspace_threshold": 0.02,
                  "l2": 10.0, "eac": None},
    "memit-eac": {"target.clamp_norm_factor": 0.75, "eac.gamma": 85.0, "eac.lam": 0.1, "eac.mu": 0.05,
                  "eac.penalty_scale": "relative"},
    "beac": {"target.clamp_norm_factor": 0.75, "eac.gamma": 85.0, "write_aware": True, "beac.key_memory": 0.0,
             "beac.refresh": 1.0, "beac.refresh_window": None, "beac.refresh_checks": 1000, "beac.alike_cosine": 0.9,
             "beac.record_weight": 2.0,
             "beac.las": True, "beac.rar": True, "l2": 10.0},
    "beac-memit": {"target.clamp_norm_factor": 0.75, "write_aware": False, "beac.key_memory": 1.0,
                   "beac.refresh": 0.0, "beac.alike_cosine": None, "mom2_update_weight": 20000.0},
    "ft": {"target.lr": 5e-4, "target.num_steps": 25, "target.norm_constraint": 5e-4, "eac": None},
    "ft-en": {"target.lr": 5e-4, "eac.anchors": "none", "eac.lam": 0.1},
    "ultraedit": {"value_step_size": 1e-6, "ridge": 1.0, "chunk_size": 10, "layers": None, "prior_tokens": 0},
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_presets_resolve_to_the_published_values(name):
    got = resolved(name)
    assert {k: got[k] for k in PUBLISHED[name]} == PUBLISHED[name]


@pytest.mark.parametrize("name", [p for p in PRESETS if not p.startswith("nas")])
def test_a_preset_after_the_quickstart_is_the_preset_alone(name):
    """``--config configs/quickstart.yaml --config configs/methods/<name>.yaml``: the quickstart's ROME-EAC leaves
    nothing of its own in another method (the parser keeps settings given before a class change)."""
    path = METHOD_PRESETS / f"{name}.yaml"
    assert composed(CONFIGS_DIR / "quickstart.yaml", path) == composed(path) == resolved(name)


@pytest.mark.parametrize("name", ["memit", "alphaedit-eac", "beac", "beac-memit-no-las"])
def test_one_target_setting_given_keeps_the_methods_other_values(name, tmp_path):
    """A partly given ``target`` (the user's, or a testbed overlay's) is filled from the method's own defaults,
    not from the dataclass's (ROME's clamp 4)."""
    mine = tmp_path / "mine.yaml"
    mine.write_text("model:\n  method:\n    init_args:\n      target: {lr: 0.25}\n")
    for got in (composed(METHOD_PRESETS / f"{name}.yaml", mine),
                settings(method_from_preset(name, {"init_args": {"target": {"lr": 0.25}}}))):
        assert got["target.lr"] == 0.25 and got["target.clamp_norm_factor"] == 0.75
        assert got["context.length_count"] == [[10, 5]]


def _overlay_leaves(path) -> list[tuple[tuple[str, ...], object]]:
    return list(leaves(method_spec(path).get("init_args") or {}))


def test_a_testbed_overlay_states_only_what_was_measured_differently():
    """Every value of an overlay, in the order the testbeds compose them (configs/testbed/auto.yaml) and of the
    overlays composed by hand, changes the value it replaces."""
    checked = set()
    for testbed in yaml.safe_load(AUTO_FILE.read_text(encoding="utf-8")):
        for name in PRESETS:
            spec = method_spec(METHOD_PRESETS / f"{name}.yaml")
            files = settings_files(f"testbed:{testbed}", spec)
            current = resolved(name)
            for i, path in enumerate(files):
                for leaf, value in _overlay_leaves(path):
                    key = ".".join(leaf)
                    assert current[key] != value, f"{path.name} restates {key} = {value!r} ({name}, {testbed})"
                current = resolved(name, *files[:i + 1])
                checked.add(path.stem)
    by_hand = {"rome-eac": ("rome-eac", []), "ultraedit-single": ("ultraedit", ["ultraedit"])}
    for stem, (name, before) in by_hand.items():
        current = resolved(name, *(SETTINGS_DIR / f"{b}.yaml" for b in before))
        for leaf, value in _overlay_leaves(SETTINGS_DIR / f"{stem}.yaml"):
            assert current[".".join(leaf)] != value, f"{stem}.yaml restates {'.'.join(leaf)} = {value!r}"
        checked.add(stem)
    overlays = {p.stem for p in SETTINGS_DIR.glob("*.yaml")} - {"auto"}
    assert overlays - checked <= {p for p in overlays if p.startswith("nas")}, overlays - checked


def test_ultraedits_old_step_size_name_is_refused_with_the_new_one(tmp_path, capsys):
    from eac_lightning.lightning.cli import main

    with pytest.raises(ValueError, match="value_step_size"):
        method_from_preset("ultraedit", {"init_args": {"lr": 1e-3}})
    mine = tmp_path / "mine.yaml"
    mine.write_text("model:\n  method:\n    init_args:\n      lr: 1.0e-3\n")
    for args in (["--model.method.init_args.lr", "1e-3"], ["--config", str(mine)]):
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", "--config", str(METHOD_PRESETS / "ultraedit.yaml"), *args,
                  "--trainer.default_root_dir", str(tmp_path / "run")])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("eac-lightning: error: ") and "value_step_size" in err and "Traceback" not in err
    # target.lr of another method is not UltraEdit's old name
    assert method_from_preset("memit", {"init_args": {"target": {"lr": 0.1}}}).target.lr == 0.1
