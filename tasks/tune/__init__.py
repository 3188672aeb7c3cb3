"""Fine-tuning: training examples, the LoRA loop, and LoRA in ONNX graphs."""
