"""The fine-tuning chain on SmolLM2-135M: tone accuracy before and after, ONNX vs PEFT, and two
adapters switched per request on one ONNX base.

    python bench/finetune.py [--artifacts artifacts] [--switch 60]

Builds bench/finetune.toml with doit (steps shared with the default recipe are reused), then
prints from the manifests:
  1. per fine-tune: device, steps/s, loss, held-out tone accuracy (200 tweets) before training
     and after it, in onnxruntime-genai with the adapter and in PyTorch with PEFT;
  2. the ONNX base + adapter against the PEFT model (max |Δlogit|), beside the base alone
     against the PyTorch model it came from (for the int4 base, the floor set by int4 kernels);
and then runs, in one onnxruntime-genai process, `--switch` held-out tweets alternating between
the two adapters on the AWQ base, each scored on its own labels.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "bench" / "finetune.toml"


def build(artifacts: Path) -> None:
    cmd = [sys.executable, "-m", "doit", "-f", str(ROOT / "dodo.py"), f"recipe={RECIPE}",
           f"artifacts={artifacts}"]  # fmt: skip
    if subprocess.run(cmd, cwd=ROOT).returncode:
        raise SystemExit("the bench recipe did not build")


def metrics(link: Path) -> dict:
    entry = link.resolve()  # the manifest lies beside the entry the link points at
    return json.loads(entry.with_name(f"{entry.name}.json").read_text())["metrics"]


def pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def training_table(links: Path) -> None:
    print(
        "| fine-tune | base | device | steps | steps/s | loss first -> last | held-out loss |"
        " answers before | after, genai + adapter | after, PyTorch + PEFT | majority answer |"
    )
    print("|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|")
    for name, base in (("awq-tone", "quantize.awq (int4)"), ("float-tone", "model (fp32)"),
                       ("awq-words", "quantize.awq (int4)")):  # fmt: skip
        tune = metrics(links / "finetune" / name)
        after = metrics(links / "evaluate" / name)
        before = links / "evaluate" / f"{name}-before"
        peft = links / "evaluate" / f"{name}-peft"
        losses = tune["train_loss"]
        print(
            f"| {name} | {base} | {tune['device']} | {len(losses)} | {tune['steps_per_s']:.2f} | "
            f"{losses[0][1]:.3f} -> {losses[-1][1]:.3f} | {tune['heldout_loss'][-1][1]:.3f} | "
            f"{pct(metrics(before).get('answer_accuracy') if before.exists() else None)} | "
            f"{pct(after.get('answer_accuracy'))} | "
            f"{pct(metrics(peft).get('answer_accuracy') if peft.exists() else None)} | "
            f"{pct(after.get('answer_majority_share'))} |"
        )


def parity_table(links: Path) -> None:
    print(
        "\n| adapter | ONNX base + adapter vs PEFT: max abs Δlogit | top-1 agreement |"
        " base alone vs PyTorch: max abs Δlogit |"
    )
    print("|---|---:|---:|---:|")
    for name in ("awq-tone", "awq-words", "float-tone"):
        m = metrics(links / "adapter" / name)
        print(f"| {name} | {m['vs_peft']['max_abs_logit_diff']:.3g} | "
              f"{m['vs_peft']['top1_agreement']:.2f} | "
              f"{m['base_vs_torch']['max_abs_logit_diff']:.3g} |")  # fmt: skip


def switching(links: Path, count: int) -> None:
    """Both AWQ adapters loaded once on one base; requests alternate between them."""
    sys.path.insert(0, str(ROOT))
    import onnxruntime_genai as og
    from transformers import AutoTokenizer

    from tasks.tune.examples import Format, make_example, prompt_ids, read_answer, read_records

    base = (links / "adapter" / "awq-tone").resolve()
    base_dir = json.loads((base / "adapter.json").read_text())["base_key"]
    base_dir = base.parent.parent / base_dir[:2] / base_dir
    model = og.Model(str(base_dir))
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    adapters = og.Adapters(model)
    tasks = {}
    for name, data in (("awq-tone", "tone"), ("awq-words", "tone-words")):
        folder = (links / "adapter" / name).resolve()
        adapters.load(str(folder / "adapter.onnx_adapter"), name)
        fmt = Format(**json.loads((folder / "finetune.json").read_text())["format"])
        records = read_records((links / "data" / data).resolve(), "heldout")
        tasks[name] = (fmt, records, sorted({r["tone"] for r in records}))
    scores = {name: [0, 0, 0] for name in tasks}  # correct, in own labels, asked
    for i in range(count):
        for name in tasks if i % 2 == 0 else reversed(tasks):  # alternate the order too
            fmt, records, labels = tasks[name]
            record = records[i]
            ids = prompt_ids(tokenizer, make_example(fmt, record, tokenizer).prompt)
            params = og.GeneratorParams(model)
            params.set_search_options(max_length=len(ids) + 6, do_sample=False)
            generator = og.Generator(model, params)
            generator.set_active_adapter(adapters, name)
            generator.append_tokens(ids)
            while not generator.is_done():
                generator.generate_next_token()
            text = tokenizer.decode(list(generator.get_sequence(0)[len(ids):]),
                                    skip_special_tokens=True)  # fmt: skip
            answer = read_answer(text, labels)
            scores[name][0] += answer == record["tone"]
            scores[name][1] += answer is not None
            scores[name][2] += 1
    print(f"\nTwo adapters on one ONNX base ({base_dir.name[:12]}...), one onnxruntime-genai "
          f"process, {count} tweets each, requests alternating:")  # fmt: skip
    print("| adapter | labels | accuracy | answers in its own labels |")
    print("|---|---|---:|---:|")
    for name, (correct, own, asked) in scores.items():
        print(f"| {name} | {', '.join(tasks[name][2])} | {pct(correct / asked)} | "
              f"{pct(own / asked)} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--artifacts", type=Path, default=ROOT / "artifacts")
    parser.add_argument("--switch", type=int, default=60, help="tweets per adapter, alternating")
    args = parser.parse_args()
    build(args.artifacts)
    links = args.artifacts / RECIPE.stem
    training_table(links)
    parity_table(links)
    switching(links, args.switch)


if __name__ == "__main__":
    main()
