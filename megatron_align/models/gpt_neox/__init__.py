from megatron_align.models.gpt_neox.layer import ParallelResidualTransformerLayer  # noqa: F401
