"""megatron-align: alignment pretraining studies on Megatron-Core."""

__version__ = "0.1.0"
