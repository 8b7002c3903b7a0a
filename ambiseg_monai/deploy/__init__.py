"""Taking a trained bundle to the clinic: TorchScript export and the MONAI Deploy application.

- :mod:`~ambiseg_monai.deploy.export`: ``ambiseg export``, the traced model with configs and metadata;
- :mod:`~ambiseg_monai.deploy.exported`: reading it back, adapters the samplers run on;
- :mod:`~ambiseg_monai.deploy.predictor`: a bundle's N-sample inferer on the slices of a volume;
- :mod:`~ambiseg_monai.deploy.app` / :mod:`~ambiseg_monai.deploy.operators` /
  :mod:`~ambiseg_monai.deploy.dicom_seg`: the MONAI Deploy application and its DICOM SEG writer; run with
  ``python -m ambiseg_monai.deploy``.

Nothing is re-exported here (the one exception to the library's ``__init__`` style, see
docs/architecture.md): ``python -m ambiseg_monai.deploy`` imports this package before its ``__main__``,
which must raise the stack limit and re-execute itself before MONAI (and with it Holoscan) is imported
(``tests/test_deploy.py::test_launcher_on_pydicom_ct``), and ``app`` / ``operators`` / ``dicom_seg`` need
the optional ``deploy`` extra. Import the modules by their full name.
"""
