"""Request validation: SamplingParams, EngineConfig and the Triton tensor parsing."""

import numpy as np
import pytest

from llmserve.engine.config import EngineConfig, SamplingParams
from llmserve.errors import InvalidRequestError
from llmserve.triton.parsing import parse_llm_request, parse_prompt


@pytest.mark.parametrize("kwargs, field", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -3}, "max_tokens"),
    ({"max_tokens": 8, "temperature": -0.1}, "temperature"),
    ({"max_tokens": 8, "top_p": 0.0}, "top_p"),
    ({"max_tokens": 8, "top_p": 1.5}, "top_p"),
    ({"max_tokens": 8, "top_k": -1}, "top_k"),
    ({"max_tokens": 8, "repetition_penalty": 0.0}, "repetition_penalty"),
    ({"max_tokens": 8, "presence_penalty": 3.0}, "presence_penalty"),
    ({"max_tokens": 8, "min_tokens": 9}, "min_tokens"),
    ({"max_tokens": 8, "temperature": float("nan")}, "temperature"),
])
def test_sampling_params_name_the_bad_field(kwargs, field):
    with pytest.raises(InvalidRequestError, match=field):
        SamplingParams(**kwargs)


def test_sampling_params_drop_empty_stop_strings():
    assert SamplingParams(max_tokens=4, stop=("", "END")).stop == ("END",)


def test_engine_config_validates():
    with pytest.raises(ValueError, match="runtime"):
        EngineConfig(model_dir="x", runtime="tensorflow")
    with pytest.raises(ValueError, match="max_num_seqs"):
        EngineConfig(model_dir="x", max_num_seqs=0)


def batched(value, dtype):
    return np.array([[value]], dtype=dtype)


def test_parse_prompt():
    assert parse_prompt({"text_input": batched("héllo".encode(), object)}).text == "héllo"
    with pytest.raises(InvalidRequestError, match="empty"):
        parse_prompt({"text_input": batched(b"", object)})
    with pytest.raises(InvalidRequestError, match="UTF-8"):
        parse_prompt({"text_input": batched(b"\xff\xfeabc", object)})
    with pytest.raises(InvalidRequestError, match="required"):
        parse_prompt({})
    with pytest.raises(InvalidRequestError, match="batch dimension 1"):
        parse_prompt({"text_input": np.array([[b"a"], [b"b"]], dtype=object)})


def test_parse_llm_request():
    request = parse_llm_request({
        "input_ids": np.array([[5, 6, 7]], dtype=np.int32),
        "max_tokens": batched(12, np.int32),
        "temperature": batched(0.5, np.float32),
        "top_k": batched(3, np.int32),
        "seed": batched(2**63 + 5, np.uint64),
        "stream": batched(True, bool),
        "stop_words": np.array([[b"END", b"", "\n".encode()]], dtype=object),
        "exclude_input_in_output": batched(False, bool),
    })
    assert request.prompt_ids == [5, 6, 7] and request.stream and request.echo_prompt
    assert request.poll_cancellation  # a direct caller is watched unless it says otherwise
    params = request.params
    assert (params.max_tokens, params.top_k, params.seed) == (12, 3, 2**63 + 5)
    assert params.temperature == pytest.approx(0.5)
    assert params.stop == ("END", "\n")


def test_the_ensemble_asks_llm_not_to_poll_cancellation():
    request = parse_llm_request({"input_ids": np.array([[5]], dtype=np.int32), "max_tokens": batched(2, np.int32),
                                 "poll_cancellation": batched(False, bool)})
    assert not request.poll_cancellation


def test_parse_llm_request_errors():
    ids = np.array([[1, 2]], dtype=np.int32)
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        parse_llm_request({"input_ids": ids})
    with pytest.raises(InvalidRequestError, match="input_ids"):
        parse_llm_request({"max_tokens": batched(3, np.int32)})
    with pytest.raises(InvalidRequestError, match="stop_words"):
        parse_llm_request({"input_ids": ids, "max_tokens": batched(3, np.int32),
                           "stop_words": np.array([[1, 2]], dtype=np.int32)})
    with pytest.raises(InvalidRequestError, match="bad_words.*UTF-8"):
        parse_llm_request({"input_ids": ids, "max_tokens": batched(3, np.int32),
                           "bad_words": np.array([[b"\xc3"]], dtype=object)})


def test_parse_stop_request():
    request = parse_llm_request({"stop": batched(True, bool), "sequence_id": batched(42, np.uint64)})
    assert request.stop and request.sequence_id == 42 and request.prompt_ids is None


def test_output_info_round_trips():
    from llmserve.triton.packing import OutputInfo

    for reason in ("", "stop", "length", "cancelled"):
        info = OutputInfo(5, -1, 12, 40, 2**40 + 3, reason)
        packed = info.pack()
        assert packed.shape == (1, 6) and packed.dtype == np.int64
        assert OutputInfo.unpack(packed) == info


def test_config_pbtxt_leaves_every_engine_default_to_engine_config():
    """Each EngineConfig field is an `llm` setting, and config.pbtxt writes none of their defaults
    (they live in EngineConfig alone); the server's runtime and slots are the bench's."""
    import dataclasses
    import re
    from pathlib import Path

    from llmserve.engine.config import DEFAULT_MAX_NUM_SEQS, DEFAULT_RUNTIME

    config = (Path(__file__).resolve().parents[1] / "model_repository" / "llm" / "config.pbtxt").read_text()
    values = dict(re.findall(r'key: "(\w+)" value \{ string_value: "([^"]*)" \}', config))
    for field in dataclasses.fields(EngineConfig):
        assert field.name in values, f"config.pbtxt has no {field.name} setting"
        if field.name != "model_dir":
            assert values[field.name] == "", f"config.pbtxt writes {field.name}'s default"
    assert EngineConfig(model_dir="x").runtime == DEFAULT_RUNTIME == "onnxruntime"
    assert EngineConfig(model_dir="x").max_num_seqs == DEFAULT_MAX_NUM_SEQS


def test_engine_config_from_settings_takes_defaults_and_environment(monkeypatch, tmp_path):
    import json

    from llmserve.triton.settings import engine_config, max_stream_responses_per_s, server_num_threads

    (tmp_path / "config.json").write_text("{}")
    args = {"model_config": json.dumps({"parameters": {"max_num_seqs": {"string_value": ""},
                                                       "dtype": {"string_value": "float16"}}}),
            "model_repository": str(tmp_path / "repo" / "llm")}
    monkeypatch.setenv("LLM_MODEL_DIR", str(tmp_path))
    monkeypatch.setenv("LLM_ENABLE_PREFIX_CACHING", "off")
    monkeypatch.setenv("LLM_MAX_MODEL_LEN", "128")
    config = engine_config(args)
    assert config == EngineConfig(model_dir=str(tmp_path), dtype="float16", enable_prefix_caching=False,
                                  max_model_len=128, num_threads=server_num_threads())
    assert max_stream_responses_per_s(args) == 500.0
    monkeypatch.setenv("LLM_MAX_STREAM_RESPONSES_PER_S", "none")
    assert max_stream_responses_per_s(args) is None


def test_boolean_settings_parse_or_name_the_setting():
    from llmserve.triton.settings import parse_bool

    assert parse_bool("x", " True") and parse_bool("x", "1") and not parse_bool("x", "off")
    with pytest.raises(ValueError, match="enable_prefix_caching must be true or false"):
        parse_bool("enable_prefix_caching", "maybe")


@pytest.mark.parametrize("text, expected", [("", 0.0625), ("1", 1.0), ("0.25", 0.25), ("0", None), ("1.5", None),
                                            ("nan", None), ("inf", None)])
def test_metric_settings_take_defaults_or_refuse_by_name(monkeypatch, text, expected):
    import json

    from llmserve.triton.settings import inter_token_sample_fraction, latency_histograms

    args = {"model_config": json.dumps({"parameters": {}})}
    monkeypatch.setenv("LLM_INTER_TOKEN_SAMPLE_FRACTION", text)
    if expected is None:
        with pytest.raises(ValueError, match="inter_token_sample_fraction must be in"):
            inter_token_sample_fraction(args)
    else:
        assert inter_token_sample_fraction(args) == expected
    assert latency_histograms(args) is True
    monkeypatch.setenv("LLM_LATENCY_HISTOGRAMS", "off")
    assert latency_histograms(args) is False
