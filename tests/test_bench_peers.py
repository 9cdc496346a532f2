"""The bench's peers: one that cannot be had is reported with its reason and skipped, and every peer
module offers the interface the bench drives (set-up, a server with url, model and fixed-length fields)."""

import importlib

import pytest

from bench import openloop
from bench.__main__ import make_systems, parse_args
from bench.peers import PEERS, available_peers


def test_a_peer_without_a_model_is_skipped_with_the_reason(tmp_path):
    unavailable: dict[str, str] = {}
    servers = available_peers(list(PEERS), tmp_path / "no-model", 4, tmp_path, unavailable)
    assert servers == {}
    assert set(unavailable) == set(PEERS)
    assert all(f"no Hugging Face model at {tmp_path / 'no-model'}" in reason for reason in unavailable.values())


def test_a_peer_whose_setup_raises_is_skipped_with_the_error(tmp_path, monkeypatch):
    module = importlib.import_module(PEERS["llama.cpp"][0])

    def broken_setup(model_dir):
        raise OSError("disk full")

    monkeypatch.setattr(module, "setup", broken_setup)
    unavailable: dict[str, str] = {}
    assert available_peers(["llama.cpp"], tmp_path, 4, tmp_path, unavailable) == {}
    assert unavailable == {"llama.cpp": "setup raised OSError: disk full"}


@pytest.mark.parametrize("name", list(PEERS))
def test_each_peer_module_has_the_bench_interface(name):
    module_name, class_name, slots_arg = PEERS[name]
    module = importlib.import_module(module_name)
    server_class = getattr(module, class_name)
    assert callable(module.setup)
    for attribute in ("url", "model", "health_url", "fixed_length_fields", "command"):
        assert hasattr(server_class, attribute), attribute
    if slots_arg:
        assert slots_arg in server_class.__init__.__code__.co_varnames


def test_unknown_systems_are_refused_by_name(tmp_path):
    with pytest.raises(SystemExit, match="unknown nope.*known: engine"):
        make_systems(parse_args(["--systems", "triton,nope", "--out", str(tmp_path)]))
    with pytest.raises(SystemExit, match="unknown nope.*known: llmserve"):
        openloop.make_systems(openloop.parse_args(["--systems", "nope", "--out", str(tmp_path)]), {})
