"""modelkiln: a Makefile-style build graph for model artifacts on doit.

Importing this package stays light (no torch, transformers or onnxruntime): `doit list`
loads it for every command. Heavy libraries are imported inside the stage `run` functions.
"""

__version__ = "0.1.0"
