"""NVIDIA ModelOpt's stage: what it refuses up front, and the pieces it runs around ModelOpt.
The quantization itself runs in the modelopt environment: the full suite builds it (the default
recipe's nvmo-rtn, and awq_clip and int8 on the tiny model)."""

from __future__ import annotations

import shutil

import pytest

from tasks.config import ConfigValueError, as_params, parse_config
from tasks.errors import PreflightError, RecipeError, StageError
from tasks.formats.genai import external_data_files, model_file
from tasks.stages import StepContext
from tasks.stages.quantize import nvmo
from tasks.stages.quantize.nvmo import Config
from tasks.stages.quantize.onnx_common import work_copy


@pytest.mark.parametrize(
    ("settings", "field", "says"),
    [
        ({"method": "awq_lite", "data": "d"}, "method", 'set device = "cuda"'),
        ({"method": "awq_full", "data": "d"}, "method", "awq_clip, rtn_dq"),
        ({"method": "rtn"}, "method", "does not load in onnxruntime's CPU provider"),
        ({"mode": "int8", "method": "awq_clip", "data": "d"}, "method", "entropy, max"),
        ({"method": "rtn_dq", "data": "d"}, "data", "rtn_dq uses no calibration data"),
        ({"method": "awq_clip"}, "data", "awq_clip calibrates on data"),
        ({"mode": "int8", "method": "max"}, "data", "max calibrates on data"),
    ],
)
def test_settings_it_cannot_run_are_refused_with_the_fix(settings, field, says):
    with pytest.raises(ConfigValueError) as err:
        Config(**settings)
    assert err.value.key == field and says in f"{err.value.problem} {err.value.fix}"


@pytest.mark.parametrize(
    ("settings", "says"),
    [
        ({"method": "rtn_dq", "block_size": 48}, "fix: use one of 16, 32, 64, 128, 256 that"),
        ({"method": "awq_clip", "data": "d", "num_samples": 0}, "fix: use 1 or more"),
    ],
)
def test_values_out_of_bounds_are_refused_by_the_parser(settings, says):
    with pytest.raises(RecipeError) as err:
        parse_config(Config, settings, "recipe.toml", "quantize.nvmo")
    assert says in str(err.value)


def test_gpu_calibration_has_its_own_environment_and_leaves_cpu_keys_alone():
    spec = nvmo.SPEC
    lite = Config(method="awq_lite", data="d", device="cuda")  # accepted with a GPU
    assert spec.environment_of(lite) is nvmo.MODELOPT_CUDA
    assert spec.environment_of(Config(method="rtn_dq")) is nvmo.MODELOPT
    assert nvmo.MODELOPT_CUDA.key != nvmo.MODELOPT.key
    assert "device" not in as_params(Config(method="rtn_dq"))  # added later: cpu keys unchanged
    assert as_params(lite)["device"] == "cuda"


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_refused_before_any_environment_is_built(fp32, tmp_path):
    ctx = StepContext(task="quantize:x", out=tmp_path / "out", artifacts=tmp_path, input=fp32)
    with pytest.raises(PreflightError, match='set device = "cpu"'):
        nvmo.run(Config(method="awq_lite", data="d", device="cuda"), ctx)
    assert not (tmp_path / "envs").exists()


@pytest.mark.gpu
def test_awq_lite_calibrates_on_cuda(fp32, prose_file, tmp_path):
    """Builds the modelopt-cuda environment (needs a package index) and runs awq_lite there."""
    if shutil.which("nvidia-smi") is None:
        pytest.skip("no NVIDIA GPU")
    if not _index_reachable("nvidia-modelopt"):
        pytest.skip("no package index to build the modelopt-cuda environment from")
    import time

    from tasks.stages.data import Config as DataConfig
    from tasks.stages.data import run as run_data

    data = tmp_path / "data"
    data.mkdir()
    run_data(DataConfig(path=str(prose_file), format="text", heldout_fraction=0.25),
             StepContext(task="data:prose", out=data, artifacts=tmp_path))  # fmt: skip
    out = tmp_path / "out"
    out.mkdir()
    ctx = StepContext(task="quantize:lite", out=out, artifacts=tmp_path, input=fp32,
                      data={"prose": data})  # fmt: skip
    started = time.time()
    metrics = nvmo.run(
        Config(method="awq_lite", data="prose", device="cuda", block_size=32, num_samples=4,
               seq_len=64), ctx,
    )  # fmt: skip
    print(f"awq_lite on cuda: {time.time() - started:.1f} s (environment build included)")
    assert metrics["quantized_nodes"] > 0 and metrics["top1_agreement"] > 0.5


def _index_reachable(package: str) -> bool:
    import subprocess
    import sys

    probe = [sys.executable, "-m", "pip", "index", "versions", package, "--timeout", "10"]
    try:
        return subprocess.run(probe, capture_output=True, timeout=60).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def test_each_mode_has_its_own_default_method_in_the_key():
    assert Config(data="d").method == "awq_clip"
    assert Config(mode="int8", data="d").method == "entropy"
    assert as_params(Config(mode="int8", data="d")) == as_params(
        Config(mode="int8", method="entropy", data="d")
    )


def test_excluded_nodes_are_a_set():
    a = Config(method="rtn_dq", nodes_to_exclude=("b", "a", "b"))
    assert (
        a.nodes_to_exclude
        == ("a", "b")
        == Config(method="rtn_dq", nodes_to_exclude=("a", "b")).nodes_to_exclude
    )


def test_a_block_size_that_does_not_divide_a_layer_names_it_and_what_would(fp32):
    src = model_file(fp32)
    nvmo.check_blocks_divide(src, 32, set())  # the tiny model's sizes are multiples of 32
    with pytest.raises(StageError) as err:
        nvmo.check_blocks_divide(src, 256, set())
    message = str(err.value)
    assert "block_size 256 does not divide the input size" in message
    assert "MatMul" in message and "fix: set block_size to one of [16, 32" in message


def test_builder_graphs_pass_onnx_checker_once_their_norm_op_is_registered(tmp_path):
    """ModelOpt checks its input with onnx.checker, which does not know onnxruntime's
    SimplifiedLayerNormalization (in the ONNX domain in the builder's graphs)."""
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("SimplifiedLayerNormalization", ["x", "w"], ["y"], axis=-1,
                            epsilon=1e-5, stash_type=1)  # fmt: skip
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]),
         helper.make_tensor_value_info("w", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    if not onnx.defs.has("SimplifiedLayerNormalization"):
        with pytest.raises(onnx.checker.ValidationError, match="SimplifiedLayerNormalization"):
            onnx.checker.check_model(model)
    nvmo.register_builder_ops()
    nvmo.register_builder_ops()  # twice is harmless
    onnx.checker.check_model(model)


def test_tools_get_a_private_copy_of_the_model_and_it_is_removed_after(fp32, tmp_path):
    ctx = StepContext(task="quantize:x", out=tmp_path / "out", artifacts=tmp_path, input=fp32)
    ctx.out.mkdir()
    src = model_file(fp32)
    before = {p.name: p.stat().st_mtime_ns for p in fp32.iterdir()}
    with work_copy(ctx) as copy:
        assert copy.parent != fp32 and copy.read_bytes() == src.read_bytes()
        for name in external_data_files(copy):  # the weights travel with the graph
            assert (copy.parent / name).stat().st_size == (fp32 / name).stat().st_size
        copy.write_bytes(b"rewritten by a tool")  # what ModelOpt does to the model it reads
        (copy.parent / "model.onnx_augment.onnx").write_bytes(b"")  # and INC beside it
    assert not copy.parent.exists() and list(ctx.out.iterdir()) == []
    assert {p.name: p.stat().st_mtime_ns for p in fp32.iterdir()} == before


def test_copies_of_one_initializer_are_merged_and_the_model_computes_the_same():
    """ModelOpt's export copies shared initializers per use (+170 MB on SmolLM2)."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(w.copy(), "w_1"),
             numpy_helper.from_array(w + 1, "other")]  # fmt: skip
    nodes = [helper.make_node("Add", ["x", "w"], ["a"]), helper.make_node("Add", ["a", "w_1"], ["b"]),
             helper.make_node("Add", ["b", "other"], ["y"])]  # fmt: skip
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])

    def run(m):
        session = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(None, {"x": np.ones((2, 3), np.float32)})[0]

    before = run(model)
    assert nvmo.merge_duplicate_initializers(model) == 1
    assert [t.name for t in model.graph.initializer] == ["w", "other"]
    assert np.array_equal(run(model), before)
