"""The settings resolver: where each method setting comes from, in one place.

A method's settings resolve in three layers, later ones winning, each stating only what differs from the one
before (configs/methods/README.md):

1. **preset**: the class defaults, which are the method's published hyper-parameters (set for GPT2-XL-sized models,
   cited where they are defined: ``ROME_TARGET``, ``MEMIT_TARGET``, ``BEAC_SETTINGS``, ...), and what the project's
   config files change (``configs/methods/*.yaml``, ``configs/quickstart.yaml``, ``configs/bench/*``);
2. **measured**: on an offline testbed, the values measured there (``configs/testbed/<method>.yaml``, each file says
   where its values come from; ``configs/testbed/auto.yaml`` lists which apply on which testbed). Some published
   values write nothing on an 8.5M-parameter model (MEMIT's λ = 20000 and clamp 0.75);
3. **yours**: every value you give, on the command line or in a config file of your own, whatever its value (the
   parser's record of what was given decides, never a comparison of values: :func:`given_leaves`).

:func:`apply_model_settings` does it for the CLI, ``Editor.load`` and :func:`~eac_lightning.editor.method_from_preset`
(``EditingModule(method=...)`` with a method object takes that object as yours). The record it returns says each
setting's source; the CLI prints it once and ``summary.json`` keeps it. ``--model.method_settings as_given`` skips
layer 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from eac_lightning.paths import CONFIGS_DIR

#: the folder of the measured settings, and the file naming which apply on which testbed
SETTINGS_DIR = CONFIGS_DIR / "testbed"
AUTO_FILE = SETTINGS_DIR / "auto.yaml"
_EAC_SUFFIX = {"rome": "-eac", "memit": "-eac", "alphaedit": "-eac", "ft": "-en"}

#: settings renamed, by method class: {class: {old name: (new name, why)}}. A config or command line that still
#: spells the old name is refused with the new one (:func:`check_renamed`, :func:`renamed_in_argv`).
RENAMED = {"UltraEdit": {"lr": ("value_step_size", "UltraEdit's η, the step size of its normalised gradient step, "
                                "which the authors call lr; not an Adam rate like the other methods' target.lr")}}


def method_key(spec: dict[str, Any]) -> str:
    """The preset name of a method spec (``{"class_path": ..., "init_args": ...}``): ``rome``, ``rome-eac``,
    ``memit-eac``, ``ft-en``, ``beac`` (B-EAC over AlphaEdit's solve), ``beac-memit``, ..."""
    cls = spec["class_path"].rsplit(".", 1)[-1]
    key = {"BEAC": "beac", "BEACMEMIT": "beac-memit"}.get(cls, cls.lower())
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


def leaves(tree: dict[str, Any], prefix: tuple[str, ...] = ()):
    """(path, value) of every leaf of a nested mapping (an empty mapping is a leaf)."""
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            yield from leaves(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def _get(tree: dict[str, Any] | None, path: tuple[str, ...]) -> Any:
    for k in path:
        if not isinstance(tree, dict) or k not in tree:
            return _MISSING
        tree = tree[k]
    return tree


_MISSING = object()


def apply_model_settings(model: str, spec: dict[str, Any],
                         given: set[tuple[str, ...]] | frozenset = frozenset()) -> tuple[dict[str, Any], dict[str, Any]]:
    """``spec`` with the measured settings for ``model`` in place of every setting not in ``given`` (the leaves of
    ``init_args`` you gave, as :func:`given_leaves` reads them; a given prefix such as ``("eac",)`` covers its
    leaves).

    Returns the new spec and the record of where settings came from: ``{"file": ..., "changed": {"eac.gamma": [85.0,
    50.0], ...}, "sources": {"eac.gamma": "measured", "target.lr": "yours", ...}}`` (``sources`` names the measured
    and your settings; every other one is the preset's). Empty when nothing is measured for the model and you gave
    nothing.
    """
    paths = settings_files(model, spec)
    yours = {".".join(leaf): "yours" for leaf in sorted(given)}
    if not paths:
        return spec, ({"file": None, "changed": {}, "sources": yours} if yours else {})
    overlay: dict[tuple[str, ...], Any] = {}
    for path in paths:  # a later file wins
        overlay.update(leaves(yaml.safe_load(path.read_text(encoding="utf-8"))["model"]["method"]
                               .get("init_args", {})))
    args = _copy(spec.get("init_args") or {})
    changed: dict[str, list[Any]] = {}
    sources = dict(yours)
    for leaf, value in overlay.items():
        if any(leaf[:len(g)] == g for g in given):
            continue  # yours
        current = _get(args, leaf)
        sources[".".join(leaf)] = "measured"
        node = args
        for k in leaf[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = {}
            node = node[k]
        if current != value:
            changed[".".join(leaf)] = [None if current is _MISSING else current, value]
        node[leaf[-1]] = value
    files = " + ".join(f"configs/testbed/{p.name}" for p in paths)
    return {**spec, "init_args": args}, {"file": files, "changed": changed, "sources": sources}


def describe(record: dict[str, Any], model: str) -> str:
    """One line naming each setting's source (what the CLI prints once)."""
    measured = [f"{k} {a} -> {b}" for k, (a, b) in record.get("changed", {}).items()]
    yours = [k for k, v in record.get("sources", {}).items() if v == "yours"]
    parts = []
    if measured:
        parts.append(f"measured for {model} ({record['file']}): " + ", ".join(measured))
    if yours:
        parts.append("yours: " + ", ".join(yours))
    return "method settings: " + "; ".join(parts + ["the rest: the preset and the class defaults "
                                                    "(--model.method_settings as_given skips the measured ones)"])


def _options(argv: list[str]):
    """(``--key``, value or None) for each option of a command line: ``--key value`` and ``--key=value``."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith("--"):
            continue
        key, eq, value = arg.partition("=")
        if not eq:
            value = argv[i] if i < len(argv) and not argv[i].startswith("--") else None
            i += value is not None
        yield key, value


def given_leaves(argv: list[str], package_dir: Path = CONFIGS_DIR) -> set[tuple[str, ...]]:
    """The method settings (paths under ``init_args``) a command line gives: ``--model.method.init_args.X.Y V``
    (or ``--model.method.X.Y``, ``=V``), a ``--model.method``/``init_args`` mapping, and every method setting of a
    ``--config`` file outside the project's own configs (``package_dir``: presets, the quickstart and bench configs
    are the preset layer)."""
    out: set[tuple[str, ...]] = set()
    package = Path(package_dir).resolve()
    for key, value in _options(argv):
        if key == "--config" and value:
            path = Path(value).resolve()
            if path.is_file() and package not in path.parents:
                method = ((yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("model") or {}).get("method")
                if isinstance(method, dict):
                    out |= {leaf for leaf, _ in leaves(method.get("init_args") or {})}
        elif key.startswith("--model.method."):
            rest = key[len("--model.method."):]
            rest = rest[len("init_args."):] if rest.startswith("init_args.") else rest
            if rest == "init_args":
                parsed = yaml.safe_load(value) if value else None
                out |= {leaf for leaf, _ in leaves(parsed)} if isinstance(parsed, dict) else set()
            elif rest not in ("class_path", "help"):
                out.add(tuple(rest.split(".")))
        elif key == "--model.method" and value:
            parsed = yaml.safe_load(value)
            if isinstance(parsed, dict):
                out |= {leaf for leaf, _ in leaves(parsed.get("init_args") or {})}
    return out


def _copy(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _copy(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_copy(v) for v in tree]
    return tree


def _class_name(class_path: Any) -> str:
    return str(class_path).rsplit(".", 1)[-1]


def _renamed_message(cls: str, old: str, where: str) -> str:
    new, why = RENAMED[cls][old]
    return (f"{where}: {cls} has no setting {old!r}: it is now {new!r} ({why}); use "
            f"--model.method.init_args.{new} on the command line, {new}: in a config file")


def check_renamed(spec: dict[str, Any], where: str = "model.method") -> None:
    """Refuse (ValueError) a method spec that gives a renamed setting under its old name, naming the new one."""
    cls = _class_name(spec.get("class_path", ""))
    for old in RENAMED.get(cls, {}):
        if old in (spec.get("init_args") or {}):
            raise ValueError(_renamed_message(cls, old, where))


def renamed_in_argv(argv: list[str]) -> str | None:
    """The refusal for a command line that gives a renamed method setting under its old name (in a ``--config`` file
    or as an option), or None. The method's class is the last one the command line names (a later class keeps the
    settings given before it, as the config parser does)."""
    cls, given = None, []  # given: (setting, where)
    for key, value in _options(argv):
        method = None
        if key == "--config" and value and Path(value).is_file():
            try:
                tree = yaml.safe_load(Path(value).read_text(encoding="utf-8")) or {}
            except (OSError, yaml.YAMLError):
                continue  # the parser reports an unreadable file itself
            method = (tree.get("model") or {}).get("method") if isinstance(tree, dict) else None
            where = value
        elif key == "--model.method" and value:
            method = yaml.safe_load(value) if value.lstrip().startswith("{") else {"class_path": value}
            where = key
        elif key == "--model.method.class_path" and value:
            cls = _class_name(value)
        elif key == "--model.method.init_args" and value:
            parsed = yaml.safe_load(value)
            given += [(k, key) for k in parsed] if isinstance(parsed, dict) else []
        elif key.startswith("--model.method."):
            rest = key[len("--model.method."):]
            rest = rest[len("init_args."):] if rest.startswith("init_args.") else rest
            given.append((rest.split(".")[0], key))
        if isinstance(method, dict):
            if method.get("class_path"):
                cls = _class_name(method["class_path"])
            given += [(k, where) for k in (method.get("init_args") or {})]
    for name, where in given:
        if name in RENAMED.get(cls, {}):
            return _renamed_message(cls, name, where)
    return None
