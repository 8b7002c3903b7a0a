"""Checkpoint handlers: resume training from the last epoch checkpoint; load a required checkpoint.

Training saves an epoch-level checkpoint with MONAI's ``CheckpointSaver(save_interval=1, n_saved=1)``
holding the network, optimiser, LR scheduler, EMA model and the trainer state (epoch, iteration).
:class:`ResumableCheckpointer` writes it and, when training starts, restores the newest one, so
re-running an interrupted training continues instead of starting over.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from ignite.engine import Engine, Events
from monai.handlers import CheckpointLoader, CheckpointSaver

__all__ = ["latest_checkpoint", "ResumableCheckpointer", "RequiredCheckpointLoader"]

_EPOCH_PATTERN = re.compile(r"epoch=(\d+)\.pt$")


def latest_checkpoint(checkpoint_dir: str | Path, prefix: str = "checkpoint") -> Path | None:
    """The ``<prefix>*epoch=N.pt`` file with the largest N in ``checkpoint_dir`` (None if there is none)."""
    directory = Path(checkpoint_dir)
    if not directory.is_dir():
        return None
    best: tuple[int, Path] | None = None
    for path in directory.glob(f"{prefix}*epoch=*.pt"):
        match = _EPOCH_PATTERN.search(path.name)
        if match and (best is None or int(match.group(1)) > best[0]):
            best = (int(match.group(1)), path)
    return None if best is None else best[1]


class ResumableCheckpointer:
    """Save an epoch checkpoint after every epoch and, at start, resume from the newest one.

    The trainer itself is added to the checkpoint (under ``engine_key``) when the handler is
    attached, so the config does not have to reference the trainer inside the trainer's own
    handler list (a circular reference). Checkpoints are MONAI ``CheckpointSaver`` files
    ``checkpoint_epoch=N.pt`` (only the newest is kept) holding ``save_dict`` + the trainer state
    (epoch, iteration). A finished training (checkpoint epoch = ``max_epochs``) completes at once.

    Args:
        checkpoint_dir: folder of the epoch checkpoints.
        save_dict: objects to save and restore, e.g. ``{"network", "ema", "optimizer", "lr_scheduler"}``.
        resume: restore from the newest checkpoint at ``Events.STARTED`` (when one exists).
        save: write the checkpoints (set False on distributed ranks other than 0; every rank resumes).
        map_location: passed to ``torch.load`` (e.g. the training device).
        engine_key: key of the trainer's state in the checkpoint.
    """

    def __init__(
        self,
        checkpoint_dir: str | Path,
        save_dict: dict,
        resume: bool = True,
        save: bool = True,
        map_location=None,
        engine_key: str = "trainer",
    ) -> None:
        self.checkpoint_dir = Path(checkpoint_dir)
        self.save_dict = dict(save_dict)
        self.resume = resume
        self.save = save
        self.map_location = map_location
        self.engine_key = engine_key
        self.loaded_from: Path | None = None
        self.logger = logging.getLogger(__name__)

    def attach(self, engine: Engine) -> None:
        objects = {**self.save_dict, self.engine_key: engine}
        if self.resume:
            engine.add_event_handler(Events.STARTED, self._resume, objects)
        if self.save:
            CheckpointSaver(
                save_dir=str(self.checkpoint_dir),
                save_dict=objects,
                save_interval=1,
                n_saved=1,
                epoch_level=True,
            ).attach(engine)

    def _resume(self, engine: Engine, objects: dict) -> None:
        path = latest_checkpoint(self.checkpoint_dir)
        if path is None:
            self.logger.info(f"no checkpoint in {self.checkpoint_dir}: training starts from scratch")
            return
        # torch.load accepts a device here as well as a dict
        CheckpointLoader(load_path=str(path), load_dict=objects, map_location=self.map_location)(engine)
        self.loaded_from = path
        self.logger.info(f"resumed from {path} at epoch {engine.state.epoch}, iteration {engine.state.iteration}")


class RequiredCheckpointLoader(CheckpointLoader):
    """MONAI ``CheckpointLoader`` that fails at construction, with a clear message, when the file is missing."""

    def __init__(self, load_path: str, load_dict: dict, **kwargs) -> None:
        if not Path(load_path).is_file():
            raise FileNotFoundError(
                f"checkpoint '{load_path}' does not exist: train the bundle first "
                "(python -m monai.bundle run training --config_file <bundle>/configs/train.json) "
                "or pass --ckpt_path to an existing checkpoint."
            )
        super().__init__(load_path=load_path, load_dict=load_dict, **kwargs)
