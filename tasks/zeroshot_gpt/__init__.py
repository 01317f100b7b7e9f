"""GPT zero-shot evaluation: LAMBADA and WikiText-103 (Megatron-LM tasks/zeroshot_gpt)."""
