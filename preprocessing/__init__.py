"""Raw dataset -> the standard 2D multi-rater format (see ``docs/datasets.md``).

This is the repository's top-level ``preprocessing/`` folder, installed as the package
``ambiseg_monai.preprocessing`` (``package_dir`` in ``setup.py``): nothing named ``preprocessing``
lands in site-packages. Its modules import each other relatively, so they do not depend on that name.

One module per source, each an ``ambiseg prepare <dataset>`` subcommand (``configure_parser``,
``main``) around a ``prepare_*`` function:

* :mod:`~ambiseg_monai.preprocessing.lidc` - LIDC-IDRI from TCIA (DICOM + XML), built on
  :mod:`~ambiseg_monai.preprocessing.dicom_series`, :mod:`~ambiseg_monai.preprocessing.lidc_xml`,
  :mod:`~ambiseg_monai.preprocessing.nodule_grouping` and :mod:`~ambiseg_monai.preprocessing.contours`;
* :mod:`~ambiseg_monai.preprocessing.lidc_pickle` - the community LIDC pickle (AmbDiffSeg split in ``data/``);
* :mod:`~ambiseg_monai.preprocessing.ms_isbi2015` - longitudinal MS lesions, ISBI 2015;
* :mod:`~ambiseg_monai.preprocessing.qubiq` - the 2D QUBIQ tasks;
* :mod:`~ambiseg_monai.preprocessing.folder` - any folder of images and rater masks described by a CSV.

:mod:`~ambiseg_monai.preprocessing.common` holds what they share: options, parallel workers (which die
with the import), the skip-or-fail policy, the summary, and the two checks every importer applies to
what it reads (:func:`~ambiseg_monai.preprocessing.common.check_binary_mask`,
:func:`~ambiseg_monai.preprocessing.common.check_finite`). Nothing here imports training code.
"""
