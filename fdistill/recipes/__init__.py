"""The recipes fdistill ships (package data, as open_clip ships its model configs): one YAML file
per recipe under ``<kind>/`` (``distill``, ``finetune``, ``linprobe``, ``segprobe``) plus the
demo's and the miniature reproduction's stage files (``demo/``, ``mini/``). In a source checkout
``configs/`` at the repository root points here. Find them by name with
:func:`fdistill.config.recipes.resolve_recipe`; ``fdistill recipes`` lists them."""
