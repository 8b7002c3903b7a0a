"""The sampler's own cost per step, next to the network's forward pass it wraps.

The reverse-diffusion loop (``ambiseg_monai.diffusion.sampler.reverse_diffusion``) is run with a
stand-in network that returns a precomputed output, so only the sampler's work is timed: drawing the
rows' noise from their CPU generators and copying it to the device, building the timestep batch and
the scheduler step. The bundle's real network is timed alone on the same batch; the ratio of the two
is the sampler overhead (goal: under 10 % of the network's time).

Settings (N = 16 rows, 128 x 128 by default), one per sampler the bundles use:

- ``cimd``: respaced ancestral DDPM with learned-range variance (the CIMD bundle's sampler);
- ``cimd_ddim``: respaced DDIM (eta 0) on the same network;
- ``consensus_diffusion``: its bundle's scheduler (class-conditioned, C x G rows);
- ``ambdiffseg``: continuous-time DDIM (its bundle's sampler).

To compare two implementations in one command, ``--baseline DIR`` reruns the same measurements with
the package from another checkout (e.g. a ``git worktree`` of an older commit) in a subprocess and
prints both with the ratio::

    python benchmarks/sampler_overhead.py
    git worktree add /tmp/before <commit> && python benchmarks/sampler_overhead.py --baseline /tmp/before
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

try:
    from benchmarks.quality import use_sampler
    from benchmarks.sampling_methods import load_method
    from benchmarks.timing import best_seconds
except ImportError:  # run as a script: this folder is sys.path[0]
    from quality import use_sampler
    from sampling_methods import load_method
    from timing import best_seconds

# setting -> (bundle, inferer config id, steps)
SETTINGS = {
    "cimd": ("cimd", "validate#inferer", 25),
    "cimd_ddim": ("cimd", "validate#inferer", 25),
    "consensus_diffusion": ("consensus_diffusion", "consensus_inferer", 20),
    "ambdiffseg": ("ambdiffseg", "validate#inferer", 10),
}


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--rows", type=int, default=16, help="masks sampled together (N)")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (best kept)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--baseline", default=None, help="another checkout whose package to measure too")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON only (used for --baseline)")
    return parser.parse_args()


def _scheduler_and_network(setting: str, device: torch.device):
    bundle, inferer_id, steps = SETTINGS[setting]
    parser = load_method(bundle, device)
    if setting == "cimd_ddim":
        use_sampler(parser, "ddim")
    network = parser.get_parsed_content("network").eval()
    scheduler = parser.get_parsed_content(inferer_id, lazy=False).scheduler
    return network, scheduler, steps


def measure(setting: str, rows: int, size: int, device: torch.device, repeats: int) -> dict:
    """Seconds per step of the bare network and of the sampler around a stand-in network."""
    from ambiseg_monai.diffusion.sampler import make_generators, repeat_rows, reverse_diffusion

    torch.manual_seed(0)
    network, scheduler, steps = _scheduler_and_network(setting, device)
    model = getattr(network, "module", network)
    image = torch.randn(1, 1, size, size, device=device)
    x = torch.randn(rows, 1, size, size, device=device)
    labels = torch.arange(rows, device=device) % 4 if setting == "consensus_diffusion" else None
    with torch.no_grad():
        cond = repeat_rows(model.encode_condition(image), rows)
        timesteps = torch.full((rows,), float(scheduler.timesteps[0]), device=device).to(scheduler.timesteps.dtype)
        output = network(x, timesteps, cond=cond, class_labels=labels)

        def network_steps() -> None:
            for _ in range(steps):
                network(x, timesteps, cond=cond, class_labels=labels)

        def stand_in(x_t, t, cond=None, class_labels=None):
            return output

        def sampler_steps() -> None:
            generators = make_generators(0, [0], rows)
            reverse_diffusion(stand_in, scheduler, None, (1, size, size), generators,
                              num_inference_steps=steps, reference=x)  # fmt: skip

        network_s = best_seconds(network_steps, device, repeats, warmup=True) / steps
        sampler_s = best_seconds(sampler_steps, device, repeats, warmup=True) / steps
    return {"setting": setting, "steps": steps, "network_ms": 1e3 * network_s, "sampler_ms": 1e3 * sampler_s}


def _baseline_rows(args: argparse.Namespace) -> dict[str, dict]:
    command = [sys.executable, __file__, "--json", "--settings", *args.settings, "--rows", str(args.rows),
               "--image-size", str(args.image_size), "--repeats", str(args.repeats), "--threads", str(args.threads),
               "--device", args.device]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(args.baseline).resolve())}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    return {row["setting"]: row for row in json.loads(done.stdout.strip().splitlines()[-1])}


def main() -> None:
    args = _parse()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = [measure(s, args.rows, args.image_size, device, args.repeats) for s in args.settings]
    if args.json:
        print(json.dumps(rows))
        return
    baseline = _baseline_rows(args) if args.baseline else {}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device={device} ({name}) N={args.rows} size={args.image_size}")
    header = "| setting | steps | network ms/step | sampler ms/step | sampler overhead |"
    rule = "|---|---|---|---|---|"
    if baseline:
        header += " baseline sampler ms/step | baseline overhead | sampler speed-up |"
        rule += "---|---|---|"
    print(header)
    print(rule)
    for row in rows:
        line = (f"| {row['setting']} | {row['steps']} | {row['network_ms']:.2f} | {row['sampler_ms']:.3f} | "
                f"{100 * row['sampler_ms'] / row['network_ms']:.1f} % |")  # fmt: skip
        if row["setting"] in baseline:
            old = baseline[row["setting"]]
            line += (f" {old['sampler_ms']:.3f} | {100 * old['sampler_ms'] / old['network_ms']:.1f} % | "
                     f"{old['sampler_ms'] / row['sampler_ms']:.2f}x |")  # fmt: skip
        print(line)


if __name__ == "__main__":
    main()
