"""The bundles' configs, rewritten as overlays of the shared base (``bundles/common/configs``), build
the same components as before: for every bundle and every config combination it is used with, the
merged config (``%`` macros resolved, as ``monai.bundle run`` does) reduces to the same canonical
form (``_target_`` s and argument values, references followed; see
:func:`ambiseg_monai.bundle.config.canonical_config`) as the snapshot taken from the configs before
the rewrite (``tests/snapshots/bundle_configs.json.xz``, see ``tests/_bundle_snapshot.py``).

Changes that are meant are listed here, each with its reason:

- ``TARGET_RENAMES``: a class moved or renamed in the library (old ``_target_`` -> new ``_target_``);
  applied to the snapshot before comparing. Add an entry when you rename a ``_target_`` the bundles use.
- ``EXPRESSION_RENAMES``: likewise for a function the configs call in a ``$`` expression, and for an
  ``imports`` entry.
- ``METRIC_RENAMES``: a published metric renamed (old name -> new name); applied to every string value of
  the snapshot that is exactly the old name (the configs' metric lists).
- Switches: the configs read every top-level true/false setting through ``ambiseg_monai.bundle.as_flag``
  (``--amp false`` on the command line is the string "false"); ``as_flag`` of a bool is that bool, so
  ``as_flag(@amp, 'amp')`` is compared as ``@amp`` (:func:`_switches_read_directly`; that every switch is read
  through it is ``tests/test_bundle_flags.py``'s concern).
- ``INTENDED_CHANGES``: values a combination now has on purpose, by config file (``"train.json"``: every
  bundle's; ``"cimd/train.json"``: one bundle's) and id (``a#b#0`` ids allowed; ``REMOVED`` deletes the
  id), applied to the snapshot's merged config before comparing: first those of every bundle, then the
  bundle's own, file by file in the combination's order. For a change too large to list, take the
  snapshot again from the commit that makes it (``tests/_bundle_snapshot.py``) and say so.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ambiseg_monai.bundle.config import (
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

#: old ``_target_`` -> new ``_target_`` (a class moved or renamed in the library)
TARGET_RENAMES: dict[str, str] = {
    # the deprecated module path of the one ProvenanceHandler (ambiseg_monai/handlers/provenance.py) is gone
    "ambiseg_monai.handlers.provenance.ProvenanceHandler": "ambiseg_monai.handlers.ProvenanceHandler",
    # the continuous-time alias of the one training inferer is gone (its stratified_times default: below)
    "ambiseg_monai.engines.continuous_training.ContinuousDiffusionTrainingInferer": (
        "ambiseg_monai.inferers.DiffusionTrainingInferer"
    ),
    # layout by role (issue #16): transforms/, schedulers/, losses/, inferers/, optimizers/ (CHANGELOG)
    "ambiseg_monai.data.transforms.LoadImage2Dd": "ambiseg_monai.transforms.loading.LoadImage2Dd",
    "ambiseg_monai.data.transforms.LoadTruthd": "ambiseg_monai.transforms.loading.LoadTruthd",
    "ambiseg_monai.data.transforms.MeanRatersd": "ambiseg_monai.transforms.raters.MeanRatersd",
    "ambiseg_monai.data.transforms.PadRatersd": "ambiseg_monai.transforms.raters.PadRatersd",
    "ambiseg_monai.data.transforms.RandomConsensusLeveld": "ambiseg_monai.transforms.raters.RandomConsensusLeveld",
    "ambiseg_monai.data.transforms.SelectRandomRaterd": "ambiseg_monai.transforms.raters.SelectRandomRaterd",
    "ambiseg_monai.data.transforms.SelectRaterd": "ambiseg_monai.transforms.raters.SelectRaterd",
    "ambiseg_monai.metrics.RelativeAreaFilterd": "ambiseg_monai.transforms.RelativeAreaFilterd",
    "ambiseg_monai.engines.consensus.UnpackPredictiond": "ambiseg_monai.transforms.consensus.UnpackPredictiond",
    "ambiseg_monai.diffusion.continuous.ContinuousDDIMScheduler": (
        "ambiseg_monai.schedulers.continuous.ContinuousDDIMScheduler"
    ),
    "ambiseg_monai.diffusion.continuous.ContinuousDDPMScheduler": (
        "ambiseg_monai.schedulers.continuous.ContinuousDDPMScheduler"
    ),
    "ambiseg_monai.diffusion.continuous.ContinuousVPSchedule": (
        "ambiseg_monai.schedulers.continuous.ContinuousVPSchedule"
    ),
    "ambiseg_monai.diffusion.schedulers.RespacedDDPMScheduler": (
        "ambiseg_monai.schedulers.respaced.RespacedDDPMScheduler"
    ),
    "ambiseg_monai.diffusion.losses.DiffusionLoss": "ambiseg_monai.losses.diffusion.DiffusionLoss",
    "ambiseg_monai.diffusion.losses.HybridDiffusionLoss": "ambiseg_monai.losses.diffusion.HybridDiffusionLoss",
    "ambiseg_monai.engines.latent_models.PHiSegELBOLoss": "ambiseg_monai.losses.elbo.PHiSegELBOLoss",
    "ambiseg_monai.engines.latent_models.ProbUNetELBOLoss": "ambiseg_monai.losses.elbo.ProbUNetELBOLoss",
    "ambiseg_monai.engines.DiffusionSamplingInferer": "ambiseg_monai.inferers.DiffusionSamplingInferer",
    "ambiseg_monai.engines.DiffusionTrainingInferer": "ambiseg_monai.inferers.DiffusionTrainingInferer",
    "ambiseg_monai.engines.consensus.ConsensusSamplingInferer": (
        "ambiseg_monai.inferers.consensus.ConsensusSamplingInferer"
    ),
    "ambiseg_monai.engines.latent_models.LatentSampleInferer": "ambiseg_monai.inferers.latent.LatentSampleInferer",
    "ambiseg_monai.engines.latent_models.LatentTrainingInferer": "ambiseg_monai.inferers.latent.LatentTrainingInferer",
    "ambiseg_monai.engines.continuous_training.WarmupConstantCosine": (
        "ambiseg_monai.optimizers.lr_scheduler.WarmupConstantCosine"
    ),
}

#: old -> new name of a library function called in a ``$`` expression, or of an ``imports`` entry (a
#: function or module moved, like ``TARGET_RENAMES``); applied to the snapshot's expressions and imports.
EXPRESSION_RENAMES: dict[str, str] = {
    # layout by role (issue #16): bundle/ (dataset checks, inference inputs), utils/ (device, precision)
    "ambiseg_monai.engines.prepare_dataset": "ambiseg_monai.bundle.prepare_dataset",
    "ambiseg_monai.engines.padded_rater_count": "ambiseg_monai.bundle.padded_rater_count",
    "ambiseg_monai.engines.inference_items": "ambiseg_monai.bundle.inference_items",
    "ambiseg_monai.engines.network_to_device": "ambiseg_monai.utils.network_to_device",
    "ambiseg_monai.engines.use_amp": "ambiseg_monai.utils.use_amp",
    "ambiseg_monai.engines.cpu_autocast_dtype": "ambiseg_monai.utils.cpu_autocast_dtype",
    "$import ambiseg_monai.data.transforms": "$import ambiseg_monai.transforms",
    "$import ambiseg_monai.engines.consensus": "$import ambiseg_monai.inferers",
    "$import ambiseg_monai.engines.latent_models": "$import ambiseg_monai.inferers",
    "$import ambiseg_monai.engines.continuous_training": "$import ambiseg_monai.optimizers",
}

#: old -> new name of a published metric, in the snapshot's metric lists (the snapshot predates the rename)
METRIC_RENAMES: dict[str, str] = {
    # issue #18: the papers' and the compare table's Dmax is published as ``dmax`` (one name; CHANGELOG)
    "max_dice_matching": "dmax",
}

#: an ``INTENDED_CHANGES`` value: the id is gone on purpose
REMOVED = object()


class Inserted:
    """An ``INTENDED_CHANGES`` value inserted into a list at the id's index (later entries move up one)."""

    def __init__(self, value: object) -> None:
        self.value = value


#: the snapshot's ``train#handlers``: ProvenanceHandler at 7, the deprecated MLflowConfigLogger at 8
_PROVENANCE, _CONFIG_LOGGER = "train#handlers#7", "train#handlers#8"
#: a handler that publishes the extra metrics of post-processed samples under ``<metric>_pp``
_PP_METRICS = {
    "_target_": "ambiseg_monai.handlers.AmbiguousSegmentationMetricsHandler",
    "pred_key": "pred_pp",
    "suffix": "_pp",
}
#: issue #18: validation says which split, how many images and samples per image when it starts
_PHASE_LOGGER = {
    "_target_": "ambiseg_monai.handlers.PhaseLogger",
    "_disabled_": "@is_not_rank0",
    "label": "validation",
    "num_samples": "@num_val_samples",
    "split": "validation",
}


#: issue #18: an evaluation names each phase (N = 4, then N = 16; split, images) and ends with a summary
#: (tables and sample images in eval_dir, the number of images, the MLflow run id and the mlflow ui command);
#: each phase's PhaseLogger also reports its metrics when it ends (metrics: true), in place of the StatsHandler
#: lines "Epoch[1] Metrics" and "Key metric: ... best value ... at epoch: 1" (an evaluator's epoch is always 1)
def _eval_phase(label: object, num_samples: str | None = None) -> dict:
    phase = {"_target_": "ambiseg_monai.handlers.PhaseLogger", "_disabled_": "@is_not_rank0", "label": label}
    return {**phase, **({"num_samples": num_samples} if num_samples else {}), "split": "@eval_split", "metrics": True}


#: issue #18: an evaluation's figures are titled with the phase and split, not the evaluator's epoch (always 1),
#: and named <prefix>.png, not <prefix>_epoch0001.png
_EVALUATION_FIGURE = {"phase": "evaluation", "split": "@eval_split"}


_EVAL_SUMMARY = {
    "_target_": "ambiseg_monai.handlers.RunSummary",
    "_disabled_": "@is_not_rank0",
    "label": "evaluation",
    "output_dir": "@eval_dir",
    "mlflow_handler": "@evaluate#mlflow_handler",
    "tracking_uri": "@resolved_tracking_uri",
    "split": "@eval_split",
}
#: the two phases of the bundles with an N = 4 and an N = 16 evaluator (all but consensus_diffusion)
_EVAL_PHASES = {
    "evaluate#n4#handlers#0": Inserted(_eval_phase("evaluation", "@evaluate#n4#inferer#num_samples")),
    "evaluate#n16#handlers#0": Inserted(_eval_phase("evaluation", "@evaluate#n16#inferer#num_samples")),
    "evaluate#n16#handlers#8": Inserted(_EVAL_SUMMARY),  # last: after the tables and grids are written
    # the sample grids (n4: 8, n16: 7) and the mode-frequency plots (TruthMetricsHandler, 1): see _EVALUATION_FIGURE
    **{
        f"evaluate#{n}#handlers#{index}#{key}": value
        for n, indices in (("n4", (8, 1)), ("n16", (7, 1)))
        for index in indices
        for key, value in _EVALUATION_FIGURE.items()
    },
    # the StatsHandler of each phase is gone (its metrics line is the PhaseLogger's, see _eval_phase); last,
    # as it moves the handlers after it
    "evaluate#n4#handlers#5": REMOVED,
    "evaluate#n16#handlers#4": REMOVED,
}
#: consensus diffusion's soft Dice at the paper's five thresholds, published as ``soft_dice_5``
_SOFT_DICE_5 = {
    "_target_": "ambiseg_monai.handlers.AmbiguousSegmentationMetricsHandler",
    "metrics": ["soft_dice"],
    "thresholds": "$ambiseg_monai.metrics.CONSENSUS_PAPER_THRESHOLDS",
    "suffix": "_5",
}

#: file of a combination (``"train.json"``, or ``"<bundle>/train.json"`` for one bundle) ->
#: {config id: the value it now has on purpose, or ``REMOVED``}
#: issue #15: label-preserving flips and 90-degree rotations after the label strategy, switched by ``augment``
#: (bundles/common ``augmentation``; on where the demo study measured it to stop a model from degrading with
#: training by memorising each training image's own rater draws, docs/benchmarks.md: Prob. U-Net, PHiSeg,
#: SSN, and AmbDiffSeg's own augmentation; CIMD was not measured with it and keeps it off)
_AUGMENT_OFF = "$not @augment"  # the snapshot's form of the bundles' as_flag(@augment, 'augment')
_COMMON_AUGMENTATION = {
    "augment": False,
    "augmentation": {
        "_target_": "Compose",
        "transforms": [
            {
                "_target_": "RandFlipd",
                "_disabled_": _AUGMENT_OFF,
                "keys": ["image", "target", "label"],
                "prob": 0.5,
                "spatial_axis": 0,
                "allow_missing_keys": True,
            },
            {
                "_target_": "RandRotate90d",
                "_disabled_": _AUGMENT_OFF,
                "keys": ["image", "target", "label"],
                "prob": 0.75,
                "max_k": 3,
                "allow_missing_keys": True,
            },
        ],
    },
    "train#preprocessing#transforms#3": Inserted("@augmentation"),
}
#: issue #15: AmbDiffSeg's demo config trains with its geometric augmentation; the intensity transforms, which
#: would change the lobe intensity that sets a demo lobe's probability, have their own switch (off)
_AMBDIFFSEG_AUGMENTATION = {
    "augment": True,
    "augment_intensity": False,
    **{
        f"train#preprocessing#transforms#{index}#_disabled_": "$not @augment_intensity" for index in (7, 8, 9)
    },
}


#: CIMD's noise scheduler (the snapshot's, with the prediction type a setting), which the paper overlays sample with
_CIMD_DDPM = {
    "_target_": "ambiseg_monai.schedulers.respaced.RespacedDDPMScheduler",
    "num_train_timesteps": "@num_train_timesteps",
    "schedule": "linear_beta",
    "beta_start": "@beta_start",
    "beta_end": "@beta_end",
    "variance_type": "learned_range",
    "prediction_type": "@prediction_type",
    "clip_sample": True,
}


INTENDED_CHANGES: dict[str, dict[str, object]] = {
    # The shared multi-GPU overlay keeps the ranks other than 0 from probing the tracking server (which
    # only consensus_diffusion's copy did): they log nothing, so they take the configured URI as is.
    "multi_gpu_train.json": {
        "resolved_tracking_uri": (
            "$@tracking_uri if @is_not_rank0 else ambiseg_monai.reporting.resolve_tracking_uri(@tracking_uri)"
        ),
    },
    # One path for a run's parameters: ProvenanceHandler logs the config's literal hyperparameters itself and
    # the computed values of `provenance_params`, so MLFlowHandler's `experiment_param` list is gone.
    "train.json": {
        "train#mlflow_handler#experiment_param": REMOVED,
        f"{_PROVENANCE}#params": "@provenance_params",
        # ProvenanceHandler logs the config artifacts itself (log_config_file defaults to true) ...
        f"{_PROVENANCE}#log_config_file": REMOVED,
        # ... so the deprecated MLflowConfigLogger that logged them alone is gone
        _CONFIG_LOGGER: REMOVED,
        # one way of logging loss terms: a LossTerms instance shared by StatsHandler and MLFlowHandler
        # (diffusion methods: the trainer output's l_* terms, as loss_terms_from_output did)
        "train#loss_terms": {"_target_": "ambiseg_monai.handlers.LossTerms"},
        "train#handlers#5#output_transform": "@train#loss_terms",
        # the training pipelines run without MetaTensor bookkeeping (their items drop it at the end anyway):
        # the same tensors, a 3x faster loader (docs/benchmarks.md, "Training throughput")
        "train#preprocessing#_target_": "ambiseg_monai.transforms.UntrackedCompose",
        "train#mlflow_handler#output_transform": "@train#loss_terms",
        # Issue #18 (a newcomer's first hour), logging: per-iteration lines only on request
        # (log_every_iteration, default false); one line per epoch with the mean loss terms and a progress
        # bar on a terminal (EpochLossLogger, before validation); a summary at the end (TrainingSummary:
        # checkpoints, samples, best metric, MLflow run id and the mlflow ui command, or "already finished");
        # the MLflow run id is recorded in <output_dir>/mlflow_run.json so that a resumed training continues
        # its run and the validator logs into the trainer's run (continue_run).
        "log_every_iteration": False,
        "mlflow_run_file": "$@output_dir + '/mlflow_run.json'",
        "train#handlers#5#iteration_log": "@log_every_iteration",
        "train#handlers#3": Inserted(
            {
                "_target_": "ambiseg_monai.handlers.EpochLossLogger",
                "_disabled_": "@is_not_rank0",
                "output_transform": "@train#loss_terms",
            }
        ),
        "train#handlers#9": Inserted(
            {
                "_target_": "ambiseg_monai.handlers.TrainingSummary",
                "_disabled_": "@is_not_rank0",
                "output_dir": "@output_dir",
                "ckpt_dir": "@ckpt_dir",
                "mlflow_handler": "@train#mlflow_handler",
                "tracking_uri": "@resolved_tracking_uri",
                "validator": "@validate#evaluator",
            }
        ),
        "train#mlflow_handler#run_id_file": "@mlflow_run_file",
        "train#mlflow_handler#continue_run": (
            "$@resume and ambiseg_monai.handlers.latest_checkpoint(@ckpt_dir) is not None"
        ),
        "validate#mlflow_handler#run_id_file": "@mlflow_run_file",
        "validate#mlflow_handler#continue_run": True,
        # Issue #18, MLflow as its users expect: the end of a training logs the trained model as an MLflow model
        # (MLflowModelLogger, before MLFlowHandler ends the run; switch log_mlflow_model, default true)
        "log_mlflow_model": True,
        "train#handlers#7": Inserted(
            {
                "_target_": "ambiseg_monai.handlers.MLflowModelLogger",
                "_disabled_": "@is_not_rank0",
                "enabled": "@log_mlflow_model",
                "mlflow_handler": "@train#mlflow_handler",
                "checkpoint": "$@ckpt_dir + '/model.pt'",
                "inference_config": "$@bundle_root + '/configs/inference.json'",
                "validator": "@validate#evaluator",
            }
        ),
    },
    "evaluate.json": {
        "evaluate#mlflow_handler#experiment_param": REMOVED,
        "evaluate#provenance_handler#params": "@eval_provenance_params",
    },
    # issue #18: an inference names its phase (samples per image, images) and ends with the folder and the
    # number of images written (RunSummary)
    "inference.json": {
        "infer#handlers#0": Inserted(
            {
                "_target_": "ambiseg_monai.handlers.PhaseLogger",
                "label": "inference",
                "num_samples": "$getattr(@infer#inferer, 'num_samples', None)",
            }
        ),
        "infer#handlers#3": Inserted(
            {"_target_": "ambiseg_monai.handlers.RunSummary", "label": "inference", "output_dir": "@inference_dir"}
        ),
    },
    # provenance_params: the computed values of the former experiment_param (its literals are logged anyway)
    "cimd/train.json": {
        **_COMMON_AUGMENTATION,
        "provenance_params": {"method": "cimd", "num_raters": "@num_raters"},
        # issue #15: ε-prediction weights the x_0 error by SNR, almost nothing in the band t = 400-700 where
        # the lobes are decided; the denoiser under-used the evidence there and sharpened the frequencies
        # (docs/benchmarks.md). v-prediction weights it by SNR + 1. The paper overlays keep the paper's ε.
        "prediction_type": "v_prediction",
        "noise_scheduler#prediction_type": "@prediction_type",
        # issue #15: the demo samples with DDIM (50 steps for inference): on the main job's model lobe error
        # 0.074 against DDPM's 0.083 over 3 seeds (docs/benchmarks.md); the paper overlays keep ancestral DDPM
        "sampling_scheduler": {
            **{key: value for key, value in _CIMD_DDPM.items() if key != "variance_type"},  # DDIM has no variance
            "_target_": "ambiseg_monai.schedulers.respaced.RespacedDDIMScheduler",
        },
        "validate#handlers#0": Inserted(_PHASE_LOGGER),
        # issue #15: by 6,000 iterations a CIMD without flips and rotations reproduced each training image's
        # own 4 rater draws (docs/benchmarks.md); at the main job's 1,280 iterations they cost nothing
        "augment": True,
    },
    # the paper overlays train with the paper's ε-prediction and without augmentation (see cimd/train.json)
    **{f"cimd/{overlay}.json": {"prediction_type": "epsilon", "augment": False, "sampling_scheduler": _CIMD_DDPM}
       for overlay in ("lidc", "ms", "bone_us")},
    "ambdiffseg/train.json": {
        **_AMBDIFFSEG_AUGMENTATION,
        # the schedule spans the run's iterations: an iterations_per_epoch epoch counts as one (it counted a pass
        # over the data), so the setting (null: one pass) is now read here too
        "iterations_per_epoch": None,
        "total_steps": "$@max_epochs * (@iterations_per_epoch or len(@train#dataloader))",
        "validate#handlers#0": Inserted(_PHASE_LOGGER),
        "provenance_params": {
            "method": "ambdiffseg",
            "num_raters": "@num_raters",
            "sampler": "$@sampling_scheduler.__class__.__name__",
            "lr_warmup_steps": "@lr_warmup_steps",
            "lr_decay_steps": "@lr_decay_steps",
            "total_steps": "@total_steps",
        },
        # the one training inferer with the alias's default written out: the same stratified time draws
        "train#inferer#stratified_times": True,
        # HybridDiffusionLoss with vlb_weight 0 (no l_vlb term: no learned variance) is l_simple alone
        "train#loss": {"_target_": "ambiseg_monai.losses.diffusion.DiffusionLoss"},
        # one metrics handler publishes ged_pp, ci_pp, cross_pair_dice_pp (were three single-metric aliases)
        "validate#additional_metrics": {
            "ged_pp": {**_PP_METRICS, "metrics": ["ged", "ci", "cross_pair_dice"], "save_details": False}
        },
    },
    "consensus_diffusion/train.json": {
        "provenance_params": {
            "method": "consensus_diffusion",
            "num_raters": "@num_raters",
            "num_levels": "@num_levels",
        },
        # the metrics handler reads the output's pred_soft itself (was the SoftDice alias)
        "validate#additional_metrics": {"soft_dice_5": {**_SOFT_DICE_5, "save_details": False}},
        # issue #15: the same ε band problem as CIMD's (lobe error 0.106 -> 0.077 at 4,000 iterations with v);
        # the QUBIQ overlays keep the paper's ε
        "prediction_type": "v_prediction",
        "noise_scheduler#prediction_type": "@prediction_type",
        "sampling_scheduler#prediction_type": "@prediction_type",
    },
    **{f"consensus_diffusion/qubiq_{name}.json": {"prediction_type": "epsilon"}
       for name in ("brain_growth", "brain_tumor", "kidney", "prostate1", "prostate2")},
    "prob_unet/train.json": {
        **_COMMON_AUGMENTATION,
        "augment": True,
        "validate#handlers#0": Inserted(_PHASE_LOGGER),
        "provenance_params": {
            "method": "prob_unet",
            "latent_distribution": "@network_def#latent_distribution#_target_",
            "num_raters": "@num_raters",
        },
        # LossTerms reads the loss's last_terms (was a lambda doing the same)
        "train#loss_terms": {"_target_": "ambiseg_monai.handlers.LossTerms", "loss_function": "@train#loss"},
    },
    "phiseg/train.json": {
        **_COMMON_AUGMENTATION,
        "augment": True,
        "validate#handlers#0": Inserted(_PHASE_LOGGER),
        "provenance_params": {"method": "phiseg", "num_raters": "@num_raters"},
        "train#loss_terms": {"_target_": "ambiseg_monai.handlers.LossTerms", "loss_function": "@train#loss"},
    },
    # eval_provenance_params: the former eval_experiment_param without dataset_dir and seed (literals, logged anyway)
    "cimd/evaluate.json": {
        **_EVAL_PHASES,
        "eval_provenance_params": {
            "mode": "evaluate",
            "ckpt_path": "@ckpt_path",
            "split": "@eval_split",
            "inference_steps": "@eval_inference_steps",
        },
    },
    "ambdiffseg/evaluate.json": {
        **_EVAL_PHASES,
        "eval_provenance_params": {
            "mode": "evaluate",
            "ckpt_path": "@ckpt_path",
            "split": "@eval_split",
            "sampler": "$@sampling_scheduler.__class__.__name__",
            "inference_steps": "@eval_inference_steps",
            "relative_area_r": "@relative_area_r",
        },
        # one metrics handler publishes ged_pp, ci_pp, dmax_pp, cross_pair_dice_pp (were four aliases)
        "evaluate#n4#evaluator#additional_metrics": {
            "ged_pp": {**_PP_METRICS, "metrics": ["ged", "ci", "dmax", "cross_pair_dice"]}
        },
        "evaluate#n16#evaluator#additional_metrics": {
            "ged_pp": {**_PP_METRICS, "metrics": ["ged", "ci", "dmax", "cross_pair_dice"]}
        },
    },
    "consensus_diffusion/evaluate.json": {
        "eval_provenance_params": {
            "mode": "evaluate",
            "variant": "@variant",
            "ckpt_path": "@ckpt_path",
            "split": "@eval_split",
            "generations": "@eval_generations",
            "inference_steps": "@eval_inference_steps",
            "majority_vote": "@majority_vote",
            "sample_values": "@sample_values",
        },
        "evaluate#additional_metrics": {"soft_dice_5": _SOFT_DICE_5},
        # issue #18: the one evaluation phase named, the summary at the end (see _EVAL_PHASES)
        "evaluate#handlers#0": Inserted(
            _eval_phase("$'evaluation, ' + str(@eval_generations) + ' generations of every consensus level'")
        ),
        "evaluate#handlers#10": Inserted(_EVAL_SUMMARY),
        # the per-level grid (8) and the mode-frequency plot (1) of the evaluation: see _EVALUATION_FIGURE
        **{f"evaluate#handlers#{index}#{key}": value for index in (8, 1) for key, value in _EVALUATION_FIGURE.items()},
        # the StatsHandler is gone (see _eval_phase; last, as it moves the handlers after it)
        "evaluate#handlers#5": REMOVED,
    },
    # the paper's LIDC setting: the official code trains with its augmentation switched off
    # lidc.json keeps its own epoch and schedule length (unchanged) over the train.json changes above
    "ambdiffseg/lidc.json": {
        "augment": False,
        "iterations_per_epoch": 1000,
        "total_steps": "$@max_epochs * @iterations_per_epoch",
    },
    "prob_unet/evaluate.json": {
        **_EVAL_PHASES,
        "eval_provenance_params": {"mode": "evaluate", "ckpt_path": "@ckpt_path", "split": "@eval_split"},
    },
    "phiseg/evaluate.json": {
        **_EVAL_PHASES,
        "eval_provenance_params": {"mode": "evaluate", "ckpt_path": "@ckpt_path", "split": "@eval_split"},
    },
}

#: the total number of lines of the bundles' JSON configs may not grow past this (5,390 before the base);
#: 3,600 for the five bundles of the rewrite, plus 263 for bundles/ssn (issue #20), added whole
JSON_LINE_BUDGET = 3600 + 263

SNAPSHOT = load_snapshot()
CASES = [(bundle, key) for bundle, combos in sorted(SNAPSHOT["bundles"].items()) for key in sorted(combos)]


def _files(bundle: str, key: str) -> list[str]:
    return [str(BUNDLES / bundle / "configs" / f"{name}.json") for name in key.split("+")]


def _expected(bundle: str, key: str) -> dict:
    """The snapshot's merged config of a combination, with the ``INTENDED_CHANGES`` of its files applied
    (``a#b#0`` ids set nested values, as in a config overlay; ``REMOVED`` deletes them)."""
    config = _renamed_metrics(json.loads(json.dumps(SNAPSHOT["bundles"][bundle][key])))
    for name in key.split("+"):
        for scope in (f"{name}.json", f"{bundle}/{name}.json"):
            for config_id, value in INTENDED_CHANGES.get(scope, {}).items():
                *parents, last = config_id.split("#")
                target = config
                for part in parents:
                    target = target[int(part)] if isinstance(target, list) else target[part]
                index = int(last) if isinstance(target, list) else last
                if value is REMOVED:
                    del target[index]
                elif isinstance(value, Inserted):
                    target.insert(index, json.loads(json.dumps(value.value)))
                else:
                    target[index] = json.loads(json.dumps(value))
    return _renamed_expressions(config)


_AS_FLAG = re.compile(r"ambiseg_monai\.bundle\.as_flag\(@(\w+), '(\w+)'\)")


def _switches_read_directly(config: dict) -> dict:
    """``config`` with ``ambiseg_monai.bundle.as_flag(@key, 'key')`` replaced by ``@key`` wherever ``key`` is a
    top-level setting whose value is a bool (``as_flag`` returns that bool): the same components are built."""

    def direct(match: re.Match) -> str:
        key, name = match.groups()
        return f"@{key}" if key == name and isinstance(config.get(key), bool) else match.group(0)

    def visit(value):
        if isinstance(value, dict):
            return {k: visit(v) for k, v in value.items()}
        if isinstance(value, list):
            return [visit(v) for v in value]
        if isinstance(value, str) and value.startswith("$"):
            text = _AS_FLAG.sub(direct, value)
            return text[1:] if _AS_FLAG.fullmatch(value[1:]) and text != value else text
        return value

    return visit(config)


def _renamed_metrics(value):
    """``value`` with every string that is exactly a ``METRIC_RENAMES`` old name replaced by the new name."""
    if isinstance(value, dict):
        return {k: _renamed_metrics(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_renamed_metrics(v) for v in value]
    return METRIC_RENAMES.get(value, value) if isinstance(value, str) else value


def _renamed_expressions(value):
    """``value`` with the ``EXPRESSION_RENAMES`` applied to every ``$`` expression (imports included)."""
    if isinstance(value, dict):
        return {k: _renamed_expressions(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_renamed_expressions(v) for v in value]
    if isinstance(value, str) and value.startswith("$"):
        for old, new in EXPRESSION_RENAMES.items():
            value = re.sub(re.escape(old) + r"(?![\w.])", new, value)
    return value


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
    new = _switches_read_directly(merged_config(_files(bundle, key), root=REPO))
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
        merged_config(
            [str(BUNDLES / "cimd" / "configs" / n) for n in ("train.json", "lidc.json", "evaluate.json")], root=REPO
        )
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
