"""lab/prefill_drift.py's CPU side: reading nvidia-smi's samples and summarising a round's window."""

import datetime

from lab.prefill_drift import parse_samples, summarise


def _stamp(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds).strftime("%Y/%m/%d %H:%M:%S.%f")[:-3]


def test_samples_parse_and_bad_rows_are_left_out():
    t = 1_800_000_000.0
    text = "\n".join(
        [
            f"{_stamp(t)}, 1980, 120.5, 39, 0x0000000000000000",
            f"{_stamp(t + 0.05)}, [N/A], 130.0, 40, 0x0000000000000004",  # unreadable clock
            f"{_stamp(t + 0.10)}, 1500, 695.0, 55",  # cut line
            f"{_stamp(t + 0.15)}, 1455, 699.0, 56, 0x0000000000000004",
        ]
    )
    rows = parse_samples(text)
    assert [r[1] for r in rows] == [1980.0, 1455.0]
    assert abs(rows[1][0] - rows[0][0] - 0.15) < 1e-3
    assert rows[1][4] == "0x0000000000000004"


def test_a_window_summarises_only_its_samples():
    rows = [
        (10.0, 1980.0, 120.0, 39.0, "0x0"),
        (10.1, 1500.0, 690.0, 55.0, "0x4"),
        (10.2, 1400.0, 700.0, 57.0, "0x4"),
        (11.0, 1000.0, 100.0, 30.0, "0x8"),
    ]
    assert summarise(rows, 10.05, 10.5) == " 1450 MHz   695 W  57 C 0x4"
    assert summarise(rows, 9.0, 10.15).split()[-1] == "0x0/0x4"
    assert summarise(rows, 20.0, 21.0) == "no samples"
