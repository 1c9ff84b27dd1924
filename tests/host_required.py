"""What a test does where the real host is missing (ComfyUI, a Python that imports it, Chromium, playwright):
skip with the reason, or fail where the run asks for the host (``MORSE_REQUIRE_HOST=1``, as ``.ci/run`` sets
for its second run), so a host test can never pass CI by skipping."""
import os

import pytest

REQUIRED = os.environ.get("MORSE_REQUIRE_HOST") == "1"


def host_missing(reason: str):
    if REQUIRED:
        pytest.fail(f"MORSE_REQUIRE_HOST=1, but {reason}", pytrace=False)
    pytest.skip(reason)
