"""MONAI SupervisedTrainer with the diffusion training pieces on demo data: loss decreases; helpers."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Events
from monai.data import CacheDataset, DataLoader
from monai.engines import SupervisedTrainer
from monai.transforms import Compose, EnsureTyped, SelectItemsd
from monai.utils import set_determinism

from ambiseg_monai.data.datalist import load_split
from ambiseg_monai.engines import DiffusionTrainingPrepareBatch, SamplingPrepareBatch
from ambiseg_monai.handlers import GradientClipping, LossTerms
from ambiseg_monai.inferers import DiffusionTrainingInferer
from ambiseg_monai.losses.diffusion import HybridDiffusionLoss
from ambiseg_monai.networks import AxisAlignedGaussianEncoder, CIMDNetwork, ConcatConditionedDenoiser
from ambiseg_monai.schedulers.respaced import RespacedDDPMScheduler
from ambiseg_monai.transforms.loading import LoadImage2Dd
from ambiseg_monai.transforms.raters import PadRatersd, SelectRandomRaterd


def _loader(dataset_dir: str) -> DataLoader:
    transform = Compose(
        [
            LoadImage2Dd(keys=["image", "label"]),
            PadRatersd(keys="label", num_raters=4),
            SelectRandomRaterd(keys="label", output_key="target"),
            EnsureTyped(keys=["image", "target"], track_meta=False),
            SelectItemsd(keys=["image", "target", "case_id"]),
        ]
    )
    data = CacheDataset(load_split(dataset_dir, "training"), transform=transform, progress=False)
    return DataLoader(data, batch_size=8, shuffle=True)


def _trainer(dataset_dir: str, epochs: int, handlers=()) -> SupervisedTrainer:
    set_determinism(seed=0)
    net = CIMDNetwork(
        ConcatConditionedDenoiser(image_channels=1, channels=(16, 16), norm_num_groups=8, num_head_channels=16),
        AxisAlignedGaussianEncoder(2, channels=(8, 16)),
        AxisAlignedGaussianEncoder(2, channels=(8, 16)),
    )
    # a short chain keeps the per-step noise level spread small, so a few iterations show learning
    scheduler = RespacedDDPMScheduler(num_train_timesteps=50, variance_type="learned_range")
    return SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=epochs,
        train_data_loader=_loader(dataset_dir),
        network=net,
        optimizer=torch.optim.Adam(net.parameters(), lr=2e-3),
        loss_function=HybridDiffusionLoss(term_weights={"l_amb": 1e-3}),
        prepare_batch=DiffusionTrainingPrepareBatch(image_channels=1),
        inferer=DiffusionTrainingInferer(scheduler),
        train_handlers=list(handlers),
        decollate=False,
    )


def test_loss_of_a_short_run_on_demo_data_decreases(small_demo_dataset):
    trainer = _trainer(small_demo_dataset, epochs=12, handlers=[GradientClipping(max_norm=5.0)])
    losses: list[dict] = []
    loss_terms = LossTerms()
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(loss_terms(e.state.output)))
    trainer.run()
    assert len(losses) == 12 and set(losses[0]) == {"loss", "l_simple", "l_vlb", "l_amb"}
    first = sum(x["l_simple"] for x in losses[:3]) / 3
    last = sum(x["l_simple"] for x in losses[-3:]) / 3
    assert last < 0.8 * first, (first, last)


def test_gradient_clipping_bounds_the_gradient_norm(small_demo_dataset):
    clip = GradientClipping(max_norm=1e-3)
    trainer = _trainer(small_demo_dataset, epochs=1, handlers=[clip])
    norms = []

    def after_clip(engine):
        params = [p for p in engine.network.parameters() if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))))

    trainer.add_event_handler(Events.ITERATION_COMPLETED, after_clip)
    trainer.run()
    assert clip.last_norm is not None and clip.last_norm > 1e-3  # the raw norm was above the bound ...
    assert max(norms) <= 1e-3 * 1.001  # ... and the stepped gradients were clipped to it
    with pytest.raises(ValueError, match="max_norm"):
        GradientClipping(max_norm=0)


def test_prepare_batch_checks_channels_and_rater_counts():
    batch = {"image": torch.zeros(2, 1, 8, 8), "target": torch.zeros(2, 1, 8, 8), "case_id": ["a", "b"]}
    image, target, args, kwargs = DiffusionTrainingPrepareBatch(image_channels=1)(batch)
    assert kwargs["target"] is target and kwargs["class_labels"] is None and args == ()
    with pytest.raises(ValueError, match=r"1 channel\(s\) but the network expects image_channels=4 \(cases \['a', 'b'\]\)"):
        DiffusionTrainingPrepareBatch(image_channels=4)(batch)
    val = {"image": torch.zeros(2, 1, 8, 8), "label": torch.zeros(2, 3, 8, 8), "rater_mask": torch.ones(2, 4, dtype=torch.bool)}
    with pytest.raises(ValueError, match="rater count mismatch"):
        SamplingPrepareBatch()(val)
    val["rater_mask"] = torch.ones(2, 3, dtype=torch.bool)
    image, label, _, kwargs = SamplingPrepareBatch()({**val, "case_id": ["a", "b"]})
    assert label.shape == (2, 3, 8, 8) and kwargs["image_ids"] == ["a", "b"]
    with pytest.raises(KeyError, match="no 'target'"):
        DiffusionTrainingPrepareBatch()({"image": torch.zeros(1, 1, 8, 8)})
