"""Optional integrations with other frameworks; each module imports its framework lazily, and
none is a dependency of bgnorm.

* :mod:`bgnorm.integrations.mmengine`: register the layers in mmengine's ``MODELS`` registry,
  so OpenMMLab configs build them by name (``norm_cfg=dict(type="BGN", num_groups=32)``).

timm and detectron2 need no registration: see docs/integrations.md for their conventions.
"""
