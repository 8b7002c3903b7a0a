"""Does a model reproduce each training image's own rater draws instead of the true probabilities?

On the demo's *training* images (whose truth is stored like the test images'), per lobe: the sampled
inclusion frequency f, the true probability p and the image's own R-draw frequency d (the share of its
raters' masks that include the lobe). A model that learned the distribution has f - p uncorrelated with
d - p; one that memorised its training raters has f close to d (correlation near 1). docs/benchmarks.md
("AmbDiffSeg's cause") used it on weights kept by ``convergence.py --save-dir``::

    python benchmarks/memorisation.py --method ambdiffseg --checkpoint weights/ambdiffseg_it10000.pt \\
        --dataset-dir data/demo --images 64 --samples 32
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

import numpy as np
import torch
from ignite.engine import Events

try:
    from benchmarks import convergence
except ImportError:  # run as a script: benchmarks/ itself is on sys.path
    import convergence  # type: ignore[no-redef]

from ambiseg_monai.metrics.truth import region_inclusion_frequency
from ambiseg_monai.transforms.loading import LoadImage2Dd


def memorisation(method: str, checkpoint: str, dataset_dir: str, split: str, images: int, samples: int) -> dict:
    """Lobe error, corr(f - p, d - p) and mean |f - d| over the lobes of the first ``images`` of ``split``."""
    items = convergence.load_split(dataset_dir, split)[:images]  # the evaluator's items, in its order
    parser, evaluator, handler, key = convergence.inference_evaluator(
        method, dataset_dir, [], {}, samples, images, split
    )
    load_raters = LoadImage2Dd(keys=["label"])
    lobes: list[tuple[float, float, float]] = []  # (p, f, d)
    seen = {"images": 0}

    @evaluator.on(Events.ITERATION_COMPLETED)
    def _collect(engine) -> None:
        preds = engine.state.output[handler.pred_key].detach().cpu() > 0.5  # B x N x H x W
        batch = engine.state.batch
        regions, region_mask = batch["truth_regions"] > 0.5, batch["truth_region_mask"].bool()
        sampled = region_inclusion_frequency(preds, regions, region_mask)
        for i in range(len(preds)):
            item = items[seen["images"]]
            seen["images"] += 1
            raters = torch.as_tensor(np.asarray(load_raters(dict(item))["label"])) > 0.5  # R x H x W
            drawn = region_inclusion_frequency(raters[None], regions[i : i + 1], region_mask[i : i + 1])[0]
            for lobe in torch.nonzero(region_mask[i]).flatten().tolist():
                p = float(batch["truth_region_probabilities"][i, lobe])
                lobes.append((p, float(sampled[i, lobe]), float(drawn[lobe])))

    weights = torch.load(checkpoint, map_location="cpu", weights_only=True)[key]
    convergence.score_network(evaluator, handler, parser.get_parsed_content("network"), weights)
    p, f, d = (np.asarray(column) for column in zip(*lobes, strict=True))
    varies = (f - p).std() > 0 and (d - p).std() > 0
    return {
        "split": split,
        "lobes": len(p),
        "lobe_error": round(float(np.abs(f - p).mean()), 3),
        "corr_f_minus_p_d_minus_p": round(float(np.corrcoef(f - p, d - p)[0, 1]), 3) if varies else float("nan"),
        "mean_abs_f_minus_d": round(float(np.abs(f - d).mean()), 3),
    }


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--method",
        required=True,
        choices=[m for m in convergence.METHODS if m != "consensus_diffusion"],
        help="methods whose samples are B x N x H x W (consensus diffusion draws per level)",
    )
    parser.add_argument("--checkpoint", required=True, help="a model file (bundle model.pt or convergence --save-dir)")
    parser.add_argument("--dataset-dir", default="data/demo")
    parser.add_argument("--split", default="training")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = memorisation(args.method, args.checkpoint, args.dataset_dir, args.split, args.images, args.samples)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
