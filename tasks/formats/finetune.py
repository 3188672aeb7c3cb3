"""What the finetune and adapter stages write beside their output: the keys of the entries they
were made from, which a later step finds through its context (`StepContext.entry`)."""

from __future__ import annotations

FINETUNE_INFO = "finetune.json"  # in a finetune step's output: its base's key and example format
ADAPTER_INFO = "adapter.json"  # in an adapter step's output: its ONNX base's key and the file
