"""KV geometry presets against the published per-token sizes, and size parsing."""

from __future__ import annotations

import re

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


UNITS = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"]


@pytest.mark.parametrize("power", range(len(UNITS)))
@pytest.mark.parametrize("sign", [1, -1])
def test_format_bytes_boundaries_of_every_unit(power, sign):
    """Three significant digits never print as '1e+03': from 999.5 of a unit (which .3g rounds to 1000) on, the
    next unit is used."""
    unit, scale = UNITS[power], 1024.0**power
    nxt = UNITS[power + 1] if power + 1 < len(UNITS) else "EiB"
    minus = "-" if sign < 0 else ""
    expected = {
        999.4: f"{minus}999 {unit}",
        999.5: f"{minus}0.976 {nxt}",
        1000: f"{minus}0.977 {nxt}",
        1023.99: f"{minus}1 {nxt}",
        1024: f"{minus}1 {nxt}",
    }
    for value, text in expected.items():
        assert format_bytes(sign * value * scale) == text
        assert "e+" not in text


def test_format_bytes_small_and_odd_values():
    assert format_bytes(0) == "0 B"
    assert format_bytes(1.5 * 1024**6) == "1.5 EiB"
    assert format_bytes(2000 * 1024**6) == "2,000 EiB"  # past the last unit: digits, not an exponent
    assert format_bytes(float("inf")) == "inf B" and format_bytes(float("nan")) == "nan B"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("9" * 400, "not a size: '99999999999999999999'... (400 characters"),
        ("99999999TiB", "size too large: '99999999TiB' (at most 8 EiB)"),
        ("8EiB", "size too large"),
        (2**63, "size too large"),
        ("nan", "not a size: 'nan'"),
        ("inf", "not a size: 'inf'"),
        ("-1GiB", "not a size: '-1GiB' (must not be negative)"),
        (-3, "not a size: -3 (must not be negative)"),
        (True, "not a size: True"),
        ("1." + "0" * 40, "not a size"),
    ],
)
def test_parse_size_refuses_absurd_input_in_one_line(text, message):
    with pytest.raises(ValueError) as e:
        parse_size(text)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_parse_size_is_exact_and_knows_the_big_units():
    assert parse_size("9007199254740993") == 9007199254740993  # float() would round it
    assert parse_size("1PiB") == 1 << 50 and parse_size("7EiB") == 7 << 60 and parse_size("2PB") == 2 * 10**15
    assert parse_size("0.5") == 0  # fractions of a byte round down; callers refuse a zero where it matters
    assert parse_size(str(2**63 - 1)) == 2**63 - 1


def test_host_memory_and_its_check():
    from kvscope.units import check_host_memory, host_memory_bytes

    host = host_memory_bytes()
    assert host is not None and host > 1 << 20
    check_host_memory(1 << 20, "a megabyte", "no hint")  # fits anywhere
    with pytest.raises(ValueError, match=r"^lots needs about 8 EiB of host memory, more than half of the .*; hint$"):
        check_host_memory(2**63 - 1, "lots", "hint")


@pytest.mark.parametrize(
    ("value", "minimum", "message"),
    [
        (16.0, 1, "x must be an integer, got 16.0"),
        (True, 1, "x must be an integer, got True"),
        (0, 1, "x must be positive, got 0"),
        (-1, 0, "x must not be negative, got -1"),
        (11, 1, "x must be at most 10, got 11"),
    ],
)
def test_check_int_refuses_floats_bools_and_out_of_range(value, minimum, message):
    from kvscope.units import check_int

    assert check_int("x", 3, minimum, 10) == 3
    with pytest.raises(ValueError, match=re.escape(message)):
        check_int("x", value, minimum, 10)


def test_spec_checks_types_and_bounds_and_layers_zero_is_refused():
    with pytest.raises(ValueError, match="num_layers must be an integer in 1..1,048,576, got '32'"):
        KVSpec.from_dict({"name": "x", "num_layers": "32", "num_kv_heads": 8, "head_dim": 128})
    with pytest.raises(ValueError, match="name must be a non-empty string"):
        KVSpec("", 2, 2, 16)
    with pytest.raises(ValueError, match="--layers: must be an integer in 1..1,048,576, got 0"):
        get_spec("tiny", 0)  # 0 used to mean "the preset's layers"
    with pytest.raises(ValueError, match="unknown model preset ''"):
        get_spec("")
