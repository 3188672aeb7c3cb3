"""Runtimes: loading and running models (PyTorch, onnxruntime, onnxruntime-genai) and what is
measured with them (perplexity). Heavy libraries are imported inside the functions."""
