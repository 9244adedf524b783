"""The app's readable units (ui.format): SI prefixes for counts, binary prefixes for bytes."""

import pytest

from ui.format import format_bytes, format_count, format_ratio, format_signed_count, to_gib, to_millions


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
