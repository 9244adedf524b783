"""Readable units (planner.units): SI prefixes for counts, binary prefixes for bytes."""

import pytest

from planner.units import format_bytes, format_count, format_ratio, format_signed_count, to_gib, to_millions


@pytest.mark.parametrize(("value", "unit", "text"), [
    (0, "", "0"),
    (999, "", "999"),
    (8_394_496, "", "8.39 M"),
    (20_500_000, "", "20.5 M"),
    (709_000_000, "", "709 M"),
    (999_600, "", "1.00 M"),  # rounds up into the next prefix, never "1000 K"
    (999_400, "", "999 K"),
    (5_610_680_320, "FLOP", "5.61 GFLOP"),
    (1.5e12, "FLOP", "1.50 TFLOP"),
])
def test_format_count_three_significant_digits(value, unit, text):
    assert format_count(value, unit) == text


@pytest.mark.parametrize(("value", "text"), [
    (512, "512 B"),
    (2**20, "1.00 MiB"),
    (3 * 2**29, "1.50 GiB"),
    (2**30 - 1, "1.00 GiB"),
    (2**41, "2.00 TiB"),
])
def test_format_bytes_binary_prefixes(value, text):
    assert format_bytes(value) == text
    assert "GB" not in text


def test_format_signed_and_ratio():
    assert format_signed_count(6_365_444) == "+6.37 M"
    assert format_signed_count(0) == "0"
    assert format_ratio(1.048615) == "1.05×"


def test_axis_units():
    assert to_gib(3 * 2**29) == 1.5
    assert to_millions(8_394_496) == 8.394496


def test_prefixes_go_up_to_exa():
    assert format_count(5.37e15) == "5.37 P" and format_count(2.1e18, "FLOP") == "2.10 EFLOP"
    assert format_bytes(3 * 2**50) == "3.00 PiB" and format_bytes(2**61) == "2.00 EiB"


def test_a_column_reads_in_the_unit_of_its_largest_value():
    from planner.units import column_format

    shown = column_format("bytes", [512 * 2**20, 8 * 2**30])
    assert [shown(v) for v in (512 * 2**20, 8 * 2**30)] == ["0.500 GiB", "8.00 GiB"]
    assert column_format("bytes", [33 * 2**20, 12 * 2**30])(33 * 2**20) == "0.0322 GiB"
    assert column_format("count", [8_390_000, 2_500_000_000])(8_390_000) == "8.39 M"  # counts keep their prefix
    assert column_format("signed_count", [0, 3_000_000])(3_000_000) == "+3.00 M"
