"""Weight quantization maths in plain PyTorch: primitives, packing, GPTQ, AWQ, rotations.

Pure functions on tensors; nothing here reads files or knows about the build graph. Every
module imports torch at the top, so import these only inside a stage's run().
"""
