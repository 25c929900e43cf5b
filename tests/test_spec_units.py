"""KV geometry presets against the published per-token sizes, and size parsing."""

from __future__ import annotations

import pytest

from kvscope.spec import PRESETS, KVSpec, get_spec
from kvscope.units import format_bytes, parse_size

KIB = 1024


@pytest.mark.parametrize(
    "name, per_token",
    [("llama-3-8b", 128 * KIB), ("llama-2-7b", 512 * KIB), ("yi-6b", 64 * KIB), ("llama-3-70b", 320 * KIB),
     ("opt-13b", 800 * KIB)],
)  # fmt: skip
def test_presets_match_reference_kv_bytes_per_token(name, per_token):
    assert get_spec(name).bytes_per_token == per_token


def test_tiny_is_small_and_gqa():
    tiny = get_spec("tiny")
    assert tiny.bytes_per_token == 2 * 2 * 2 * 16 * 4
    assert tiny.q_heads // tiny.num_kv_heads == 2


def test_layer_override_scales_bytes_per_token():
    assert get_spec("llama-3-8b", num_layers=8).bytes_per_token == 32 * KIB


def test_unknown_preset_and_bad_spec_are_one_line_errors():
    with pytest.raises(ValueError, match="unknown model preset 'gpt-9'; choose from"):
        get_spec("gpt-9")
    with pytest.raises(ValueError, match="dtype"):
        KVSpec("x", 2, 2, 16, "int3")
    with pytest.raises(ValueError, match="multiple of kv heads"):
        KVSpec("x", 2, 3, 16, num_q_heads=4)


def test_spec_round_trips_through_dict():
    for spec in PRESETS.values():
        assert KVSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize(
    "text, value",
    [("8GiB", 8 << 30), ("2MiB", 2 << 20), ("512KiB", 512 << 10), ("4096", 4096), ("1.5GB", 1_500_000_000),
     (" 16 gib ", 16 << 30), (7, 7)],
)  # fmt: skip
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "lots", "8XB", "-1", "1e3"])
def test_parse_size_rejects_garbage_with_the_text(text):
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


def test_format_bytes():
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(16 << 30) == "16 GiB"
    assert format_bytes(12) == "12 B"
    assert format_bytes(-(3 << 20)) == "-3 MiB"
