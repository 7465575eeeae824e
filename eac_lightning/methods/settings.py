"""Method settings measured for a model, applied over the published ones.

The method presets (``configs/methods/*.yaml``) hold the published hyper-parameters, set for GPT2-XL-sized models.
On the offline testbed some of them write nothing (MEMIT's λ = 20000 and clamp 0.75: the testbed's keys are ~1e3
times smaller than GPT2-XL's); the values measured there live in ``configs/testbed/<method>.yaml`` (each file
says where its values come from), and ``configs/testbed/auto.yaml`` lists which of them were measured to help on
which testbed (a method may compose several there, for one testbed alone). When the model is such a testbed,
:func:`apply_model_settings` puts those values in place of the published ones, leaf by leaf, and leaves alone every
value that differs from the published preset (a value the user chose). ``--model.method_settings as_given`` turns
this off.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from eac_lightning.paths import CONFIGS_DIR

#: the folder of the measured settings, and the file naming which apply on which testbed
SETTINGS_DIR = CONFIGS_DIR / "testbed"
AUTO_FILE = SETTINGS_DIR / "auto.yaml"
PUBLISHED_DIR = CONFIGS_DIR / "methods"
_EAC_SUFFIX = {"rome": "-eac", "memit": "-eac", "alphaedit": "-eac", "ft": "-en"}


def method_key(spec: dict[str, Any]) -> str:
    """The preset name of a method spec (``{"class_path": ..., "init_args": ...}``): ``rome``, ``rome-eac``,
    ``memit-eac``, ``ft-en``, ``beac`` (B-EAC over AlphaEdit's solve), ``beac-memit``, ..."""
    cls = spec["class_path"].rsplit(".", 1)[-1]
    key = {"BEACAlphaEdit": "beac", "BEAC": "beac-memit"}.get(cls, cls.lower())
    if spec.get("init_args", {}).get("eac") is not None:
        key += _EAC_SUFFIX.get(key, "")
    return key


def settings_files(model: str, spec: dict[str, Any]) -> list[Path]:
    """The measured settings for ``spec``'s method on ``model`` (``testbed:<name>``), in the order they apply.

    ``auto.yaml`` lists per testbed either a method's name (its overlay ``<method>.yaml``) or ``{method: [file,
    ...]}``: overlays measured for that testbed alone, composed in order (AlphaEdit-EAC's ridge on ``tiny``)."""
    prefix, _, name = model.partition(":")
    if prefix != "testbed":
        return []
    key = method_key(spec)
    for entry in (yaml.safe_load(AUTO_FILE.read_text(encoding="utf-8")) or {}).get(name, []):
        if entry == key:
            return [SETTINGS_DIR / f"{key}.yaml"]
        if isinstance(entry, dict) and key in entry:
            return [SETTINGS_DIR / f"{stem}.yaml" for stem in entry[key]]
    return []


def _leaves(tree: dict[str, Any], prefix: tuple[str, ...] = ()):
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            yield from _leaves(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def _get(tree: dict[str, Any] | None, path: tuple[str, ...]) -> Any:
    for k in path:
        if not isinstance(tree, dict) or k not in tree:
            return _MISSING
        tree = tree[k]
    return tree


_MISSING = object()


def apply_model_settings(model: str, spec: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``spec`` with the measured settings for ``model`` in place of the published values.

    Returns the new spec and a record of what changed: ``{"file": ..., "changed": {"v.num_steps": [20, 40], ...}}``
    (empty when nothing applies). A leaf is replaced only where the spec still holds the published preset's value
    (or, where the preset does not name it, any value: the class default).
    """
    paths = settings_files(model, spec)
    if not paths:
        return spec, {}
    # the files' leaves merged first (a later file wins), so a leaf set by two files is not taken for the user's
    overlay: dict[tuple[str, ...], Any] = {}
    for path in paths:
        overlay.update(_leaves(yaml.safe_load(path.read_text(encoding="utf-8"))["model"]["method"]
                               .get("init_args", {})))
    published_file = PUBLISHED_DIR / f"{method_key(spec)}.yaml"
    published = (yaml.safe_load(published_file.read_text(encoding="utf-8"))["model"]["method"].get("init_args", {})
                 if published_file.exists() else {})
    args = _copy(spec.get("init_args") or {})
    changed: dict[str, list[Any]] = {}
    for leaf, value in overlay.items():
        current = _get(args, leaf)
        reference = _get(published, leaf)
        if reference is not _MISSING and current is not _MISSING and current != reference:
            continue  # the user's own value
        node = args
        for k in leaf[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = {}
            node = node[k]
        if current != value:
            changed[".".join(leaf)] = [None if current is _MISSING else current, value]
        node[leaf[-1]] = value
    files = " + ".join(f"configs/testbed/{p.name}" for p in paths)
    return {**spec, "init_args": args}, ({"file": files, "changed": changed} if changed else {})


def _copy(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _copy(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_copy(v) for v in tree]
    return tree
