"""Batched N-sample sampling versus one mask at a time (as the official CIMD code samples).

Both modes run the same network, scheduler and seeds, so they produce identical masks (checked
here); only the number of masks per network call differs. Prints masks per second for both.

    python benchmarks/sampling.py --num-samples 16 --steps 25 --image-size 64 --images 2
"""

from __future__ import annotations

import argparse
import time

import torch

from ambiseg_monai.inferers.diffusion import DiffusionSamplingInferer
from ambiseg_monai.networks.denoisers import ConcatConditionedDenoiser
from ambiseg_monai.schedulers.respaced import RespacedDDPMScheduler


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2, help="images per batch")
    parser.add_argument("--num-samples", type=int, default=16, help="N masks per image")
    parser.add_argument("--steps", type=int, default=25, help="respaced sampling steps")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--channels", type=int, nargs="+", default=[32, 64], help="U-Net channels per level")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args()


def _time(inferer: DiffusionSamplingInferer, images: torch.Tensor, network, ids) -> tuple[torch.Tensor, float]:
    if images.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    samples = inferer(images, network, image_ids=ids)
    if images.device.type == "cuda":
        torch.cuda.synchronize()
    return samples, time.perf_counter() - start


def main() -> None:
    args = _parse()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    network = ConcatConditionedDenoiser(image_channels=1, channels=args.channels, norm_num_groups=16).to(device).eval()
    scheduler = RespacedDDPMScheduler(num_train_timesteps=1000, variance_type="learned_range")
    images = torch.randn(args.images, 1, args.image_size, args.image_size, device=device)
    ids = [f"case{i}" for i in range(args.images)]
    common = {"num_samples": args.num_samples, "num_inference_steps": args.steps, "seed": 0}
    batched = DiffusionSamplingInferer(scheduler, **common)
    one_at_a_time = DiffusionSamplingInferer(scheduler, max_rows=1, **common)
    _time(batched, images[:1], network, ids[:1])  # warm-up (allocator, kernels)
    batched_masks, batched_s = _time(batched, images, network, ids)
    single_masks, single_s = _time(one_at_a_time, images, network, ids)
    masks = args.images * args.num_samples
    print(f"device={device} threads={torch.get_num_threads()} images={args.images} N={args.num_samples} "
          f"steps={args.steps} size={args.image_size} channels={args.channels}")  # fmt: skip
    print(f"batched (N x images per call): {masks / batched_s:8.2f} masks/s  ({batched_s:.2f} s)")
    print(f"one mask at a time:            {masks / single_s:8.2f} masks/s  ({single_s:.2f} s)")
    print(f"speed-up: {single_s / batched_s:.2f}x; identical masks: {torch.equal(batched_masks, single_masks)}")


if __name__ == "__main__":
    main()
