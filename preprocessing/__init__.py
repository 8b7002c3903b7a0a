"""Raw dataset -> the standard 2D multi-rater format (see ``docs/datasets.md``).

One module per source, each an ``ambiseg prepare <dataset>`` subcommand (``configure_parser``,
``main``) around a ``prepare_*`` function:

* :mod:`preprocessing.lidc` - LIDC-IDRI from TCIA (DICOM + XML), built on
  :mod:`~preprocessing.dicom_series`, :mod:`~preprocessing.lidc_xml`,
  :mod:`~preprocessing.nodule_grouping` and :mod:`~preprocessing.contours`;
* :mod:`preprocessing.lidc_pickle` - the community LIDC pickle (AmbDiffSeg split in ``data/``);
* :mod:`preprocessing.ms_isbi2015` - longitudinal MS lesions, ISBI 2015;
* :mod:`preprocessing.qubiq` - the 2D QUBIQ tasks;
* :mod:`preprocessing.folder` - any folder of images and rater masks described by a CSV.

:mod:`preprocessing.common` holds what they share: options, parallel workers (which die with the
import), the skip-or-fail policy, the summary, and the two checks every importer applies to what it
reads (:func:`~preprocessing.common.check_binary_mask`, :func:`~preprocessing.common.check_finite`).
Nothing here imports training code.
"""
