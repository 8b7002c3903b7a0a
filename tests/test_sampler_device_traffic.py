"""Host/device traffic of the sampling loop, checked on CPU with PyTorch's ``meta`` device as the accelerator.

A meta tensor has a device but no data: reading a value back (``int(t)``, ``.item()``, ``.tolist()``)
raises, and every host-to-device copy is visible to a dispatch mode. Running the real sampler with
meta samples therefore shows, without a GPU, what a CUDA run would do per step: the loop must never
read the device (on CUDA each read is a synchronisation) and copy to it exactly once per step (the
rows' noise, drawn from their CPU generators for reproducibility).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ambiseg_monai.diffusion.gaussian import GaussianChain
from ambiseg_monai.diffusion.sampler import draw_noise, make_generators, reverse_diffusion
from ambiseg_monai.schedulers.continuous import ContinuousDDIMScheduler, ContinuousDDPMScheduler
from ambiseg_monai.schedulers.respaced import RespacedDDIMScheduler, RespacedDDPMScheduler

META = torch.device("meta")


class HostToDeviceCopies(TorchDispatchMode):
    """Counts copies from CPU tensors (other than 0-dim scalars, which kernels take as arguments) to meta."""

    def __init__(self) -> None:
        super().__init__()
        self.copies = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            source = args[1] if func is torch.ops.aten.copy_.default else args[0]
            target = out
            if source.device.type == "cpu" and target.device == META and source.ndim > 0:
                self.copies += 1
        return out


def _meta_network(out_channels: int):
    def network(x, timesteps, cond=None, class_labels=None):
        assert x.device == META and timesteps.device == META and timesteps.shape == (x.shape[0],)
        return torch.empty(x.shape[0], out_channels, *x.shape[2:], device=META)

    return network


SCHEDULERS = {
    "ddpm_learned_range": (lambda: RespacedDDPMScheduler(num_train_timesteps=100, variance_type="learned_range"), 2),
    "ddpm_fixed_small": (lambda: RespacedDDPMScheduler(num_train_timesteps=100, clip_sample=True), 1),
    "ddim_eta": (lambda: RespacedDDIMScheduler(num_train_timesteps=100, eta=0.5), 1),
    "continuous_ddpm": (lambda: ContinuousDDPMScheduler(num_inference_steps=4), 1),
    "continuous_ddim": (lambda: ContinuousDDIMScheduler(num_inference_steps=4), 1),
}


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_each_step_copies_only_the_noise_and_never_reads_the_device(name):
    make_scheduler, out_channels = SCHEDULERS[name]
    scheduler = make_scheduler()
    steps = 6 if "continuous" not in name else None
    counter = HostToDeviceCopies()
    with counter:
        x = reverse_diffusion(
            _meta_network(out_channels),
            scheduler,
            None,
            (1, 8, 8),
            make_generators(0, [0, 1], 3),
            num_inference_steps=steps,
            reference=torch.empty((), device=META),
        )
    assert x.shape == (6, 1, 8, 8) and x.device == META
    # x_T plus one noise tensor per step; nothing else (no coefficient tables, no timesteps)
    assert counter.copies == 1 + len(scheduler.timesteps)


def test_noise_rows_come_from_their_own_generators():
    generators = make_generators(3, ["case"], 4)
    noise = draw_noise(generators, (1, 5, 5), torch.zeros((), dtype=torch.float64))
    fresh = make_generators(3, ["case"], 4)
    expected = torch.stack([torch.randn(1, 5, 5, generator=g) for g in fresh]).double()
    assert noise.dtype == torch.float64 and torch.equal(noise, expected)


def test_gather_keeps_a_step_coefficient_on_the_host_and_per_row_indices_on_their_device():
    chain = GaussianChain(torch.linspace(0.99, 0.1, 5))
    like = torch.zeros(3, 1, 4, 4)
    scalar = chain.gather(chain.alphas_cumprod, 2, like)
    assert scalar.ndim == 0 and scalar.dtype == torch.float32 and scalar.device.type == "cpu"
    assert float(scalar) == pytest.approx(float(chain.alphas_cumprod[2]))
    rows = chain.gather(chain.alphas_cumprod, torch.tensor([0, 4, 2]), like)
    assert rows.shape == (3, 1, 1, 1)
    assert torch.allclose(rows.flatten().double(), chain.alphas_cumprod[[0, 4, 2]], atol=1e-7)
