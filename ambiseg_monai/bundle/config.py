"""Bundle configs: the shared base merged into a bundle, and a canonical form to compare configs.

The bundles under ``bundles/`` share their engine, handler, tracking and evaluation wiring through
``bundles/common/configs/*.json``, pulled into each method's configs with MONAI ``%file#id`` macros.
MONAI resolves those macros relative to the *working directory*, so the bundles run from the
repository root (as every command in the README does). A bundle that must stand alone (the MONAI
model zoo, a copy elsewhere) is written with the macros resolved by::

    ambiseg merge-configs --bundle bundles/cimd --out dist/cimd

which copies the bundle folder (metadata, logging.conf, docs, LICENSE) and writes each of its config
files with every ``%`` macro replaced by the content it names: the same overlays, used the same way
(``--config_file "['dist/cimd/configs/train.json','dist/cimd/configs/evaluate.json']"``), from any
directory. ``--merge train.json lidc.json evaluate.json`` writes one config merged from several
instead.

:func:`canonical_config` reduces a merged config to the tree of components it builds (``_target_`` s
and argument values, every ``@`` reference followed, expressions with their references resolved),
so that two configs written differently can be shown to build the same thing
(``tests/test_bundle_configs_merged.py``).

:func:`as_flag` reads a bundle's on/off setting (``amp``, ``resume``, ...) in its configs: the command
line delivers ``--amp false`` as the *string* ``"false"`` (python-fire turns only ``False`` / ``True``
into bools), which a ``$`` expression would take as true.
"""

from __future__ import annotations

import argparse
import copy
import functools
import hashlib
import importlib
import inspect
import json
import os
import re
import shutil
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ambiseg_monai.bundle.errors import BundleInputError, short_errors_in_bundle_cli

#: the library API (the ``ambiseg`` subcommand's ``configure_parser`` and ``main`` are not part of it)
__all__ = [
    "MACRO",
    "RUN_IDS",
    "as_flag",
    "bundle_combinations",
    "canonical_config",
    "config_layout",
    "find_macros",
    "format_config",
    "merged_config",
    "resolve_file_macros",
    "resolve_macros",
    "working_directory",
    "write_merged_bundle",
]

MACRO = "%"
REF = "@"
SEP = "#"
#: ids ``monai.bundle run`` executes (``initialize`` / ``finalize`` run whenever present)
RUN_IDS = ("initialize", "run", "finalize", "training", "evaluating", "inferring")
#: the config files of a bundle that are not dataset/ablation overlays
BASE_FILES = ("train.json", "evaluate.json", "inference.json", "multi_gpu_train.json", "metadata.json")
_REF_PATTERN = re.compile(rf"{REF}(?:\w*)(?:{SEP}\w*)*")  # as monai.bundle.ReferenceResolver.id_matcher


@contextmanager
def working_directory(path: str | os.PathLike | None) -> Iterator[None]:
    """Run the block in ``path`` (None: where it is); bundle configs read ``%bundles/common/...`` from there."""
    if path is None:
        yield
        return
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def _normalize_id(value: str) -> str:
    return value.replace("::", SEP)


def _lookup(config: Any, config_id: str) -> Any:
    """The value at ``config_id`` (``a#b#0``) in a nested dict/list; KeyError if absent."""
    value = config
    if config_id == "":
        return value
    for key in _normalize_id(config_id).split(SEP):
        if isinstance(value, Mapping):
            value = value[key]
        elif isinstance(value, list):
            value = value[int(key)]
        else:
            raise KeyError(config_id)
    return value


# ----------------------------------------------------------------------------------------------- flags

#: the texts :func:`as_flag` reads as true / false (compared stripped and in lower case)
FLAG_TRUE = ("true", "yes", "on", "1")
FLAG_FALSE = ("false", "no", "off", "0")


@short_errors_in_bundle_cli
def as_flag(value: Any, name: str) -> bool:
    """The bool of the bundle setting ``name`` (a switch such as ``amp`` or ``resume``) given as ``value``.

    The bundle configs read every switch where they use it through this function
    (``"$ambiseg_monai.bundle.as_flag(@amp, 'amp')"``), because ``python -m monai.bundle run ... --amp
    false`` sets ``amp`` to the *string* ``"false"`` (python-fire parses ``False`` and ``True`` only),
    which is true in a ``$`` expression. MONAI applies the command line's overrides to the config and
    offers no step to convert them before the expressions are evaluated, hence the point of use.

    Accepted: a bool; ``0`` / ``1``; ``"true"`` / ``"false"``, ``"yes"`` / ``"no"``, ``"on"`` / ``"off"``,
    ``"1"`` / ``"0"`` in any case, spaces around ignored. Anything else raises
    :class:`~ambiseg_monai.bundle.errors.BundleInputError` (a ``ValueError``) naming the setting; on the
    bundle command line that ends the run with that one line (:func:`short_errors_in_bundle_cli`).
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in FLAG_TRUE:
            return True
        if text in FLAG_FALSE:
            return False
    raise BundleInputError(
        f"setting {name!r} is a switch: give true or false (also yes/no, on/off, 1/0, in any case), got {value!r}; "
        f"e.g. --{name} false"
    )


# ---------------------------------------------------------------------------------------------- macros


def find_macros(config: Any, path: str = "") -> list[tuple[str, str]]:
    """``(id, macro)`` for every ``%...`` string left in ``config``."""
    found = []
    if isinstance(config, Mapping):
        for key, value in config.items():
            found += find_macros(value, f"{path}{SEP}{key}" if path else str(key))
    elif isinstance(config, list):
        for index, value in enumerate(config):
            found += find_macros(value, f"{path}{SEP}{index}" if path else str(index))
    elif isinstance(config, str) and config.startswith(MACRO):
        found.append((path, config))
    return found


def _load_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def resolve_file_macros(config: Any, root: str | os.PathLike = ".") -> Any:
    """A copy of ``config`` with every ``%path/file.json#id`` string replaced by the value it names.

    Paths are relative to ``root``, as MONAI resolves them relative to the working directory. A macro
    without a file (``"%noise_scheduler"``: a copy of another item of the merged config) is kept: MONAI
    resolves it after all overlays are merged. A macro inside the content a file macro pulls in is an
    error, because MONAI does not resolve nested macros."""
    from monai.bundle import ConfigParser

    root = Path(root)

    def resolve(value: Any, where: str) -> Any:
        if isinstance(value, Mapping):
            return {k: resolve(v, f"{where}{SEP}{k}" if where else k) for k, v in value.items()}
        if isinstance(value, list):
            return [resolve(v, f"{where}{SEP}{i}" if where else str(i)) for i, v in enumerate(value)]
        if isinstance(value, str) and value.startswith(MACRO):
            path, config_id = ConfigParser.split_path_id(value[len(MACRO) :])
            if not path:
                return value  # "%id": a copy of another item of the merged config, resolved by MONAI at run time
            content = copy.deepcopy(_lookup(_load_json(root / path), config_id))
            nested = find_macros(content)
            if nested:
                raise ValueError(f"{where}: {value!r} pulls in macros ({nested[0][1]!r}); MONAI does not resolve those")
            return content
        return value

    return resolve(config, "")


def merged_config(
    config_files: Sequence[str | os.PathLike] | str | os.PathLike,
    overrides: Mapping[str, Any] | None = None,
    root: str | os.PathLike | None = None,
) -> dict:
    """The config ``monai.bundle run --config_file FILES --key value ...`` executes, with its ``%`` macros
    and relative ids resolved exactly as MONAI resolves them (relative to ``root``, default: the working
    directory), but nothing parsed or instantiated. ``_meta_`` is left out."""
    from monai.bundle import ConfigParser

    files = [str(config_files)] if isinstance(config_files, (str, os.PathLike)) else [str(f) for f in config_files]
    root_abs = None if root is None else Path(root).resolve()
    files = [f if root_abs is None or Path(f).is_absolute() else str(root_abs / f) for f in files]
    parser = ConfigParser()
    parser.read_config(files)
    parser.update(dict(overrides or {}))
    with working_directory(root_abs):
        parser.resolve_macro_and_relative_ids()
    config = dict(parser.get())
    config.pop("_meta_", None)
    return config


def resolve_macros(parser: Any, root: str | os.PathLike | None = None) -> Any:
    """Resolve the ``%`` macros (and relative ids) of a ``monai.bundle.ConfigParser`` now, relative to
    ``root`` (default: the working directory), as MONAI does when it parses; returns the parser.

    For code that reads or edits a bundle config by path (``parser["train#handlers"]``) before running it:
    until MONAI parses, an id the bundle takes from ``bundles/common`` holds its macro string."""
    with working_directory(None if root is None else Path(root).resolve()):
        parser.resolve_macro_and_relative_ids()
    return parser


# ------------------------------------------------------------------------------------------- canonical


def _is_pure_ref(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(REF) and _REF_PATTERN.fullmatch(_normalize_id(value)) is not None


def _is_expression(value: Any) -> bool:
    return isinstance(value, str) and value.startswith("$")


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _referenced_ids(config: Any) -> set[str]:
    """Every id named by an ``@`` reference (whole-string or inside a ``$`` expression) in ``config``."""
    found: set[str] = set()
    if isinstance(config, Mapping):
        for value in config.values():
            found |= _referenced_ids(value)
    elif isinstance(config, list):
        for value in config:
            found |= _referenced_ids(value)
    elif isinstance(config, str) and (_is_pure_ref(config) or _is_expression(config)):
        found |= {m[len(REF) :] for m in _REF_PATTERN.findall(_normalize_id(config))}
    return found


def _is_plain(canonical: Any) -> bool:
    """Plain data: scalars in lists and dicts, no component, expression or shared object inside; used in
    several places it is still just a value (``eval_metrics``, ``unet_channels``)."""
    if isinstance(canonical, Mapping):
        return not ({"_target_", "$", "@shared"} & set(canonical)) and all(_is_plain(v) for v in canonical.values())
    if isinstance(canonical, list):
        return all(_is_plain(v) for v in canonical)
    return _is_scalar(canonical)


def config_layout(config: Mapping[str, Any]) -> dict:
    """The namespaces of a config: ``{key: None}`` for an item, ``{key: {...}}`` for a section (a plain
    dict, not a component, that nothing references as a whole, e.g. ``train``, ``evaluate#n4``)."""
    referenced = _referenced_ids(config)

    def layout(value: Mapping[str, Any], path: str) -> dict:
        out: dict = {}
        for key in value:
            child = value[key]
            child_id = f"{path}{SEP}{key}" if path else str(key)
            is_section = isinstance(child, Mapping) and "_target_" not in child and child_id not in referenced
            out[key] = layout(child, child_id) if is_section and child else None
        return out

    return layout({k: v for k, v in config.items() if k not in ("_meta_", "imports")}, "")


def _layout_items(layout: Mapping[str, Any], path: str = "") -> list[str]:
    items = []
    for key in sorted(layout):
        child_id = f"{path}{SEP}{key}" if path else key
        items += [child_id] if layout[key] is None else _layout_items(layout[key], child_id)
    return items


MISSING = "<missing>"


class _Canonicalizer:
    """Two walks from the same items: the first counts how often each non-scalar value is reached, the
    second writes the trees. A value reached more than once is one object of the parsed config used in
    several places (the network, the MLflow handler of several handlers): it is written once, in
    ``shared`` under a hash of its canonical form, and referred to as ``{"@shared": hash}`` wherever
    it is used; so one component shared by two handlers differs from two copies of it."""

    def __init__(self, config: Mapping[str, Any], renames: Mapping[str, str], normalize: bool):
        self.config = config
        self.renames = dict(renames)
        self.normalize = normalize
        self.counts: Counter[str] = Counter()
        self.counting = True
        self.stack: list[str] = []
        self.shared: dict[str, Any] = {}
        self.shared_ids: dict[str, str] = {}  # definition id -> hash
        self.instances: Counter[str] = Counter()  # hash -> number of definitions with that content

    def definition(self, config_id: str) -> tuple[str, Any]:
        """Follow ``"@a"`` -> ``"@b"`` chains to the id that defines the value."""
        seen = set()
        config_id = _normalize_id(config_id)
        value = _lookup(self.config, config_id)
        while _is_pure_ref(value):
            if config_id in seen:
                raise ValueError(f"reference cycle at {config_id}")
            seen.add(config_id)
            config_id = _normalize_id(value)[len(REF) :]
            value = _lookup(self.config, config_id)
        return config_id, value

    def visit_id(self, config_id: str) -> Any:
        config_id, value = self.definition(config_id)
        return self.visit(value, config_id)

    def visit(self, value: Any, config_id: str) -> Any:
        if _is_pure_ref(value):
            return self.visit_id(_normalize_id(value)[len(REF) :])
        if _is_scalar(value) and not _is_expression(value):
            return value
        if _is_expression(value) and not _REF_PATTERN.search(_normalize_id(value)):
            # no reference: a value (``$operator.lt``, ``$torch.device(...)``), one object or several alike
            return {"$": _normalize_id(value), "refs": []}
        if self.counting:
            self.counts[config_id] += 1
            if self.counts[config_id] > 1:
                return None
        elif self.counts[config_id] > 1 and config_id in self.shared_ids:
            return {"@shared": self.shared_ids[config_id]}
        if config_id in self.stack:
            raise ValueError(f"reference cycle through {config_id}")
        self.stack.append(config_id)
        try:
            result = self.build(value, config_id)
        finally:
            self.stack.pop()
        if not self.counting and self.counts[config_id] > 1 and not _is_plain(result):
            digest = hashlib.sha1(json.dumps(result, sort_keys=True).encode()).hexdigest()[:12]
            self.shared[digest] = result
            self.shared_ids[config_id] = digest
            self.instances[digest] += 1
            return {"@shared": digest}
        return result

    def build(self, value: Any, config_id: str) -> Any:
        if _is_expression(value):
            refs: list[str] = []

            def placeholder(match: re.Match) -> str:
                ref = match.group(0)[len(REF) :]
                if ref not in refs:
                    refs.append(ref)
                return f"{REF}{{{refs.index(ref)}}}"

            text = _REF_PATTERN.sub(placeholder, _normalize_id(value))
            return {"$": text, "refs": [self.visit_id(ref) for ref in refs]}
        if isinstance(value, Mapping):
            out = {k: self.visit(value[k], f"{config_id}{SEP}{k}" if config_id else k) for k in sorted(value)}
            target = out.get("_target_")
            if isinstance(target, str):
                out["_target_"] = target = self.renames.get(target, target)
                if self.normalize:
                    out = _drop_defaults(out, target)
            return out
        if isinstance(value, list):
            return [self.visit(v, f"{config_id}{SEP}{i}" if config_id else str(i)) for i, v in enumerate(value)]
        raise TypeError(f"{config_id}: unexpected value {value!r}")

    def run(self, items: Sequence[str]) -> dict:
        result: dict = {}
        for counting in (True, False):
            self.counting = counting
            result = {}
            for item in items:
                try:
                    result[item] = self.visit_id(item)
                except (KeyError, IndexError):
                    result[item] = MISSING
        return result


def canonical_config(
    config: Mapping[str, Any],
    layout: Mapping[str, Any] | None = None,
    renames: Mapping[str, str] | None = None,
    normalize: bool = True,
) -> dict:
    """The components a merged config (:func:`merged_config`) builds, independent of how it is written.

    ``layout`` (default: :func:`config_layout` of ``config``) names the items to describe: each
    top-level item and each item of a section (``train#trainer``, ``evaluate#n4#handlers``, ...).
    Items of ``config`` outside the layout are described only where the layout's items use them, so
    a config may add top-level slots or section entries without changing its canonical form.

    Each item is written with dict keys sorted, ``@`` references replaced by the canonical form of
    what they name (through chains of references), ``$`` expressions as ``{"$": text with the
    references numbered @{0}, @{1}..., "refs": [...]}``, and values used in several places as
    ``{"@shared": hash}`` (see ``shared``; ``instances`` counts the distinct definitions with one
    content). Plain data (lists and dicts of scalars) and expressions without references are values:
    never marked as shared. ``imports`` is returned sorted; items absent from ``config`` as ``"<missing>"``.

    ``renames`` (old ``_target_`` -> new) is applied to every component. With ``normalize``, a component
    argument given a literal equal to its default (``epoch_length: null`` on ``SupervisedTrainer``) is
    left out, as is ``"_disabled_": false``: both build the same object as leaving them out.
    """
    config = {k: v for k, v in config.items() if k != "_meta_"}
    if layout is None:
        layout = config_layout(config)
    canonicalizer = _Canonicalizer(config, renames or {}, normalize)
    items = canonicalizer.run(_layout_items(layout))
    return {
        "imports": sorted(set(config.get("imports") or [])),
        "layout": layout,
        "items": items,
        "shared": canonicalizer.shared,
        "instances": dict(canonicalizer.instances),
    }


@functools.cache
def _signature_defaults(target: str) -> dict[str, Any] | None:
    """The literal defaults of ``target``'s arguments (a class: its ``__init__``), or None when
    ``target`` cannot be located or inspected."""
    try:
        from monai.bundle.config_item import ComponentLocator

        module_name = ComponentLocator().get_component_module_name(target)
        if isinstance(module_name, str):
            component = getattr(importlib.import_module(module_name), target)
        elif "." in target:
            module_path, _, name = target.rpartition(".")
            component = getattr(importlib.import_module(module_path), name)
        else:
            return None
        signature = inspect.signature(component)
    except Exception:  # noqa: BLE001 - an unknown or renamed target: no normalisation
        return None
    return {
        name: list(p.default) if isinstance(p.default, tuple) else p.default
        for name, p in signature.parameters.items()
        if p.default is not inspect.Parameter.empty and _is_literal(p.default)
    }


def _is_literal(value: Any) -> bool:
    """A scalar, or a list/tuple of scalars (JSON gives a list where Python code writes a tuple)."""
    return _is_scalar(value) or (isinstance(value, (list, tuple)) and all(_is_scalar(v) for v in value))


def _drop_defaults(component: dict, target: str) -> dict:
    out = dict(component)
    if out.get("_disabled_") is False:
        del out["_disabled_"]
    for name, default in (_signature_defaults(target) or {}).items():
        value = out.get(name, MISSING)
        if value is MISSING or not _is_literal(value) or isinstance(value, list) != isinstance(default, list):
            continue
        same = (
            [type(v) for v in value] == [type(d) for d in default]
            if isinstance(value, list)
            else type(value) is type(default)
        )
        if same and value == default:
            del out[name]
    return out


# ------------------------------------------------------------------------------------------ combinations


def bundle_combinations(configs_dir: str | os.PathLike) -> list[tuple[str, ...]]:
    """The config-file lists (names in ``configs_dir``) a bundle is used with: ``train.json`` alone, with
    each overlay, with ``evaluate.json`` / ``inference.json`` / ``multi_gpu_train.json``, with each overlay
    and then each of those, and the chains its docs use (an overlay on a dataset overlay)."""
    configs = Path(configs_dir)
    names = sorted(p.name for p in configs.glob("*.json"))
    if "train.json" not in names:
        return []
    runs = [n for n in ("evaluate.json", "inference.json", "multi_gpu_train.json") if n in names]
    overlays = [n for n in names if n not in BASE_FILES]
    datasets = [n for n in overlays if n in ("lidc.json", "ms.json", "bone_us.json")]
    others = [n for n in overlays if n not in datasets and not n.startswith("qubiq_")]
    combos: list[tuple[str, ...]] = [("train.json",)]
    combos += [("train.json", r) for r in runs]
    for overlay in overlays:
        combos += [("train.json", overlay)] + [("train.json", overlay, r) for r in runs]
    # method/ablation overlays on top of a dataset overlay (e.g. lidc.json + ablation_prediction_v.json)
    for dataset in datasets:
        for other in others:
            combos += [("train.json", dataset, other)] + [("train.json", dataset, other, r) for r in runs]
    return combos


# ------------------------------------------------------------------------------------------------- CLI


def format_config(config: Any, width: int = 120, indent: int = 4) -> str:
    """JSON text in the bundles' style: 4-space indentation, and a list or dict on one line when it
    fits in ``width`` columns and holds no dict or list with more than one level inside."""

    def depth(value: Any) -> int:
        if isinstance(value, Mapping):
            return 1 + max((depth(v) for v in value.values()), default=0)
        if isinstance(value, list):
            return 1 + max((depth(v) for v in value), default=0)
        return 0

    def dump(value: Any, level: int, prefix_len: int) -> str:
        if not isinstance(value, (Mapping, list)) or not value:
            return json.dumps(value)
        compact = json.dumps(value, separators=(", ", ": "))
        if depth(value) <= 2 and level * indent + prefix_len + len(compact) + 1 <= width:
            return compact
        pad = " " * ((level + 1) * indent)
        if isinstance(value, Mapping):
            lines = []
            for k, v in value.items():
                key = json.dumps(k) + ": "
                lines.append(pad + key + dump(v, level + 1, len(key)))
            body = ",\n".join(lines)
            return "{\n" + body + "\n" + " " * (level * indent) + "}"
        body = ",\n".join(pad + dump(v, level + 1, 0) for v in value)
        return "[\n" + body + "\n" + " " * (level * indent) + "]"

    return dump(config, 0, 0) + "\n"


def _json_dump(config: Any, path: Path) -> None:
    path.write_text(format_config(config), encoding="utf-8")


def write_merged_bundle(
    bundle: str | os.PathLike,
    out: str | os.PathLike,
    root: str | os.PathLike = ".",
    merge: Sequence[str] | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Write ``bundle`` (a folder with ``configs/``) to ``out`` with its ``%`` macros resolved.

    Without ``merge``: a copy of the whole bundle folder in which every config file has the shared
    base pulled in (each file stays the overlay it was). With ``merge`` (config file names in order,
    e.g. ``["train.json", "lidc.json", "evaluate.json"]``): one ``out/configs/<last name>`` holding them
    merged into a single config, next to the bundle's metadata.json and logging.conf. Returns the
    config files written."""
    bundle, out, root = Path(bundle), Path(out), Path(root)
    configs = bundle / "configs"
    if not configs.is_dir():
        raise NotADirectoryError(f"not a bundle folder (no configs/): {bundle}")
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} already exists; pass --overwrite to replace it.")
        shutil.rmtree(out)
    written: list[Path] = []
    if merge:
        files = [configs / name for name in merge]
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"bundle config not found: {f}")
        (out / "configs").mkdir(parents=True)
        for extra in ("metadata.json", "logging.conf"):
            if (configs / extra).is_file():
                shutil.copy2(configs / extra, out / "configs" / extra)
        for extra in ("LICENSE", "docs"):
            source = bundle / extra
            if source.is_dir():
                shutil.copytree(source, out / extra)
            elif source.is_file():
                shutil.copy2(source, out / extra)
        target = out / "configs" / Path(merge[-1]).name
        _json_dump(merged_config([str(f.resolve()) for f in files], root=root), target)
        return [target]
    shutil.copytree(bundle, out)
    for f in sorted((out / "configs").glob("*.json")):
        if f.name == "metadata.json":
            continue
        config = _load_json(f)
        resolved = resolve_file_macros(config, root)
        if resolved != config:
            _json_dump(resolved, f)
        written.append(f)
    return written


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", required=True, help="bundle folder, e.g. bundles/cimd")
    parser.add_argument("--out", required=True, help="folder to write (the standalone bundle)")
    parser.add_argument(
        "--root", default=".", help="folder the %%path macros are relative to (default: the working directory)"
    )
    parser.add_argument(
        "--merge",
        nargs="+",
        metavar="CONFIG",
        help="merge these config files of the bundle (in order, e.g. train.json lidc.json) into one file",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def main(args: argparse.Namespace) -> int:
    written = write_merged_bundle(args.bundle, args.out, root=args.root, merge=args.merge, overwrite=args.overwrite)
    for path in written:
        print(path)
    return 0
