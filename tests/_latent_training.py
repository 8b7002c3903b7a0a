"""A short training and sampling run of a latent model (Probabilistic U-Net, PHiSeg) on toy squares: shared by
test_prob_unet.py and test_phiseg.py, which make their own assertions on what it returns."""

from __future__ import annotations

import torch
from ignite.engine import Events
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from torch import nn

from ambiseg_monai.engines.prepare_batch import DiffusionTrainingPrepareBatch, SamplingPrepareBatch
from ambiseg_monai.inferers.latent import LatentSampleInferer, LatentTrainingInferer


def toy_batches(num_batches: int) -> list[dict[str, torch.Tensor]]:
    """Batches of 4 images (1 x 32 x 32) with a bright 8 x 8 square whose mask is the ``target`` (plus a 3-rater
    ``label`` stack of copies); the same batches on every call."""
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(num_batches):
        target = torch.zeros(4, 1, 32, 32)
        for b in range(4):
            r, c = torch.randint(4, 20, (2,), generator=generator).tolist()
            target[b, 0, r : r + 8, c : c + 8] = 1
        image = target + 0.1 * torch.randn(target.shape, generator=generator)
        batches.append({"image": image, "target": target, "label": target.repeat(1, 3, 1, 1)})
    return batches


def train_on_toy_batches(net: nn.Module, loss_fn, max_epochs: int, train_handlers=()) -> tuple[list, list]:
    """``max_epochs`` over 3 toy batches (Adam, lr 3e-3); returns the loss and the reconstruction term of every
    iteration."""
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=max_epochs,
        train_data_loader=toy_batches(3),
        network=net,
        optimizer=torch.optim.Adam(net.parameters(), lr=3e-3),
        loss_function=loss_fn,
        prepare_batch=DiffusionTrainingPrepareBatch(channels_last=False),
        inferer=LatentTrainingInferer(),
        train_handlers=list(train_handlers),
        decollate=False,
    )
    losses, reconstructions = [], []

    def record(engine):
        losses.append(engine.state.output["loss"].item())
        reconstructions.append(loss_fn.last_terms["reconstruction"])

    trainer.add_event_handler(Events.ITERATION_COMPLETED, record)
    trainer.run()
    return losses, reconstructions


def sample_toy_batch(net: nn.Module, inferer: LatentSampleInferer):
    """The evaluator's ``pred`` for one toy batch of 4 images, sampled by ``inferer``."""
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"), val_data_loader=toy_batches(1), network=net,
        prepare_batch=SamplingPrepareBatch(channels_last=False), inferer=inferer, decollate=False,
    )  # fmt: skip
    evaluator.run()
    return evaluator.state.output["pred"]
