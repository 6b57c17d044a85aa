"""Networks and their parameter tools: the DDiT denoiser, the VQ image tokenizer, EMA, the optimiser."""
