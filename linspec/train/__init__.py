"""Fine-tuning recipes: attention transfer, LoRA and distillation."""
