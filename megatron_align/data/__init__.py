"""Training data: Megatron-Core blended datasets for a study's data conditions and phases.

- :mod:`.config`        ``DataConfig`` / ``BlendSource``: the ``data:`` section of a training run.
- :mod:`.gpt_datasets`  ``build_pretraining_datasets``: DataConfig -> Megatron-Core datasets.
- :mod:`.indexed`       token/document counts read from ``.idx`` files, prefix globbing.
- :mod:`.study`         study data schema: sources, roles, conditions, phases, insertion, presets,
                        resolved to a ``PhaseSchedule`` of (start_sample, end_sample, DataConfig).
- :mod:`.megatron_lm`   Megatron-LM ``--data-args-path`` / ``--per-split-data-args-path`` files.
- :mod:`.mixture`       ``malign data mixture``: target vs realized shares from the built indexes.
- :mod:`.prebuild`      ``malign data prebuild`` and the cache manifest a training job checks.

Importing this package does not import torch or megatron; the submodules that need them do.
"""
