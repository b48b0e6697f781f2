"""The HTML report: its structure, and in a real headless Chromium (console, rows, sorting)."""

import re

import pytest

from pyro_lmscm.study import run_study
from pyro_lmscm.study.html import render_html


@pytest.fixture
def report(make_config, corpus_file):
    # one prompt the tiny tokenizer cannot encode: a skipped string still gets its row
    corpus_file.write_text(corpus_file.read_text() + "the zebra <b>said</b>\n")
    return run_study(make_config(report=True))


def test_one_row_per_string_and_escaping(report):
    text = report.files["html"].read_text()
    assert len(re.findall(r'<tr class="string-row"', text)) == len(report.records) == 10
    assert "the zebra &lt;b&gt;said&lt;/b&gt;" in text and "<b>said</b>" not in text
    assert "skipped: TokenizationError" in text
    assert not re.search(r'(src|href)="(https?:)?//', text)  # self-contained
    assert text.count("data:image/png;base64,") == 2


def test_render_is_deterministic(report):
    from pyro_lmscm.study.report import summarize

    rows = summarize(report.records, 50)
    assert render_html(report.records, report.config, rows) == render_html(report.records, report.config, rows)


def test_report_in_headless_chromium(report, chromium_context, tmp_path):
    problems, requests = [], []
    page = chromium_context.new_page()
    page.on(
        "console",
        lambda m: problems.append(f"console.{m.type}: {m.text}") if m.type in ("error", "warning") else None,
    )
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on("requestfailed", lambda request: problems.append(f"request failed: {request.url}"))
    page.on("request", lambda request: requests.append(request.url))
    page.goto(report.files["html"].resolve().as_uri())
    page.wait_for_load_state("load")
    assert problems == []
    assert all(url.startswith(("file:", "data:")) for url in requests), requests

    rows = page.locator("#strings > tbody > tr.string-row")
    assert rows.count() == len(report.records)

    def column(key):
        values = page.eval_on_selector_all(
            "#strings > tbody > tr.string-row", f"rows => rows.map(r => r.getAttribute('data-{key}'))"
        )
        return [float(v) for v in values if v], values

    header = page.locator('th[data-sort="cf-distance"]')
    header.click()
    ascending, raw = column("cf-distance")
    assert ascending == sorted(ascending) and len(ascending) == 9
    assert not raw[-1]  # the skipped string (no value) goes last
    assert header.get_attribute("aria-sort") == "ascending"
    header.click()
    descending, raw = column("cf-distance")
    assert descending == sorted(ascending, reverse=True) and not raw[-1]
    page.locator('th[data-sort="index"]').click()
    indices, _ = column("index")
    assert indices == list(range(10))

    token = page.locator("table.al td[title]").first
    token.hover()
    assert re.search(r"p\(factual\) = .* p\(intervened\) = ", token.get_attribute("title"))
    page.locator("details summary").first.click()
    assert page.locator("details").first.get_attribute("open") is not None

    screenshot = tmp_path / "report.png"
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 10_000
    assert problems == []
