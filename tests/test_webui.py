"""The Gradio page in a real browser (Debian's chromium through playwright) against the real
Serve app; and simulated shoppers through the API."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright
from ray import serve

from conftest import App
from shoprank.data.io import read_table
from shoprank.data.schema import PRODUCT_SCHEMA
from shoprank.data.synthetic import ShopSimulator
from shoprank.entrypoint import free_port
from shoprank.webui.page import CSS, build_page, logins
from shoprank.webui.report import PER_IMPRESSION_TITLE
from shoprank.webui.simulate import simulate

CHROMIUM = "/usr/bin/chromium"
OUTPUT = Path(__file__).resolve().parents[1] / "test-output" / "webui"


@pytest.fixture(scope="module")
def page_url(app: App) -> Iterator[str]:
    port = free_port()
    page = build_page(app.url, app.keys, lambda: ShopSimulator(app.config.source.synthetic), timeout_s=20.0)
    page.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, css=CSS, quiet=True,
                auth=logins(app.keys))
    yield f"http://127.0.0.1:{port}"
    page.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs Debian's chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM,
                                             args=["--headless", "--no-sandbox", "--disable-gpu"])
        yield browser
        browser.close()


def _logged_in(browser: Browser, page_url: str, user: str, password: str) -> tuple[BrowserContext, Page]:
    """A new browser tab through the page's login form."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.goto(page_url)
    page.get_by_label("username").fill(user)
    page.get_by_label("password").fill(password)
    page.get_by_role("button", name="Login").click()
    expect(page.locator("#ask")).to_be_visible(timeout=60_000)
    return context, page


@pytest.fixture
def tab(browser: Browser, page_url: str, app: App) -> Iterator[Page]:
    context, page = _logged_in(browser, page_url, "admin", app.keys["page_logins"]["admin"])
    yield page
    context.close()


def test_the_page_needs_a_login_and_only_the_admin_sends_simulated_shoppers(browser: Browser, page_url: str,
                                                                            app: App) -> None:
    assert httpx.get(f"{page_url}/config").status_code == 401  # the page's API too, not only its form
    context, page = _logged_in(browser, page_url, "viewer", app.keys["page_logins"]["viewer"])
    try:
        page.get_by_role("tab", name="A/B test").click()
        page.locator("#simulate").click()
        expect(page.get_by_text("needs the page's admin login")).to_be_visible(timeout=30_000)
    finally:
        context.close()
    context = browser.new_context()
    page = context.new_page()
    try:
        page.goto(page_url)
        page.get_by_label("username").fill("admin")
        page.get_by_label("password").fill("not the password")
        page.get_by_role("button", name="Login").click()
        expect(page.get_by_text(re.compile("incorrect", re.IGNORECASE))).to_be_visible(timeout=30_000)
        assert page.locator("#ask").count() == 0
    finally:
        context.close()


def _ab_figures(tab: Page) -> str:
    tab.get_by_role("tab", name="A/B test").click()
    figures = tab.locator("#ab-figures")
    expect(figures).to_contain_text("variant", timeout=30_000)
    return figures.inner_text()


def test_side_by_side_buy_in_b_changes_the_ab_counts_and_a_hidden_card_leaves_both_columns(app: App,
                                                                                           tab: Page) -> None:
    OUTPUT.mkdir(parents=True, exist_ok=True)
    query = read_table(app.run, "data", "query_pairs", columns=["query"]).column("query")[0].as_py()
    before = _ab_figures(tab)
    tab.get_by_role("tab", name="Compare").click()
    tab.locator("#query textarea").fill(query)
    tab.locator("#ask").click()
    expect(tab.locator(".card-A").first).to_be_visible(timeout=60_000)
    expect(tab.locator(".card-B").first).to_be_visible(timeout=60_000)
    assert tab.locator(".card-A").count() >= 1 and tab.locator(".card-B").count() >= 1
    tab.screenshot(path=str(OUTPUT / "side_by_side.png"), full_page=False)
    tab.locator(".purchase-B").first.click()
    expect(tab.locator("#status")).to_contain_text("Sent:", timeout=60_000)
    expect(tab.locator(".card-B").first).to_be_visible(timeout=60_000)
    tab.get_by_role("tab", name="A/B test").click()
    figures = tab.locator("#ab-figures")
    expect(figures).not_to_have_text(before, timeout=30_000)
    expect(figures).to_contain_text(re.compile(r"B: \d+ shown, \d+ clicks, \d+ carts, [1-9]\d* purchases"))
    expect(figures).to_contain_text(re.compile(r"Offline, test split .* B: .*search [01]\.\d{4}"))
    expect(figures).to_contain_text("Unit: the user.")  # the user-level readout (experiment.readout)
    tab.screenshot(path=str(OUTPUT / "ab_tab.png"), full_page=False)

    # issue 38: "Not interested" on a card of A takes the product out of both columns at once
    tab.get_by_role("tab", name="Compare").click()
    hidden = tab.locator(".card-A").first.get_attribute("data-product")
    tab.locator(".not_interested-A").first.click()
    expect(tab.locator("#status")).to_contain_text("not interested", timeout=60_000)
    expect(tab.locator(".card-A").first).to_be_visible(timeout=60_000)
    expect(tab.locator(f'.card[data-product="{hidden}"]')).to_have_count(0, timeout=30_000)


def test_the_ab_tab_opens_with_the_verdict_and_puts_per_impression_figures_below(app: App, tab: Page,
                                                                                 tmp_path: Path) -> None:
    """After simulated shoppers: the tab's figures start with the verdict, visible without scrolling, then the
    decision metric, the guardrails and the sample ratio; the per-impression section comes after them in the DOM,
    under its line saying it is descriptive (with the A/A rate)."""
    traffic = simulate(app.url, app.keys["client"], ShopSimulator(app.config.source.synthetic), 16, concurrency=4,
                       seed=11)
    assert not traffic.errors
    report = app.report_once(lambda report: all(report["variants"][v]["users"] >= 2 for v in ("A", "B")))
    # the simulated shoppers are the run's: their pre-period comes from its event log, joined by pseudonym
    section = report["user_level"]
    assert section["users_with_history"] > 0 and section["pre_period"].startswith("the run's event log")
    tab.get_by_role("tab", name="A/B test").click()
    figures = tab.locator("#ab-figures")
    # the page's timer has read a report with these shoppers in it
    expect(figures).to_contain_text(re.compile(rf"Sample ratio: users A ([1-9]\d*), B ([1-9]\d*)"), timeout=30_000)
    expect(figures).to_contain_text(re.compile(r"Decision metric: conversion per user \(per user, welch"))
    verdict = figures.locator("strong", has_text=re.compile(r"^Verdict: "))
    descriptive = figures.locator("strong", has_text=PER_IMPRESSION_TITLE)
    expect(verdict).to_be_visible()
    text = figures.inner_text().strip()
    assert text.startswith("Verdict: ")
    markers = ("Verdict: ", "Decision metric: ", "Guardrails:", "Sample ratio:", "Unit: the user.",
               PER_IMPRESSION_TITLE, "B vs A per impression")
    order = [text.find(marker) for marker in markers]
    assert -1 not in order and order == sorted(order), (dict(zip(markers, order)), text[:3000])
    assert "in A/A calibration" in text and "9.5% (CTR)" in text
    follows = verdict.evaluate("(first, later) => !!(first.compareDocumentPosition(later) & "
                               "Node.DOCUMENT_POSITION_FOLLOWING)", descriptive.element_handle())
    assert follows
    box, viewport = verdict.bounding_box(), tab.viewport_size
    assert box is not None and viewport is not None and 0 <= box["y"] and box["y"] + box["height"] <= viewport["height"]
    shot = tmp_path / "ab_tab_verdict_first.png"
    tab.screenshot(path=str(shot), full_page=False)
    assert shot.read_bytes().startswith(b"\x89PNG")


def test_simulated_shoppers_fill_the_report(app: App) -> None:
    simulator = ShopSimulator(app.config.source.synthetic)
    seen = []
    traffic = simulate(app.url, app.keys["client"], simulator, 24, concurrency=4, seed=5, progress=lambda done, total: seen.append(done))
    assert traffic.shoppers == 24 and not traffic.errors and traffic.requests >= 24
    assert sorted(seen) == list(range(1, 25))
    report = app.report_once(lambda report: all(report["variants"][v]["impressions"] > 0 for v in ("A", "B")))
    assert all(report["variants"][v]["impressions"] > 0 for v in ("A", "B"))
    assert report["timeline"] and {"ctr", "conversion"} <= report["timeline"][-1].keys()


def test_with_serve_stopped_the_page_says_so_and_the_restarted_app_keeps_every_event_and_catalogue_change(
        app: App, tab: Page) -> None:
    """One stop and start of Serve (a deployment of the whole app takes most of a minute here)
    serves three promises: the page names the outage and works again once Serve is back; the
    restarted app keeps every accepted event and reads its shoppers' live events from the
    store (a shopper known only by what they just bought gets a personal answer, not a cold
    start's); and its replicas replay the catalogue change log (a product put before the stop
    is found by its title, one deleted before it is in no answer)."""
    user, product = "restart-user", next(iter(app.category_of))
    ids = {f"restart-{i}" for i in range(5)}
    assert app.post("/events", [{"user_id": user, "product_id": product, "event_type": "purchase", "event_id": i}
                                for i in sorted(ids)]).status_code == 200
    stored_before = app.stored_event_ids()
    assert ids <= stored_before
    withdrawn = sorted(app.category_of)[-1]
    withdrawn_row = next(r for r in read_table(app.run, "data", "products").to_pylist()
                         if r["product_id"] == withdrawn)
    put = {"product_id": "LIVE-RESTART", "title": "Zephyrine restart kettle", "description": None, "category": None,
           "brand": None, "price": 19.0, "attributes": {}}
    assert app.http.put("/products", json=[put]).status_code == 200
    assert app.http.delete(f"/products/{withdrawn}").status_code == 200
    serve.shutdown()  # the proxy too: nothing listens on the Serve port
    try:
        with pytest.raises(httpx.HTTPError):
            app.http.get("/healthz").raise_for_status()
        tab.locator("#query textarea").fill("anything")
        tab.locator("#ask").click()
        expect(tab.locator("#status")).to_contain_text("is not reachable", timeout=60_000)
        assert "Traceback" not in tab.content()
    finally:
        app.deploy()
    assert stored_before <= app.stored_event_ids()
    try:
        for variant in ("A", "B"):
            found = app.post("/search", {"query": "zephyrine restart kettle", "k": 10, "variant": variant}).json()
            assert "LIVE-RESTART" in [i["product_id"] for i in found["items"]], (variant, found)
            gone = app.post("/search", {"query": withdrawn_row["title"], "k": 36, "variant": variant}).json()
            assert withdrawn not in [i["product_id"] for i in gone["items"]], (variant, gone)
    finally:  # the shop as it was: the kettle withdrawn, the product listed again as the run holds it
        app.http.delete("/products/LIVE-RESTART")
        app.http.put("/products", json=[{name: dict(withdrawn_row["attributes"] or ()) if name == "attributes"
                                         else withdrawn_row[name] for name in PRODUCT_SCHEMA.names}])
    answer = app.post("/recommend", {"user_id": user, "k": 10, "variant": "B"})
    assert answer.status_code == 200 and answer.json()["items"]
    assert answer.json()["note"] is None, "the restarted replica read the shopper's purchases from the store"
    tab.locator("#ask").click()
    expect(tab.locator("#status")).to_contain_text("both variants answered", timeout=60_000)
    expect(tab.locator(".card-B").first).to_be_visible(timeout=30_000)
