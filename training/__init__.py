"""training/: REA fine-tuning and evaluation entry points (stllm-train, stllm-eval)."""
