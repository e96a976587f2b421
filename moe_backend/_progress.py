"""Progress bars for long work (weight generation and loading, tuning, JIT warm-up): tqdm when it
is installed, else a plain line on stderr every few percent, so long steps never look hung."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Iterator


class _PlainBar:
    def __init__(self, total: int, desc: str, unit: str) -> None:
        self.total, self.desc, self.unit, self.n = total, desc, unit, 0
        self.postfix = ""
        self._last = -1.0
        self._start = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        pct = 100.0 * self.n / self.total if self.total else 100.0
        if pct - self._last >= 10 or self.n == self.total:
            self._last = pct
            print(
                f"{self.desc}: {self.n}/{self.total} {self.unit} ({pct:.0f}%, "
                f"{time.monotonic() - self._start:.1f}s){', ' + self.postfix if self.postfix else ''}",
                file=sys.stderr,
                flush=True,
            )

    def set_postfix_str(self, s: str) -> None:
        self.postfix = s


@contextmanager
def progress(total: int, desc: str, unit: str = "it", enabled: bool = True) -> Iterator:
    if not enabled:
        yield _NullBar()
        return
    try:
        from tqdm.auto import tqdm
    except ImportError:
        yield _PlainBar(total, desc, unit)
        return
    with tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True) as bar:
        yield bar


class _NullBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass
