"""Small library functions the bundle configs call (so that configs stay pure wiring)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ambiseg_monai.data.datalist import DATALIST_FILENAME, load_datalist, load_split, max_num_raters, validate_datalist
from ambiseg_monai.data.nifti import is_nifti_path

__all__ = [
    "prepare_dataset",
    "padded_rater_count",
    "network_to_device",
    "use_amp",
    "cpu_has_native_bf16",
    "cpu_autocast_dtype",
    "inference_items",
]


def prepare_dataset(
    dataset_dir: str | os.PathLike,
    image_channels: int,
    demo_dir: str | os.PathLike | None = "data/demo",
    required_splits: tuple[str, ...] = ("training",),
    check_files: bool = True,
    same_size: bool = True,
) -> str:
    """Check a dataset against the bundle's settings and return its path (the training-start check).

    When ``dataset_dir`` is the default demo location (``demo_dir``) and holds no dataset yet, the
    demo dataset is generated there first. Any other missing folder is an error (never filled with
    demo data behind the user's back).

    With ``check_files`` every file of every split is checked once: it exists, image and label
    sizes and channel / rater counts agree, labels hold only 0 and 1, images only finite values;
    with ``same_size`` all images of a split must also share one H x W (set it to False when the
    bundle resizes its inputs). Results are remembered per file (path, size, modification time) in
    the dataset's ``.validation_cache.json``, so later starts only re-read files that changed.

    Raises:
        ValueError: the dataset's ``image_channels`` differs from the network's, or the data fail
            the contract (wrong rater count in a label file, missing files, non-binary labels,
            NaN pixels, mixed sizes, ...; the message names the datalist, the case and the file).
    """
    path = Path(dataset_dir)
    if demo_dir is not None and path.resolve() == Path(demo_dir).resolve():
        from ambiseg_monai.data.demo import ensure_demo_dataset

        ensure_demo_dataset(path, warn_if_different=True)
    datalist = load_datalist(path)
    if int(datalist["image_channels"]) != int(image_channels):
        raise ValueError(
            f"{path / 'datalist.json'}: the dataset has image_channels={datalist['image_channels']} but the "
            f"bundle's network is configured for image_channels={image_channels}; set --image_channels "
            f"{datalist['image_channels']} (or use the dataset's overlay config)."
        )
    validate_datalist(
        path,
        datalist,
        required_splits=required_splits,
        check_files=check_files,
        check_contents=True,
        check_sizes=same_size,
        cache=True,
    )
    return str(path)


def padded_rater_count(dataset_dir: str | os.PathLike) -> int:
    """The largest rater count of any item: the size batches pad the rater axis to."""
    return max_num_raters(load_datalist(dataset_dir))


def network_to_device(network: torch.nn.Module, device: str | torch.device) -> torch.nn.Module:
    """Move a network to ``device``; on CUDA also switch it to channels-last memory."""
    device = torch.device(device)
    network = network.to(device)
    if device.type == "cuda":
        # Module.to accepts memory_format (documented), which torch's overloads leave out
        network = network.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return network


def use_amp(device: str | torch.device, requested: bool = True) -> bool:
    """The engines' ``amp`` flag (fp16 autocast + GradScaler): MONAI's engines implement it for CUDA only."""
    return bool(requested) and torch.device(device).type == "cuda"


def cpu_has_native_bf16() -> bool:
    """True on a CPU whose oneDNN kernels run bfloat16 natively (AVX512-BF16 or AMX)."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def cpu_autocast_dtype(device: str | torch.device, requested: bool = True) -> str | None:
    """``"bfloat16"`` on a CPU with native bf16 when mixed precision is requested, else None.

    The bundles pass it to their training and sampling inferers as ``autocast_dtype``: MONAI's
    engines autocast on CUDA only (``amp``), and on such a CPU bf16 network calls train about
    2x faster with no measured loss in sample quality (docs/benchmarks.md). CPUs without native
    bf16 emulate it slower than float32, so they keep float32.
    """
    return "bfloat16" if requested and torch.device(device).type == "cpu" and cpu_has_native_bf16() else None


def inference_items(source: str | os.PathLike, split: str = "test") -> list[dict]:
    """Items ``{"image", "image_path", "case_id"}`` to run inference on.

    Args:
        source: a folder of NIfTI images (``*.nii`` / ``*.nii.gz``; the case id is the file name
            without extension), a prepared dataset folder, or its ``datalist.json``.
        split: the datalist split to use when ``source`` is a dataset.
    """
    path = Path(source)
    if path.is_file() and path.name == DATALIST_FILENAME:
        path = path.parent
    if (path / DATALIST_FILENAME).is_file():
        items = [
            {"image": i["image"], "image_path": i["image"], "case_id": str(i["case_id"])}
            for i in load_split(path, split)
        ]
    elif path.is_dir():
        files = sorted(f for f in path.iterdir() if f.is_file() and is_nifti_path(f))
        items = [{"image": str(f), "image_path": str(f), "case_id": f.name.split(".nii")[0]} for f in files]
    else:
        raise FileNotFoundError(f"inference input '{source}' is neither a folder of NIfTI images nor a dataset.")
    if not items:
        raise ValueError(f"inference input '{source}' holds no NIfTI image (*.nii, *.nii.gz).")
    return items
