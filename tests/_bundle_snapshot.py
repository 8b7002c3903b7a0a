"""Snapshot of what every bundle config combination builds, for ``test_bundle_configs_merged.py``.

The snapshot records, for each bundle and each config-file combination it is used with
(:func:`ambiseg_monai.bundle.config.bundle_combinations`: ``train.json`` alone, with each overlay, with
``evaluate.json`` / ``inference.json`` / ``multi_gpu_train.json``, ...), the merged config that
``monai.bundle run`` executes (:func:`ambiseg_monai.bundle.config.merged_config`). The test reduces it
and today's merged config to their canonical forms (:func:`ambiseg_monai.bundle.config.canonical_config`:
the tree of ``_target_`` s and values with every reference followed) and compares those. It was taken
from the bundles as they were before they were rewritten as overlays of ``bundles/common`` (commit
``git_ref`` in the file), with::

    python tests/_bundle_snapshot.py --ref <commit>      # writes tests/snapshots/bundle_configs.json.xz
    python tests/_bundle_snapshot.py --show cimd train+lidc   # prints one merged combination

Take it again only when a change of behaviour is intended, and say so in the commit.
"""

from __future__ import annotations

import argparse
import json
import lzma
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SNAPSHOT = REPO / "tests" / "snapshots" / "bundle_configs.json.xz"  # xz: 3 MB of JSON in 30 kB
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from ambiseg_monai.bundle.config import bundle_combinations, merged_config  # noqa: E402


def combo_key(combo: tuple[str, ...]) -> str:
    return "+".join(name.removesuffix(".json") for name in combo)


def bundle_names(root: Path) -> list[str]:
    """The bundles (folders with configs/train.json and configs/metadata.json; not bundles/common)."""
    return sorted(p.parent.parent.name for p in (root / "bundles").glob("*/configs/train.json") if (p.parent / "metadata.json").is_file())


def merged_combos(root: Path, bundle: str) -> dict[str, dict]:
    """``{combo key: merged config}`` for every combination of ``root/bundles/<bundle>``."""
    configs = root / "bundles" / bundle / "configs"
    return {
        combo_key(combo): merged_config([str(configs / name) for name in combo], root=root)
        for combo in bundle_combinations(configs)
    }


def checkout(ref: str, into: Path) -> str:
    """Write the ``bundles/`` folder of commit ``ref`` under ``into``; returns the full commit id."""
    commit = subprocess.run(["git", "rev-parse", ref], cwd=REPO, check=True, capture_output=True, text=True).stdout
    files = subprocess.run(
        ["git", "ls-tree", "-r", "--name-only", ref, "bundles"], cwd=REPO, check=True, capture_output=True, text=True
    ).stdout.split()
    for name in files:
        blob = subprocess.run(["git", "show", f"{ref}:{name}"], cwd=REPO, check=True, capture_output=True).stdout
        target = into / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(blob)
    return commit.strip()


def snapshot(ref: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        commit = checkout(ref, root)
        return {
            "git_ref": commit,
            "bundles": {bundle: merged_combos(root, bundle) for bundle in bundle_names(root)},
        }


def load_snapshot(path: Path = SNAPSHOT) -> dict:
    with lzma.open(path, "rt", encoding="utf-8") as f:
        return json.load(f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ref", default="HEAD", help="git commit whose bundles/ to snapshot")
    parser.add_argument("--out", default=str(SNAPSHOT))
    parser.add_argument("--show", nargs=2, metavar=("BUNDLE", "COMBO"), help="print one snapshotted combination")
    args = parser.parse_args()
    if args.show:
        print(json.dumps(load_snapshot(Path(args.out))["bundles"][args.show[0]][args.show[1]], indent=1))
        return
    data = snapshot(args.ref)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with lzma.open(out, "wt", encoding="utf-8", preset=9) as f:
        f.write(json.dumps(data, sort_keys=True, separators=(",", ":")) + "\n")
    combos = sum(len(v) for v in data["bundles"].values())
    print(f"{out}: {combos} combinations of {len(data['bundles'])} bundles at {data['git_ref']}")


if __name__ == "__main__":
    main()
