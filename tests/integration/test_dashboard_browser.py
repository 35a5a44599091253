"""/dashboard in a real headless Chromium (Debian's chromium + chromedriver, driven by
Selenium), against the gateway in front of two fake engines that run real symram
control servers over real TierStacks (tests/test_gateway_fakes.py): engine "a" has an
8-page DRAM tier over a disk tier, engine "b" a DRAM tier only.

Real traffic goes through the gateway (a prefix-routed request whose prefix sits on
a's disk, so the gateway prefetches it), plus direct tier hits and misses. Once the
tier counters are still, the page is loaded and, in the DOM after its script ran:

* every instance row shows the tier occupancy, hit counts and rates, ingest/evict and
  prefetch counts that /dashboard/data reports, which are the stacks' own counters;
* the uPlot timeline drew a canvas from the same non-empty series /dashboard/data
  holds (data equality, and the series colours are on the canvas), and the instance
  selector switches it to one instance's series;
* the page logged no JavaScript error.

A screenshot goes to test-artifacts/dashboard.png.

Without chromium/chromedriver/selenium the test is skipped locally, and fails under
CI (CI=true), where scripts/setup.sh must have installed them.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_gateway_fakes import FakeEngine, gateway_config, running_gateway, tokenize, wait_for

from symram_vllm.keys import BlockKey

BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome")
INGEST_RGB = (0x4A, 0x7F, 0xD4)  # COLORS.ingest in dashboard.html
DASH = "\N{EN DASH}"  # what the page shows for "no value"
PROMPT = "".join(chr(ord("a") + i % 26) for i in range(48))  # 12 blocks of 4 tokens


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _missing(what: str) -> None:
    """Skip locally; in CI a missing browser is a broken setup, not a reason to skip."""
    message = (f"{what}: the dashboard browser test needs Debian's chromium and "
               "chromium-driver (apt-get install chromium chromium-driver) and the Python "
               "package selenium (pip install -e '.[dev]'); scripts/setup.sh installs all three")
    if _in_ci():
        pytest.fail(f"CI=true and {message}", pytrace=False)
    pytest.skip(message)


def _find_browser() -> tuple[str, str]:
    """Chromium and ChromeDriver: $SYMRAM_CHROMIUM / $SYMRAM_CHROMEDRIVER, else PATH."""
    browser = os.environ.get("SYMRAM_CHROMIUM") or next(
        (p for p in map(shutil.which, BROWSER_NAMES) if p), None)
    driver = os.environ.get("SYMRAM_CHROMEDRIVER") or shutil.which("chromedriver")
    for what, path in (("chromium", browser), ("chromedriver", driver)):
        if not path or not os.access(path, os.X_OK):
            _missing(f"no {what} binary ({path or 'not on PATH'})")
    return str(browser), str(driver)


@pytest.fixture
def stack_engines(tmp_path: Path) -> Iterator[tuple[FakeEngine, FakeEngine]]:
    started: list[FakeEngine] = []
    try:
        started.append(FakeEngine("a", dram_pages=8, disk_path=tmp_path / "disk-a").start())
        started.append(FakeEngine("b", dram_pages=8).start())
        yield started[0], started[1]
    finally:
        for engine in started:
            engine.stop()


@pytest.fixture
def browser() -> Iterator[Any]:
    binary, driver_path = _find_browser()
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _missing("the selenium package is not installed")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1500,1000", "--force-device-scale-factor=1",
                "--disable-extensions", "--no-first-run"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: Selenium Manager must not try to download anything.
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


# -- reading the page ------------------------------------------------------------------------
READ_ROWS = """
const out = {};
for (const tr of document.querySelectorAll("#instances tr[data-instance]")) {
  const fields = {};
  for (const node of tr.querySelectorAll("[data-field]")) {
    fields[node.dataset.field] = {value: node.dataset.value ?? null,
                                  text: node.textContent.trim()};
  }
  out[tr.dataset.instance] = fields;
}
return out;
"""

READ_CHART = """
const s = window.symramDashboard;
const canvas = document.querySelector("#chart canvas");
if (!s || !s.plot || !canvas) return null;
const [r, g, b] = arguments[0];
const ctx = canvas.getContext("2d");
const px = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
let coloured = 0, ink = 0;
for (let i = 0; i < px.length; i += 4) {
  if (px[i + 3] === 0) continue;
  ink += 1;
  if (Math.abs(px[i] - r) < 12 && Math.abs(px[i + 1] - g) < 12 && Math.abs(px[i + 2] - b) < 12)
    coloured += 1;
}
return {width: canvas.width, height: canvas.height, ink: ink, coloured: coloured,
        plotData: s.plot.data, instance: s.instance,
        rendered: {timeline: s.data.timeline, by: s.data.timeline_by_instance,
                   generated_at: s.data.generated_at}};
"""


def _num(field: dict[str, str | None]) -> float:
    assert field["value"] not in (None, ""), field
    return float(field["value"])  # type: ignore[arg-type]


def _count_text(value: float) -> str:
    return str(round(value))


def _pct_text(value: float | None) -> str:
    return DASH if value is None else f"{100 * value:.1f}%"


def _tier_rows_match(rows: dict[str, Any], data: dict[str, Any]) -> list[str]:
    """Differences between the DOM rows and /dashboard/data (empty when they agree)."""
    problems: list[str] = []

    def same(name: str, field: str, expected: float, text: str | None = None) -> None:
        got = rows.get(name, {}).get(field)
        if got is None:
            problems.append(f"{name}: no [data-field={field}] in the row")
            return
        if abs(_num(got) - expected) > 1e-9 * max(1.0, abs(expected)):
            problems.append(f"{name}.{field}: page {got['value']} != data {expected}")
        if text is not None and got["text"] != text:
            problems.append(f"{name}.{field}: page shows {got['text']!r}, expected {text!r}")

    for inst in data["instances"]:
        name, tiers = inst["name"], inst["tiers"]
        if name not in rows:
            problems.append(f"no row for instance {name}")
            continue
        same(name, "inflight", inst["inflight"], _count_text(inst["inflight"]))
        same(name, "max-inflight", inst["max_inflight"], _count_text(inst["max_inflight"]))
        routed = inst["routed"]
        same(name, "routed-total", sum(routed.values()), _count_text(sum(routed.values())))
        same(name, "routed-prefix", routed.get("prefix", 0))
        if tiers is None:
            problems.append(f"{name}: /dashboard/data has no tier stats")
            continue
        for tier in ("dram", "disk"):
            if tier not in tiers:
                if rows[name].get(tier, {}).get("text") != "off":
                    problems.append(f"{name}: {tier} tier should read 'off'")
                continue
            for key in ("used", "capacity"):
                same(name, f"{tier}-{key}", tiers[tier][key])
            same(name, f"{tier}-pages", tiers[tier]["pages"], _count_text(tiers[tier]["pages"]))
        same(name, "hits-dram", tiers["hits"]["dram"], _count_text(tiers["hits"]["dram"]))
        same(name, "hits-disk", tiers["hits"]["disk"], _count_text(tiers["hits"]["disk"]))
        same(name, "hits-miss", tiers["hits"]["miss"], _count_text(tiers["hits"]["miss"]))
        for field, key in (("hit-rate", "hit_rate"), ("dram-hit-rate", "dram_hit_rate")):
            if tiers[key] is None:
                if rows[name].get(field, {}).get("text") != DASH:
                    problems.append(f"{name}.{field} should read {DASH!r}")
            else:
                same(name, field, tiers[key], _pct_text(tiers[key]))
        same(name, "ingested", tiers["ingested"], _count_text(tiers["ingested"]))
        evicted = tiers["evictions"]["dram"] + tiers["evictions"]["disk"]
        same(name, "evicted", evicted, _count_text(evicted))
        same(name, "evicted-dram", tiers["evictions"]["dram"])
        same(name, "evicted-disk", tiers["evictions"]["disk"])
        same(name, "prefetched", tiers["prefetched"], _count_text(tiers["prefetched"]))
        same(name, "promotions", tiers["promotions"], _count_text(tiers["promotions"]))
    return problems


def _tiers_of(url: str) -> str:
    data = httpx.get(f"{url}/dashboard/data", timeout=5).json()
    return json.dumps([(i["name"], i["tiers"], i["routed"]) for i in data["instances"]],
                      sort_keys=True)


def _wait_still(url: str, gw: Any, seconds: float = 1.0, timeout: float = 30.0) -> None:
    """Until the tier numbers /dashboard/data reports stopped changing (disk writes are
    asynchronous) for `seconds`, over several stats polls."""
    deadline = time.monotonic() + timeout
    last, since = _tiers_of(url), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = _tiers_of(url)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= seconds:
            return
    raise AssertionError(f"dashboard tier stats still changing after {timeout}s")


def test_dashboard_in_headless_chromium(browser, stack_engines, artifacts_dir: Path):
    from selenium.webdriver.support.ui import Select, WebDriverWait

    a, b = stack_engines
    with running_gateway(gateway_config([a, b])) as (url, gw):
        assert wait_for(lambda: all(x.last_stats and x.control_ok for x in gw.pool.backends))
        tokens = tokenize(PROMPT)
        keys = a.store_prompt(tokens, None)  # 12 pages into 8 DRAM slots: 4 go to disk
        assert wait_for(lambda: a.stack.where(BlockKey(keys[0], 0)) == "disk")
        # A prompt a holds (partly on disk): routed to a by prefix, prefetched on arrival.
        routed = httpx.post(f"{url}/v1/completions", timeout=30,
                            json={"model": "demo", "prompt": PROMPT + "zz", "max_tokens": 3})
        assert routed.status_code == 200, routed.text
        assert "instance=a;reason=prefix" in routed.headers["x-symram-route"]
        assert "x-symram-prefetch" in routed.headers
        # A fresh prompt (streamed) lands somewhere and is stored there.
        fresh = httpx.post(f"{url}/v1/completions", timeout=30,
                           json={"model": "demo", "prompt": "q" * 30, "max_tokens": 3,
                                 "stream": True})
        assert fresh.status_code == 200 and fresh.text.rstrip().endswith("data: [DONE]")
        where = {k: a.stack.where(BlockKey(k, 0)) for k in keys}
        a.stack.get(BlockKey(next(k for k in keys if where[k] == "dram"), 0))  # a DRAM hit
        a.stack.get(BlockKey(next(k for k in keys if where[k] == "disk"), 0))  # a disk hit
        a.stack.get(BlockKey(b"\x02" * 32, 0))  # a miss
        b_keys = b.store_prompt(tokenize("b" * 16), None)
        b.stack.get(BlockKey(b_keys[0], 0))
        assert wait_for(lambda: sum(p["hit"] for p in gw.timeline.points) >= 3)
        _wait_still(url, gw)

        browser.get(f"{url}/dashboard")
        WebDriverWait(browser, 20).until(
            lambda d: int(d.find_element("tag name", "body").get_attribute("data-renders")
                          or 0) >= 1)

        # The rows equal /dashboard/data (a render may predate the last poll: retry).
        deadline = time.monotonic() + 15
        while True:
            rows = browser.execute_script(READ_ROWS)
            data = httpx.get(f"{url}/dashboard/data", timeout=5).json()
            problems = _tier_rows_match(rows, data)
            if not problems or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert not problems, "\n".join(problems)

        # ... and those are the stacks' own numbers, not something the gateway made up.
        truth = a.stack.stats()
        ra, rb = rows["a"], rows["b"]
        assert _num(ra["dram-pages"]) == truth["dram_pages"] == 8
        assert _num(ra["dram-capacity"]) == truth["dram_bytes_capacity"] == 8 * 4096
        assert _num(ra["disk-pages"]) == truth["disk_pages"] >= 4
        assert _num(ra["hits-dram"]) == truth["stack_dram_hits"] >= 1
        assert _num(ra["hits-disk"]) == truth["stack_disk_hits"] >= 1
        assert _num(ra["hits-miss"]) == truth["stack_misses"] >= 1
        assert _num(ra["prefetched"]) == truth["stack_prefetched"] >= 1
        assert _num(ra["evicted-dram"]) == truth["dram_evictions"] >= 4
        assert _num(ra["ingested"]) == truth["dram_puts"] >= 12
        assert _num(ra["routed-prefix"]) >= 1
        assert _num(rb["hits-dram"]) == b.stack.stats()["stack_dram_hits"] == 1
        assert ra["state"]["text"] == "up" and rb["state"]["text"] == "up"
        assert browser.find_element("id", "sum-up").text == "2 / 2"
        assert browser.find_element("css selector", '[data-field="route-prefix"]').text != ""

        # The timeline: a uPlot canvas drawn from the non-empty series the page was given.
        chart = browser.execute_script(READ_CHART, list(INGEST_RGB))
        assert chart is not None, "no uPlot instance or canvas in #chart"
        assert chart["width"] > 300 and chart["height"] > 100
        timeline = chart["rendered"]["timeline"]
        events = ("ingest", "prefetch", "evict", "hit", "miss")
        assert chart["plotData"] == [timeline["t"], *(timeline[e] for e in events)]
        assert len(timeline["t"]) >= 2
        assert sum(timeline["ingest"]) >= 12 and sum(timeline["hit"]) >= 3
        assert sum(timeline["miss"]) >= 1 and sum(timeline["prefetch"]) >= 1
        assert chart["ink"] > 1000 and chart["coloured"] > 20, chart | {"plotData": "..."}
        assert len(browser.find_elements("css selector", "#chart .u-legend .u-series")) == 6

        # One instance's timeline.
        Select(browser.find_element("id", "timeline-instance")).select_by_value("a")
        chart_a = browser.execute_script(READ_CHART, list(INGEST_RGB))
        series_a = chart_a["rendered"]["by"]["a"]
        assert chart_a["instance"] == "a"
        assert chart_a["plotData"] == [series_a["t"], *(series_a[e] for e in events)]
        assert sum(series_a["prefetch"]) >= 1 and sum(series_a["ingest"]) >= 12
        Select(browser.find_element("id", "timeline-instance")).select_by_value("")

        shot = artifacts_dir / "dashboard.png"
        assert browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000

        errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
        assert not errors, errors
