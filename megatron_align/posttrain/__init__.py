"""Post-training on Megatron-Core: chat format, SFT and DPO (``malign sft``, ``malign dpo``, ``malign data chat``)."""
