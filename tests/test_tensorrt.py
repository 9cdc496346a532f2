"""RUNTIME=tensorrt: the plan builder, TensorRTRunner and the container files.

Everywhere: the build and the runner fail with a clear message where TensorRT or a GPU is
missing (never a silent fallback); the plan's profiles and staleness rules; the K/V packing
TensorRT gets (past >= 1 with a masked zero column, prefill run in parts) checked through ONNX
Runtime on the very opset-18 export TensorRT builds from; the compose file and Dockerfile.

Where `tensorrt` imports and a CUDA GPU is visible (the container): real FP32 and FP16 builds of
the default model, logits against the torch runner, greedy generations equal to torch's at FP32,
and a streaming request through a real tritonserver with runtime tensorrt.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmserve.export.tensorrt_build import BuildSettings, profile_shapes
from llmserve.export.tensorrt_env import GpuInfo, TensorRTUnavailableError, plan_mismatch
from tests.runner_contract import BAD_SIZES

REPO_ROOT = Path(__file__).resolve().parents[1]
HAVE_TENSORRT = importlib.util.find_spec("tensorrt") is not None
HAVE_GPU = torch.cuda.is_available()
needs_tensorrt_gpu = pytest.mark.skipif(
    not (HAVE_TENSORRT and HAVE_GPU),
    reason=f"needs the `tensorrt` package ({'present' if HAVE_TENSORRT else 'missing'}) and a CUDA GPU "
           f"({'present' if HAVE_GPU else 'missing'}): run in the container (docker/)")
no_tensorrt = pytest.mark.skipif(HAVE_TENSORRT, reason="tensorrt is importable here: the real build is tested")

PROMPTS = ["Once upon a time", "The little dog ran to the park and", "Tom and Lily", "Hi"]
# Logit tolerances against the torch runner (float32 on the same GPU). FP32 plans differ only by
# kernel choice and summation order; FP16 keeps normalization, reductions and softmax in FP32.
FP32_ATOL = 2e-3
FP16_ATOL = 0.1


# -- no TensorRT / no GPU: clear errors ------------------------------------------------------------

@no_tensorrt
def test_cli_build_fails_clearly_without_tensorrt(default_model_dir, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "llmserve.export", "--runtime", "tensorrt", "--model-dir", str(default_model_dir),
         "--out", str(tmp_path / "compiled")],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert result.returncode == 1, result.stderr
    assert "TensorRT is not installed here" in result.stderr
    assert "docker" in result.stderr and "README" in result.stderr  # says where it does run
    assert not (tmp_path / "compiled").exists()  # nothing exported, no plan of another kind


@no_tensorrt
def test_engine_config_tensorrt_without_tensorrt_fails_clearly(default_model_dir):
    from llmserve.engine.config import EngineConfig
    from llmserve.engine.llm_engine import LLMEngine
    from llmserve.runners import create_runner

    config = EngineConfig(model_dir=str(default_model_dir), runtime="tensorrt", device="cuda")
    with pytest.raises(TensorRTUnavailableError, match="TensorRT is not installed here.*container"):
        create_runner(config)
    with pytest.raises(TensorRTUnavailableError, match="TensorRT is not installed here"):
        LLMEngine(config)


@pytest.mark.parametrize("message, kwargs", list(BAD_SIZES.items()))
def test_runner_checks_its_sizes_before_anything_else(message, kwargs):
    from llmserve.runners.tensorrt_runner import TensorRTRunner

    with pytest.raises(ValueError, match=message):
        TensorRTRunner("unused", compiled_dir="unused", **kwargs)


@pytest.mark.skipif(HAVE_GPU, reason="a CUDA GPU is visible here")
def test_no_gpu_is_a_clear_error():
    from llmserve.export.tensorrt_env import current_gpu

    with pytest.raises(TensorRTUnavailableError, match="no CUDA GPU is visible here"):
        current_gpu()


# -- the plan's shape and staleness rules ----------------------------------------------------------

def test_profiles_cover_decode_and_prefill_with_past_at_least_one():
    settings = BuildSettings(max_batch_size=48, max_model_len=512, max_num_tokens=2048, max_prefill_batch=8)
    profiles = profile_shapes(settings, num_layers=2, num_kv_heads=2, head_dim=48)
    assert list(profiles) == ["decode", "prefill"]  # the runner's profile indices 0 and 1
    for name, shapes in profiles.items():
        assert set(shapes) == {"input_ids", "position_ids", "attention_mask",
                               *(f"past_key_values.{i}.{k}" for i in range(2) for k in ("key", "value"))}
        for lo, opt, hi in zip(*shapes["input_ids"]):
            assert 1 <= lo <= opt <= hi
        past = shapes["past_key_values.0.key"]
        assert [shape[2] for shape in past][0] == 1 and past[2][2] == 512  # past 1..max_model_len
        assert all(shape[1:2] + shape[3:] == [2, 48] for shape in past)
        for ids, mask, kv in zip(shapes["input_ids"], shapes["attention_mask"], past):
            assert mask == [ids[0], kv[2] + ids[1]]  # attention_mask is past + seq wide
    assert profiles["decode"]["input_ids"] == [[1, 1], [32, 1], [48, 1]]
    assert profiles["prefill"]["input_ids"][2] == [8, 512]  # seq capped at max_model_len


@pytest.mark.parametrize("kwargs, message", [
    ({"precision": "bf16"}, "precision must be one of"),
    ({"max_batch_size": 0}, "max_batch_size must be > 0"),
    ({"max_model_len": 1}, "max_model_len must be > 1"),
    ({"max_num_tokens": 0}, "max_num_tokens must be > 0"),
])
def test_build_settings_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BuildSettings(**kwargs)


def test_plan_mismatch_names_what_changed():
    h100 = GpuInfo("NVIDIA H100 80GB HBM3", (9, 0), 80 << 30)
    info = {"format": "tensorrt-plan-1", "gpu": {"name": h100.name, "compute_capability": "9.0"},
            "tensorrt_version": "10.13.3.9", "source": {"onnx_sha256": "abc"}, "precision": "fp16",
            "max_batch_size": 64}
    assert plan_mismatch(info, trt_version="10.13.3.9", gpu=h100, source={"onnx_sha256": "abc"},
                         precision="fp16", max_batch_size=64) is None
    assert plan_mismatch(None, trt_version="10.13.3.9", gpu=h100) == "no plan has been built yet"
    other_gpu = plan_mismatch(info, trt_version="10.13.3.9", gpu=GpuInfo("NVIDIA A100-SXM4-40GB", (8, 0), 40 << 30))
    assert "built for NVIDIA H100 80GB HBM3 (compute capability 9.0)" in other_gpu
    assert "this GPU is NVIDIA A100-SXM4-40GB (compute capability 8.0)" in other_gpu
    assert "TensorRT 10.13.3.9; this is TensorRT 10.16.0.72" in plan_mismatch(info, trt_version="10.16.0.72", gpu=h100)
    assert "ONNX export" in plan_mismatch(info, trt_version="10.13.3.9", gpu=h100, source={"onnx_sha256": "def"})
    assert "precision='fp16', 'fp32' is wanted" in plan_mismatch(info, trt_version="10.13.3.9", gpu=h100,
                                                                 precision="fp32")


# -- the packing TensorRT gets, through ONNX Runtime on TensorRT's opset-18 export ------------------

@pytest.fixture(scope="module")
def tensorrt_onnx(default_model_dir, tmp_path_factory):
    """The ONNX `make engine RUNTIME=tensorrt` builds its plan from (opset 18)."""
    from llmserve.export.onnx_export import export_onnx
    from llmserve.export.tensorrt_build import TENSORRT_ONNX_OPSET

    return export_onnx(default_model_dir, out_dir=tmp_path_factory.mktemp("trt") / "onnx", opset=TENSORRT_ONNX_OPSET,
                       onnxruntime_graphs=False)


def test_tensorrt_export_uses_only_operators_tensorrt_parses(tensorrt_onnx):
    import onnx

    model = onnx.load(str(tensorrt_onnx / "model.onnx"), load_external_data=False)
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [18]
    ops = {node.op_type for node in model.graph.node}
    assert not ops & {"Attention", "RMSNormalization", "GroupQueryAttention"}, ops
    assert {"MatMul", "Softmax"} <= ops


def _run_scenario(runner, reference) -> list[tuple[str, float]]:
    """The engine's call pattern: ragged prefill, live decode steps, a prefill beside the live batch,
    a changed decode batch, a continued prefill (chunked); max |logits - reference| per call."""
    from llmserve.engine.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(runner.model_dir_for_test)
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    held = {0: [], 1: [], 2: [], 3: []}
    diffs = []

    def call(name, slots, new):
        starts = [len(held[s]) for s in slots]
        got = runner.forward(slots, new, starts)
        want = reference.forward(slots, new, starts)
        diffs.append((name, float((got.cpu() - want.cpu()).abs().max())))
        for slot, tokens, row in zip(slots, new, want.argmax(-1).tolist()):
            held[slot] += [*tokens, row]
        return [[t] for t in want.argmax(-1).tolist()]

    nxt = call("prefill 3 ragged rows", [0, 1, 2], prompts[:3])
    for step in range(3):
        nxt = call(f"decode {step}", [0, 1, 2], nxt)
    call("prefill beside the live batch", [3], [prompts[3]])
    for slot in (0, 1, 2):
        held[slot].pop()  # the decode token just sampled is fed next
    nxt = call("decode, batch changed", [0, 1, 2, 3], [[held[s].pop()] for s in (0, 1, 2, 3)])
    call("decode, live", [0, 1, 2, 3], nxt)
    for slot in (0, 1, 2, 3):
        held[slot].pop()
    call("continued prefill (chunked)", [1, 3], [[5, 6, 7, 8, 9, 10, 11], [12, 13]])
    return diffs


def test_tensorrt_packing_gives_torch_logits_through_onnxruntime(tensorrt_onnx, default_model_dir):
    """TensorRTRunner's K/V handling minus TensorRT: past >= 1 (a masked zero column) and prefill in
    parts (2 rows, 3 tokens at most), run by ONNX Runtime on the opset-18 graph."""
    from llmserve.runners.torch_runner import TorchModelRunner
    from llmserve.runners.onnxruntime_runner import OnnxRuntimeRunner

    class TensorRTPacking(OnnxRuntimeRunner):
        min_past = 1
        max_prefill_rows = 2
        max_prefill_tokens = 3

    runner = TensorRTPacking(default_model_dir, num_slots=4, compiled_dir=tensorrt_onnx, num_threads=1)
    runner.model_dir_for_test = default_model_dir
    reference = TorchModelRunner(default_model_dir, num_slots=4)
    for name, diff in _run_scenario(runner, reference):
        assert diff < 1e-4, f"{name}: max |logits diff| {diff}"


# -- the container files ----------------------------------------------------------------------------

def test_compose_runs_the_tensorrt_image_on_one_gpu():
    import yaml

    compose = yaml.safe_load((REPO_ROOT / "docker" / "compose.yaml").read_text())
    service = compose["services"]["triton"]
    assert service["build"] == {"context": "..", "dockerfile": "docker/Dockerfile", "args": {"TRITON_VERSION": "25.10"}}
    assert service["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert service["ports"] == ["9000:9000"]  # the front end; Triton's ports stay inside unless OPEN_TRITON
    assert {"OPEN_TRITON", "LLMSERVE_API_KEY"} <= set(service["environment"])
    assert "compiled:/opt/llmserve/build/compiled" in service["volumes"] and "compiled" in compose["volumes"]
    assert service["environment"]["RUNTIME"] == "tensorrt"
    assert "/v2/health/ready" in " ".join(service["healthcheck"]["test"])


def test_dockerfile_installs_the_pins_and_starts_the_entrypoint():
    dockerfile = (REPO_ROOT / "docker" / "Dockerfile").read_text()
    assert "FROM nvcr.io/nvidia/tritonserver:${TRITON_VERSION}-py3" in dockerfile
    assert "ARG TRITON_VERSION=25.10" in dockerfile
    assert "grep -v '^nvidia-pytriton==' requirements.txt" in dockerfile  # the image has /opt/tritonserver
    assert 'CMD ["/opt/llmserve/docker/entrypoint.sh"]' in dockerfile
    entrypoint = REPO_ROOT / "docker" / "entrypoint.sh"
    assert entrypoint.stat().st_mode & 0o111
    subprocess.run(["bash", "-n", str(entrypoint)], check=True)
    pins = [line for line in (REPO_ROOT / "docker" / "requirements.txt").read_text().splitlines()
            if line and not line.startswith("#")]
    assert pins and all("==" in line for line in pins)


# -- with TensorRT and a GPU: the real thing --------------------------------------------------------

@pytest.fixture(scope="module")
def plans(default_model_dir, tmp_path_factory):
    """FP32 and FP16 plans of the default model: {precision: compiled models' root}."""
    from llmserve.export.tensorrt_build import build_for_model

    built = {}
    for precision in ("fp32", "fp16"):
        root = tmp_path_factory.mktemp(f"compiled-{precision}")
        build_for_model(default_model_dir, root, precision=precision, max_batch_size=8)
        built[precision] = root
    return built


def _plan_dir(root: Path, model_dir: Path) -> Path:
    from llmserve.export.manifest import default_compiled_dir

    return default_compiled_dir("tensorrt", model_dir, root)


@needs_tensorrt_gpu
def test_plans_record_what_they_were_built_from(plans, default_model_dir):
    import tensorrt

    from llmserve.export.manifest import read_manifest
    from llmserve.export.tensorrt_build import build_for_model

    for precision, root in plans.items():
        info = read_manifest(_plan_dir(root, default_model_dir))
        assert info["precision"] == precision and info["max_batch_size"] == 8
        assert info["gpu"]["name"] == torch.cuda.get_device_name(0)
        assert info["tensorrt_version"] == tensorrt.__version__
        assert (_plan_dir(root, default_model_dir) / "model.plan").stat().st_size > 0
    messages = []
    build_for_model(default_model_dir, plans["fp16"], precision="fp16", max_batch_size=8, log=messages.append)
    assert messages == [f"TensorRT plan up to date: {_plan_dir(plans['fp16'], default_model_dir) / 'model.plan'}"]


@needs_tensorrt_gpu
@pytest.mark.parametrize("precision, atol", [("fp32", FP32_ATOL), ("fp16", FP16_ATOL)])
def test_tensorrt_logits_match_torch(plans, default_model_dir, precision, atol):
    from llmserve.runners.torch_runner import TorchModelRunner
    from llmserve.runners.tensorrt_runner import TensorRTRunner

    runner = TensorRTRunner(default_model_dir, num_slots=4, compiled_dir=_plan_dir(plans[precision], default_model_dir))
    runner.model_dir_for_test = default_model_dir
    reference = TorchModelRunner(default_model_dir, num_slots=4, device="cuda")
    for name, diff in _run_scenario(runner, reference):
        assert diff < atol, f"{precision} {name}: max |logits diff| {diff}"


@needs_tensorrt_gpu
def test_greedy_generation_equals_torch_at_fp32(plans, default_model_dir):
    from llmserve.engine.config import EngineConfig, SamplingParams
    from llmserve.engine.llm_engine import LLMEngine
    from llmserve.runners.tensorrt_runner import TensorRTRunner

    params = SamplingParams(max_tokens=24)
    torch_engine = LLMEngine(EngineConfig(model_dir=str(default_model_dir), runtime="torch", max_num_seqs=8, device="cuda"))
    runner = TensorRTRunner(default_model_dir, num_slots=8, compiled_dir=_plan_dir(plans["fp32"], default_model_dir))
    trt_engine = LLMEngine(EngineConfig(model_dir=str(default_model_dir), runtime="tensorrt", max_num_seqs=8,
                                        device="cuda"), runner=runner)
    assert trt_engine.generate(PROMPTS, params) == torch_engine.generate(PROMPTS, params)


@needs_tensorrt_gpu
@pytest.mark.e2e
def test_streaming_request_through_tritonserver_with_tensorrt(plans, default_model_dir, tmp_path):
    from llmserve.triton.launcher import TritonServer, model_env
    from tests.ensemble_requests import run_stream

    env = model_env(str(default_model_dir), "tensorrt", device="cuda", max_num_seqs=8,
                    compiled_dir=str(_plan_dir(plans["fp16"], default_model_dir)))
    with TritonServer(env=env, log_path=tmp_path / "server.log") as server:
        result = run_stream(server.grpc_url, text_input="Once upon a time", max_tokens=16, stream=True)
    assert result.error is None, result.error
    assert result.num_output_tokens > 0 and len(result.pieces) > 1  # streamed, piece by piece
    assert result.text.strip()
