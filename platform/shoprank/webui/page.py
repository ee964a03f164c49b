"""The Gradio page: two variants side by side, clicks as events, the live A/B/n test.

It talks to the Serve app over HTTP only (:class:`~shoprank.webui.client.ServeClient`).

* **Compare**: two dropdowns choose which of the served variants (``/variants``) stand
  side by side, the control and the first treatment by default; a query and/or a user
  (the shop's users, each with a one-line summary of their history, or "new user"); both
  chosen variants answer the same request (forced, so the A/B report leaves these answers
  out). Each card shows rank, title, category,
  brand, price, score and the features that placed it; its buttons send a click, an
  add-to-cart or a purchase to ``/events`` and both columns refresh, so the effect
  of the event on the next answer is visible at once. "Not interested" and "Hide
  brand" send the shopper's hide of the product or of its brand: the card is gone
  from both columns at once, and stays gone for that shopper in every answer.
* **A/B test**: ``/ab/report`` refreshed every few seconds, the verdict first
  (:func:`shoprank.webui.report.report_markdown`): the verdict, the decision metric's
  user-level effect and interval, the guardrails and the sample-ratio check; then the
  user-level details; last the per-impression figures, marked descriptive; CTR and
  conversion over time; and a control that sends simulated shoppers through the API
  (:mod:`shoprank.webui.simulate`).

Serve down, slow or empty answers show as a message on the page; the page keeps
working and recovers when Serve is back.
"""

from __future__ import annotations

import html
import uuid
from typing import Any

import gradio as gr
import pandas as pd

from shoprank.data.synthetic import ShopSimulator
from shoprank.errors import ShopRankError
from shoprank.experiment.plan import MAX_VISITS, SimulationSize
from shoprank.recsys.messages import BASE, OTHER
from shoprank.webui.client import ServeClient, ServeError
from shoprank.webui.report import report_markdown
from shoprank.webui.simulate import simulate

NEW_USER = "new user"
DEFAULT_SHOWN = ("A", "B")
"""The variants side by side until ``/variants`` names the served ones (the control and the first treatment)."""
ACTIONS = (("click", "Click"), ("add_to_cart", "Add to cart"), ("purchase", "Buy"),
           ("not_interested", "Not interested"), ("not_interested_brand", "Hide brand"))
"""A card's buttons: the event each sends (``/events``) and its label."""
TOP_FEATURES = 3
CSS = """
.card { border: 1px solid var(--border-color-primary); border-radius: 8px; padding: 6px 10px; }
.card .title { font-weight: 600; }
.card .meta, .card .why { font-size: 0.85em; color: #4b5563; }
.actions button { min-width: 0; }
"""


def card(item: dict[str, Any], variant: str) -> str:
    """One product card's HTML (escaped)."""
    reasons = [(name, value) for name, value in item["contributions"].items() if name not in (OTHER, BASE)]
    why = ", ".join(f"{name} {value:+.2f}" for name, value in reasons[:TOP_FEATURES])
    known = "".join(f"{html.escape(item[name])} · " for name in ("category", "brand") if item.get(name))  # null: unknown
    return (
        f'<div class="card card-{variant}" data-product="{html.escape(item["product_id"])}">'
        f'<div class="title">#{item["rank"]} {html.escape(item["title"])}</div>'
        f'<div class="meta">{known}'
        f'${item["price"]:.2f} · score {item["score"]:.3f}</div>'
        f'<div class="why">why: {html.escape(why)}</div></div>'
    )


def timeline_frame(report: dict[str, Any]) -> pd.DataFrame:
    frame = pd.DataFrame(report.get("timeline") or [], columns=["ts", "variant", "impressions", "ctr", "conversion"])
    frame["time"] = pd.to_datetime(frame["ts"], unit="s")
    return frame


def build_page(serve_url: str, keys: dict[str, Any], simulator_factory: Any = None,
               timeout_s: float = 30.0, planned: SimulationSize | None = None) -> gr.Blocks:
    """The page for the Serve app at ``serve_url``; ``keys``: the API keys (:func:`shoprank.serving.keys.client_keys`);
    ``simulator_factory()`` builds the shop for simulations, ``planned`` (the experiment's plan,
    :func:`~shoprank.experiment.plan.planned_simulation`) sizes them unless the admin says otherwise.

    Shoppers' calls (search, recommend, events) go with the client key, the report, the users and the variants
    with the admin key; only the page's ``admin`` login may send simulated shoppers into the live test.
    """
    shop = ServeClient(serve_url, keys["client"], timeout_s=timeout_s)
    client = ServeClient(serve_url, keys["admin"], timeout_s=timeout_s)

    def user_choices() -> tuple[list[str], str]:
        try:
            users = client.users()
        except ServeError as exc:
            return [NEW_USER], f"⚠️ {exc}"
        return [NEW_USER] + [f"{u['user_id']} · {u['summary']}" for u in users], ""

    def user_of(choice: str | None, anonymous: str) -> str:
        return anonymous if not choice or choice == NEW_USER else choice.split(" · ", 1)[0]

    def variant_choices() -> tuple[gr.Dropdown, gr.Dropdown, str]:
        """The two variant pickers over the served variants: the control on the left, the first treatment on the
        right (``/variants``); A and B while Serve cannot say."""
        try:
            served = client.variants()
        except ServeError as exc:
            return (gr.Dropdown(choices=list(DEFAULT_SHOWN), value=DEFAULT_SHOWN[0]),
                    gr.Dropdown(choices=list(DEFAULT_SHOWN), value=DEFAULT_SHOWN[1]), f"⚠️ {exc}")
        names = list(served.get("variants") or served.get("split") or DEFAULT_SHOWN)
        control = served.get("control") if served.get("control") in names else names[0]
        treatment = next((name for name in names if name != control), control)
        return gr.Dropdown(choices=names, value=control), gr.Dropdown(choices=names, value=treatment), ""

    def ask(query: str, choice: str | None, k: int, anonymous: str, last: dict[str, Any],
            left: str | None = None, right: str | None = None) -> tuple[dict[str, Any], str]:
        """The two chosen variants' answers to the same request (or the last one again when ``query`` is None)."""
        user = user_of(choice, anonymous)
        query = (query or "").strip()
        shown = list(dict.fromkeys(v for v in (left or DEFAULT_SHOWN[0], right or DEFAULT_SHOWN[1])))
        answers: dict[str, Any] = {"query": query, "user": user, "kind": "search" if query else "recommend",
                                   "shown": shown}
        problems = []
        for variant in shown:
            try:
                answer = (shop.search(query, user, int(k), variant) if query
                          else shop.recommend(user, int(k), variant))
                answers[variant] = answer
                if not answer["items"]:
                    problems.append(f"Variant {variant} found nothing for this request.")
            except ServeError as exc:
                answers[variant] = None
                problems.append(str(exc))
        answered = "both variants answered" if len(shown) == 2 else f"variant {shown[0]} answered"
        status = "⚠️ " + " ".join(dict.fromkeys(problems)) if problems else (
            f"{'Search' if query else 'Recommendations'} for {user}: {answered}.")
        return answers, status

    def reask(last: dict[str, Any], k: int, left: str, right: str) -> tuple[dict[str, Any], str]:
        """Another pair of variants chosen: the last request again, answered by them (nothing asked yet: nothing)."""
        if not last.get("user"):
            return last, ""
        refreshed, status = ask(last.get("query", ""), last["user"], k, last["user"], last, left, right)
        refreshed["user"] = last["user"]
        return refreshed, status

    def act(last: dict[str, Any], variant: str, item: dict[str, Any], kind: str, k: int) -> tuple[dict[str, Any], str]:
        answer = last.get(variant) or {}
        event = {"user_id": last["user"], "product_id": item["product_id"], "event_type": kind,
                 "request_id": answer.get("request_id"), "variant": variant, "position": item["rank"],
                 "query": last.get("query") or None}
        try:
            shop.events([event])
        except ServeError as exc:
            return last, f"⚠️ {exc}"
        shown = last.get("shown") or list(DEFAULT_SHOWN)
        refreshed, status = ask(last.get("query", ""), last["user"], k, last["user"], last, shown[0], shown[-1])
        refreshed["user"] = last["user"]
        verb = dict(ACTIONS)[kind].lower()
        return refreshed, f"Sent: {last['user']} {verb} “{item['title']}” (variant {variant}). {status}"

    def refresh_report() -> tuple[str, pd.DataFrame, pd.DataFrame]:
        try:
            report = client.report()
        except ServeError as exc:
            empty = timeline_frame({})
            return f"⚠️ {exc}", empty, empty
        frame = timeline_frame(report)
        return report_markdown(report), frame, frame

    def run_simulation(users: float, visits: float, request: gr.Request, progress: gr.Progress = gr.Progress()) -> str:
        if request.username != "admin":
            return "⚠️ Sending simulated shoppers into the live test needs the page's admin login."
        if simulator_factory is None:
            return "⚠️ Simulation needs the simulated shop (start the page with `shoprank ui`)."
        progress(0.0, desc="building the simulated shop")
        simulator = simulator_factory()
        try:
            traffic = simulate(serve_url, keys["client"], simulator, int(users), visits=int(visits),
                               progress=lambda done, total: progress(done / total, desc=f"{done}/{total} visits"))
        except ShopRankError as exc:
            return f"⚠️ {exc}"
        arms = ", ".join(f"{name} {count}" for name, count in sorted(traffic.arms.items()))
        note = (f"{traffic.shoppers} shoppers, {traffic.visits} visits, {traffic.requests} requests, "
                f"{traffic.events} events sent (shoppers per arm, as the router assigned them: {arms or 'none'}).")
        if traffic.errors:
            note += f" ⚠️ {len(traffic.errors)} shoppers failed: {traffic.errors[0]}"
        try:
            return note + "\n\n```\n" + report_markdown(client.report()) + "\n```"
        except ServeError as exc:
            return note + f"\n\n⚠️ {exc}"

    with gr.Blocks(title="shoprank: A/B") as page:
        anonymous = gr.State(lambda: f"web-{uuid.uuid4().hex[:8]}")
        last = gr.State({})
        gr.Markdown(f"## shoprank: variants side by side\nServe app: `{serve_url}`")
        status = gr.Markdown(elem_id="status")
        with gr.Tab("Compare", id="compare"):
            with gr.Row():
                left = gr.Dropdown(label="Left: variant", choices=list(DEFAULT_SHOWN), value=DEFAULT_SHOWN[0],
                                   elem_id="left-variant", allow_custom_value=False)
                right = gr.Dropdown(label="Right: variant", choices=list(DEFAULT_SHOWN), value=DEFAULT_SHOWN[1],
                                    elem_id="right-variant", allow_custom_value=False)
            with gr.Row():
                query = gr.Textbox(label="Search", placeholder="e.g. black skillet (empty: recommendations)",
                                   scale=3, elem_id="query")
                user = gr.Dropdown(label="Shopper", choices=[NEW_USER], value=NEW_USER, scale=3, elem_id="user",
                                   allow_custom_value=False)
                k = gr.Slider(1, 20, value=5, step=1, label="Results", scale=1)
            with gr.Row():
                search_button = gr.Button("Search / recommend", variant="primary", elem_id="ask")
                reload_users = gr.Button("Reload shoppers", size="sm")

            @gr.render(inputs=[last, k])
            def columns(answers: dict[str, Any], k_value: int) -> None:
                with gr.Row(equal_height=False):
                    for variant in answers.get("shown") or DEFAULT_SHOWN:
                        with gr.Column(elem_classes=[f"column-{variant}"]):
                            gr.Markdown(f"### Variant {variant}")
                            answer = answers.get(variant)
                            if not answers:
                                gr.Markdown("Type a query or pick a shopper, then press the button.")
                                continue
                            if answer is None:
                                gr.Markdown("No answer from this variant (see the message above).")
                                continue
                            if not answer["items"]:
                                gr.Markdown("Nothing found.")
                            for item in answer["items"]:
                                with gr.Group():
                                    gr.HTML(card(item, variant))
                                    with gr.Row(elem_classes=["actions"]):
                                        for kind, label in ACTIONS:
                                            if kind == "not_interested_brand" and not item.get("brand"):
                                                continue  # a product without a brand has none to hide
                                            button = gr.Button(label, size="sm", elem_classes=[f"{kind}-{variant}"])
                                            button.click(
                                                lambda state, kv, v=variant, i=item, e=kind: act(state, v, i, e, kv),
                                                inputs=[last, k], outputs=[last, status],
                                            )

        with gr.Tab("A/B test", id="ab"):
            with gr.Row():
                shoppers = gr.Number(value=planned.shoppers if planned else 200, precision=0, minimum=1,
                                     maximum=100_000, label="Simulated shoppers")
                visits = gr.Number(value=planned.visits if planned else 1, precision=0, minimum=1, maximum=MAX_VISITS,
                                   label="Visits each (a day apart)")
                simulate_button = gr.Button("Send simulated shoppers", elem_id="simulate")
            simulation = gr.Markdown(planned.explain() if planned else "")
            figures = gr.Markdown("Loading the A/B report...", elem_id="ab-figures")
            with gr.Row():
                ctr_plot = gr.LinePlot(x="time", y="ctr", color="variant", title="CTR per impression over time (cumulative, descriptive)",
                                       height=260)
                conversion_plot = gr.LinePlot(x="time", y="conversion", color="variant",
                                              title="Conversion per impression over time (cumulative, descriptive)", height=260)
            timer = gr.Timer(3.0)

        def load_users() -> tuple[gr.Dropdown, str]:
            choices, problem = user_choices()
            return gr.Dropdown(choices=choices, value=NEW_USER), problem

        def load_pickers() -> tuple[gr.Dropdown, gr.Dropdown, gr.Dropdown, str]:
            users, user_problem = load_users()
            chosen_left, chosen_right, variant_problem = variant_choices()
            return users, chosen_left, chosen_right, " ".join(p for p in (user_problem, variant_problem) if p)

        page.load(load_pickers, outputs=[user, left, right, status])
        reload_users.click(load_users, outputs=[user, status])
        search_button.click(ask, inputs=[query, user, k, anonymous, last, left, right], outputs=[last, status])
        query.submit(ask, inputs=[query, user, k, anonymous, last, left, right], outputs=[last, status])
        for picker in (left, right):
            picker.input(reask, inputs=[last, k, left, right], outputs=[last, status])
        timer.tick(refresh_report, outputs=[figures, ctr_plot, conversion_plot])
        page.load(refresh_report, outputs=[figures, ctr_plot, conversion_plot])
        simulate_button.click(run_simulation, inputs=[shoppers, visits], outputs=[simulation])
    return page


def logins(keys: dict[str, Any]) -> list[tuple[str, str]]:
    """The page's (user, password) pairs: ``admin`` (may simulate) and ``viewer``."""
    return sorted(keys["page_logins"].items())


def launch(serve_url: str, keys: dict[str, Any], host: str, port: int, simulator_factory: Any = None,
           planned: SimulationSize | None = None) -> None:
    build_page(serve_url, keys, simulator_factory, planned=planned).launch(
        server_name=host, server_port=port, css=CSS, show_error=False, auth=logins(keys))


def shop_simulator(config: Any) -> ShopSimulator:
    """The simulated shop of ``config`` (its ground truth drives simulated shoppers)."""
    return ShopSimulator(config.source.synthetic)
