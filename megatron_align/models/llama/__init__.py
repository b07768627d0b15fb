"""Llama-family models use Megatron-Core's stock layers; see megatron_align.models.build."""
