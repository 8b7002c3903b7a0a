"""Taking a trained bundle to the clinic: TorchScript export and the MONAI Deploy application.

- :mod:`~ambiseg_monai.deploy.export`: ``ambiseg export``, the traced model with configs and metadata;
- :mod:`~ambiseg_monai.deploy.exported`: reading it back, adapters the samplers run on;
- :mod:`~ambiseg_monai.deploy.predictor`: a bundle's N-sample inferer on the slices of a volume;
- :mod:`~ambiseg_monai.deploy.app` / :mod:`~ambiseg_monai.deploy.operators`: the MONAI Deploy
  application (needs the ``deploy`` extra); run with ``python -m ambiseg_monai.deploy``.

Submodules are imported on demand: the export does not need the MONAI Deploy SDK.
"""
