"""The bundles' configs, rewritten as overlays of the shared base (``bundles/common/configs``), build
the same components as before: for every bundle and every config combination it is used with, the
merged config (``%`` macros resolved, as ``monai.bundle run`` does) reduces to the same canonical
form (``_target_`` s and argument values, references followed; see
:func:`ambiseg_monai.bundle_config.canonical_config`) as the snapshot taken from the configs before
the rewrite (``tests/snapshots/bundle_configs.json.xz``, see ``tests/_bundle_snapshot.py``).

Changes that are meant are listed here, each with its reason:

- ``TARGET_RENAMES``: a class moved or renamed in the library (old ``_target_`` -> new ``_target_``);
  applied to the snapshot before comparing. Add an entry when you rename a ``_target_`` the bundles use.
- ``INTENDED_CHANGES``: values a combination now has on purpose, by config file and id (``a#b`` ids
  allowed), applied to the snapshot's merged config before comparing. For a change too large to list,
  take the snapshot again from the commit that makes it (``tests/_bundle_snapshot.py``) and say so.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ambiseg_monai.bundle_config import (
    RUN_IDS,
    bundle_combinations,
    canonical_config,
    config_layout,
    find_macros,
    merged_config,
    resolve_file_macros,
    write_merged_bundle,
)

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"
COMMON = BUNDLES / "common" / "configs"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bundle_snapshot import combo_key, load_snapshot  # noqa: E402

#: old ``_target_`` -> new ``_target_`` (a class moved or renamed in the library). Empty: nothing renamed yet.
TARGET_RENAMES: dict[str, str] = {}

#: file of a combination -> {config id: the value it now has on purpose}
INTENDED_CHANGES: dict[str, dict[str, object]] = {
    # The shared multi-GPU overlay keeps the ranks other than 0 from probing the tracking server (which
    # only consensus_diffusion's copy did): they log nothing, so they take the configured URI as is.
    "multi_gpu_train.json": {
        "resolved_tracking_uri": (
            "$@tracking_uri if @is_not_rank0 else ambiseg_monai.reporting.resolve_tracking_uri(@tracking_uri)"
        ),
    },
}

#: the total number of lines of the bundles' JSON configs may not grow past this (5,390 before the base)
JSON_LINE_BUDGET = 3600

SNAPSHOT = load_snapshot()
CASES = [(bundle, key) for bundle, combos in sorted(SNAPSHOT["bundles"].items()) for key in sorted(combos)]


def _files(bundle: str, key: str) -> list[str]:
    return [str(BUNDLES / bundle / "configs" / f"{name}.json") for name in key.split("+")]


def _expected(bundle: str, key: str) -> dict:
    """The snapshot's merged config of a combination, with the ``INTENDED_CHANGES`` of its files applied
    (``a#b#0`` ids set nested values, as in a config overlay)."""
    config = json.loads(json.dumps(SNAPSHOT["bundles"][bundle][key]))
    for name in key.split("+"):
        for config_id, value in INTENDED_CHANGES.get(f"{name}.json", {}).items():
            *parents, last = config_id.split("#")
            target = config
            for part in parents:
                target = target[int(part)] if isinstance(target, list) else target[part]
            target[int(last) if isinstance(target, list) else last] = value
    return config


def _differences(old, new, shared_old, shared_new, path="", out=None, limit=20):
    """Paths where two canonical forms differ (at most ``limit``), following ``{"@shared": hash}`` into
    the shared tables, for a readable failure."""
    out = [] if out is None else out
    if len(out) >= limit:
        return out
    if isinstance(old, dict) and isinstance(new, dict):
        if set(old) == set(new) == {"@shared"} and old != new:
            return _differences(
                shared_old[old["@shared"]], shared_new[new["@shared"]], shared_old, shared_new, f"{path}(shared)", out
            )
        for k in sorted(set(old) | set(new)):
            if k not in new:
                out.append(f"{path}/{k}: missing now (was {json.dumps(old[k])[:120]})")
            elif k not in old:
                out.append(f"{path}/{k}: new ({json.dumps(new[k])[:120]})")
            else:
                _differences(old[k], new[k], shared_old, shared_new, f"{path}/{k}", out, limit)
    elif isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new)):
            _differences(a, b, shared_old, shared_new, f"{path}/{i}", out, limit)
    elif old != new:
        out.append(f"{path}: {json.dumps(old)[:160]} -> {json.dumps(new)[:160]}")
    return out


@pytest.mark.parametrize("bundle, key", CASES, ids=[f"{b}:{k}" for b, k in CASES])
def test_merged_config_builds_the_same_components_as_before(bundle, key):
    old = _expected(bundle, key)
    new = merged_config(_files(bundle, key), root=REPO)
    assert not find_macros(new), f"macros MONAI would leave unresolved: {find_macros(new)[:3]}"
    # monai.bundle run executes these whenever they are present (initialize, finalize)
    assert [i for i in RUN_IDS if i in new] == [i for i in RUN_IDS if i in old], "entry points added or removed"
    layout = config_layout(old)
    expected = canonical_config(old, layout, renames=TARGET_RENAMES)
    actual = canonical_config(new, layout)
    missing_imports = sorted(set(expected["imports"]) - set(actual["imports"]))
    assert not missing_imports, f"imports dropped: {missing_imports}"
    diff = _differences(expected["items"], actual["items"], expected["shared"], actual["shared"])
    assert not diff, f"{bundle} {key.replace('+', ' + ')}: builds something else than before:\n" + "\n".join(diff)
    # the same items with the same hashes: the same objects, shared the same way
    assert expected["items"] == actual["items"]
    assert expected["instances"] == actual["instances"], "one object where there were several alike (or the reverse)"


def test_every_combination_of_the_snapshot_is_still_a_combination_of_the_bundles():
    for bundle, combos in SNAPSHOT["bundles"].items():
        now = {combo_key(c) for c in bundle_combinations(BUNDLES / bundle / "configs")}
        assert set(combos) <= now, f"{bundle}: config files gone: {sorted(set(combos) - now)}"


def _config_files() -> list[Path]:
    return sorted(p for p in BUNDLES.glob("*/configs/*.json"))


def test_bundle_json_stays_within_its_line_budget():
    lines = sum(len(p.read_text(encoding="utf-8").splitlines()) for p in BUNDLES.rglob("*.json"))
    assert lines <= JSON_LINE_BUDGET, f"bundles/**/*.json: {lines} lines, budget {JSON_LINE_BUDGET}"


@pytest.mark.parametrize("path", _config_files(), ids=lambda p: f"{p.parent.parent.name}/{p.name}")
def test_configs_macros_resolve_and_overlays_name_no_list_position(path):
    config = json.loads(path.read_text(encoding="utf-8"))
    if path.parent == COMMON:
        # the base is pulled in by macros, and MONAI does not resolve a macro inside a macro's content
        assert not find_macros(config), f"{path}: the shared base may not use % macros"
        return
    resolved = resolve_file_macros(config, REPO)  # every %file#id names an existing file and id
    assert not [m for _, m in find_macros(resolved) if ".json" in m]
    # ablations and overlays override named components, never an entry of a list by its position
    positional = [k for k in config if re.search(r"#\d+(#|$)", k)]
    assert not positional, f"{path}: overrides a list entry by position: {positional}"


def test_merge_configs_writes_a_standalone_bundle_that_builds_the_same(tmp_path):
    out = tmp_path / "cimd"
    written = write_merged_bundle(BUNDLES / "cimd", out, root=REPO)
    assert {p.name for p in written} >= {"train.json", "evaluate.json", "inference.json", "multi_gpu_train.json"}
    assert (out / "configs" / "metadata.json").is_file() and (out / "docs" / "README.md").is_file()
    for combo in (["train.json"], ["train.json", "lidc.json", "evaluate.json"], ["train.json", "multi_gpu_train.json"]):
        standalone = [str(out / "configs" / name) for name in combo]
        for f in standalone:  # nothing in the copy points back into the repository
            assert not [m for _, m in find_macros(json.loads(Path(f).read_text())) if ".json" in m]
        # read from another working directory: no macro path left to resolve
        here = canonical_config(merged_config(standalone, root=tmp_path))
        repo = canonical_config(merged_config([str(BUNDLES / "cimd" / "configs" / n) for n in combo], root=REPO))
        assert here == repo
    # one merged file
    merged = write_merged_bundle(
        BUNDLES / "cimd", tmp_path / "one", root=REPO, merge=["train.json", "lidc.json", "evaluate.json"]
    )
    assert [p.name for p in merged] == ["evaluate.json"]
    alone = canonical_config(merged_config([str(merged[0])], root=tmp_path))
    stack = canonical_config(
        merged_config([str(BUNDLES / "cimd" / "configs" / n) for n in ("train.json", "lidc.json", "evaluate.json")], root=REPO)
    )
    assert alone == stack


def test_merge_configs_command_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "ambiseg_monai.cli", "merge-configs", "--bundle", "bundles/phiseg", "--out", str(tmp_path / "p")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "p" / "configs" / "train.json").is_file()
    again = subprocess.run(
        [sys.executable, "-m", "ambiseg_monai.cli", "merge-configs", "--bundle", "bundles/phiseg", "--out", str(tmp_path / "p")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert again.returncode == 1 and "already exists" in again.stderr
