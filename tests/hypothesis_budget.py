"""How many examples a property test runs: its own count under ``make test`` (fixed examples,
``derandomize``); under ``make fuzz`` (``QJAX_HYPOTHESIS=fuzz``: fresh examples) that count
scaled like the default, 40 -> ``QJAX_FUZZ_EXAMPLES`` (400 unless set). Without this, a test
that sets ``max_examples`` itself would keep its small count when fuzzing."""

import math
import os

FUZZ = os.environ.get("QJAX_HYPOTHESIS") == "fuzz"
FUZZ_EXAMPLES = int(os.environ.get("QJAX_FUZZ_EXAMPLES", "400"))
DEFAULT_EXAMPLES = 40  # the "qjax" profile's count (tests/conftest.py)


def examples(n: int) -> int:
    """``n``, or ``n`` scaled to the fuzz budget when fuzzing."""
    return max(n, math.ceil(n * FUZZ_EXAMPLES / DEFAULT_EXAMPLES)) if FUZZ else n
