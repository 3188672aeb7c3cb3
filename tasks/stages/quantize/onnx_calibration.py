"""Calibration text for the ONNX quantizers that run in their own environment.

The main environment tokenizes the data set's train split into windows (its `tokenizers` is
there); the stage's environment gets the token ids as JSON and turns them into the decoder's
input feeds (an empty key/value cache) with its own onnxruntime.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.config import ConfigValueError, StageConfig, option, refuse_inapplicable, stage_config
from tasks.stages import StepContext


@stage_config
class TextCalibration(StageConfig):
    """The settings of a quantizer that calibrates on windows of a data set's train split."""

    SETTINGS_LAST = True  # in the docs, after the stage's own settings

    data: str = option("", "the [data.<name>] set whose train split calibrates")
    num_samples: int = option(8, "calibration sequences", ge=1)
    seq_len: int = option(256, "tokens per calibration sequence", ge=1)

    def check_calibration(self, calibrates: bool, what: str, fix_without: str) -> None:
        """`what` calibrates or not; refuse a missing or a pointless `data`, and calibration
        settings that `what` would not read."""
        if not calibrates and self.data:
            raise ConfigValueError("data", f"{what} uses no calibration data", fix_without)
        if calibrates and not self.data:
            raise ConfigValueError(
                "data", f"{what} calibrates on data", 'set data = "<a [data.<name>] set>"'
            )
        where = f"a method that calibrates, not {what}"
        refuse_inapplicable(
            self, [(key, lambda _: calibrates, where) for key in ("num_samples", "seq_len")]
        )


def token_windows(config: TextCalibration, ctx: StepContext) -> list[list[int]]:
    """num_samples windows of seq_len tokens, spread evenly over the train split (the windows
    the Hugging Face quantizers calibrate on)."""
    from tokenizers import Tokenizer

    from tasks.formats.text import read_text
    from tasks.stages.quantize.windows import calibration_windows

    assert ctx.input is not None
    text = read_text(ctx.data[config.data], "train")
    tokenizer = Tokenizer.from_file(str(ctx.input / "tokenizer.json"))
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    return calibration_windows(ids, config.num_samples, config.seq_len)


class DecoderFeeds:
    """The calibration reader protocol (get_next, rewind) over decoder feeds, one per window.
    Mixed into each library's own reader base class inside its environment."""

    def __init__(self, model: Path, folder: Path, windows: list[list[int]]) -> None:
        from tasks.runtimes.onnx import decoder_dims, empty_past_feed, ort_session

        session = ort_session(model, ["CPUExecutionProvider"])
        dims = decoder_dims(folder)
        self.feeds = [empty_past_feed(session, w, dims) for w in windows]
        self.position = 0

    def get_next(self) -> dict[str, Any] | None:
        if self.position >= len(self.feeds):
            return None
        self.position += 1
        return self.feeds[self.position - 1]

    def rewind(self) -> None:
        self.position = 0

    def get_first(self) -> dict[str, Any]:  # ModelOpt's int8 path peeks at the first feed
        return self.feeds[0]


def reader(base: type, model: Path, folder: Path, windows: list[list[int]]) -> Any:
    """A calibration reader deriving from the library's `base` class."""
    return type("CalibrationReader", (DecoderFeeds, base), {})(model, folder, windows)
