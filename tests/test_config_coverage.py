"""Every setting is exercised by some test, or waived here on purpose.

A setting counts as exercised when some test file (this one excepted) names it the way a
test sets or reads it: its ``SYMRAM_*`` variable, its dotted path (``policy.victim_window``),
or its name as a keyword argument, mapping/YAML key or attribute (``victim_window=``,
``"victim_window"``, ``victim_window:``, ``.victim_window``). A new field with no test
fails here until a test uses it or it joins WAIVED with the reason.
"""

from __future__ import annotations

import re
from pathlib import Path

from symram_vllm.config import env_name, settings

TESTS = Path(__file__).resolve().parent

# Deliberately untested settings: dotted path -> why no test sets it.
WAIVED: dict[str, str] = {
    # Read once, in SymramConnector.__init__ for the scheduler role, which needs a real
    # VllmConfig and KVCacheConfig; no unit test builds the connector itself. (The default,
    # forcing kv_load_failure_policy=recompute, is what every real-engine suite runs with.)
    "fail_on_load_error": "needs the connector built from a VllmConfig",
}


def _test_text() -> str:
    me = Path(__file__).resolve()
    return "\n".join(p.read_text(errors="replace") for p in sorted(TESTS.rglob("*.py"))
                     if p.resolve() != me)


def _used(path: tuple[str, ...], text: str) -> bool:
    name = re.escape(path[-1])
    patterns = [
        re.escape(env_name(path)),
        re.escape(".".join(path)) + r"\b",
        rf"(?<![\w.]){name}\s*[=:](?!=)",  # keyword argument, YAML or dict-literal key
        rf"[\"']{name}[\"']",  # mapping key as a string
        rf"\.{name}\b",  # attribute read
    ]
    return any(re.search(p, text) for p in patterns)


def unexercised(text: str | None = None) -> list[str]:
    text = _test_text() if text is None else text
    return [".".join(p) for p in settings() if ".".join(p) not in WAIVED and not _used(p, text)]


def test_every_setting_is_exercised_or_waived():
    missing = unexercised()
    assert not missing, (
        f"config settings no test exercises: {missing}. Add a test that sets or reads "
        "each, or add it to WAIVED in tests/test_config_coverage.py with the reason.")


def test_waivers_are_real_settings_and_still_needed():
    paths = {".".join(p) for p in settings()}
    stale = sorted(set(WAIVED) - paths)
    assert not stale, f"WAIVED names settings that no longer exist: {stale}"
    text = _test_text()
    covered = sorted(k for k in WAIVED if _used(tuple(k.split(".")), text))
    assert not covered, f"WAIVED settings that tests now exercise (drop the waiver): {covered}"
