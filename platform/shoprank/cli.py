"""The ``shoprank`` command: cluster management and config inspection.

Workloads are the ``jobs/*.py`` entrypoints, run directly or with ``ray job submit``.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from shoprank import cluster
from shoprank.config import Config, load_config
from shoprank.entrypoint import user_errors
from shoprank.errors import DataError, ShopRankError
from shoprank.serving.keys import client_keys, client_keys_path, create_keys

if TYPE_CHECKING:
    from shoprank.experiment.plan import SimulationSize
    from shoprank.webui.client import ServeClient


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shoprank", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    c = commands.add_parser("cluster", help="start, stop or describe the local Ray head")
    c.add_argument("action", choices=["up", "down", "info"])
    c.add_argument("--num-cpus", type=int, default=2)
    c.add_argument("--port", type=int, default=6379)
    c.add_argument("--dashboard-port", type=int, default=8265)
    c.add_argument("--client-port", type=int, default=10001,
                   help="the Ray Client server's port (ray start always starts one; shoprank does not use it)")
    c.add_argument("--temp-dir", default=None, help="Ray's sessions and logs (default: Ray's, /tmp/ray)")

    srv = commands.add_parser("serve", help="deploy the Serve app (variants from the registry) on the running cluster")
    srv.add_argument("--config", default="demo")
    srv.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    srv.add_argument("--register", action="store_true",
                     help="first register the config's run as variant B (trained) and A (zero-shot baseline)")
    srv.add_argument("--address", default="auto", help="Ray cluster to deploy on (default: the running one)")

    var = commands.add_parser("variants", help="register a variant (a run served with an encoder and a strategy) "
                                               "in the registry, or list the registry's aliases")
    var_actions = var.add_subparsers(dest="action", required=True)
    reg = var_actions.add_parser("register", help="point a registry alias at an existing run served with an encoder "
                                                  "and a strategy, without retraining (serve it through serve.variants)")
    reg.add_argument("name", help="the registry alias to write (e.g. C); serve.variants names it")
    source = reg.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="the run to serve (its URI, as the registry records runs)")
    source.add_argument("--from-alias", help="serve the run this registry alias names now (e.g. B)")
    reg.add_argument("--encoder", default="fine_tuned", choices=["fine_tuned", "zero_shot"],
                     help="fine_tuned: the run's encoder and index; zero_shot: the pretrained encoder (default: "
                          "fine_tuned)")
    reg.add_argument("--strategy", default="ranker", choices=["ranker", "retrieval", "content", "collaborative"],
                     help="ranker: every candidate source and the trained ranker (hybrid); retrieval: every source, "
                          "no ranker; content: the encoder alone; collaborative: the item-item model alone "
                          "(docs/serving.md, 'Strategies')")
    reg.add_argument("--config", default="demo", help="the preset whose run.root holds the registry")
    reg.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    lst = var_actions.add_parser("list", help="the registry's aliases and what each serves")
    lst.add_argument("--config", default="demo")
    lst.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")

    ui = commands.add_parser("ui", help="the Gradio page comparing variants side by side (talks to Serve over HTTP)")
    ui.add_argument("--config", default="demo")
    ui.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ui.add_argument("--serve-url", default=None, help="the Serve app (default: ui.serve_url or serve.host:port)")
    ui.add_argument("--detach", action="store_true", help="run in the background (pid and log under run.root)")
    ui.add_argument("--stop", action="store_true", help="stop a page started with --detach")

    sim = commands.add_parser("simulate", help="send simulated shoppers through the Serve API, print the A/B report")
    sim.add_argument("--config", default="demo")
    sim.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    sim.add_argument("--serve-url", default=None)
    sim.add_argument("--users", type=int, default=None,
                     help="distinct simulated shoppers (default: the plan's, `shoprank experiment plan`, capped by the "
                          "simulated shop's shoppers)")
    sim.add_argument("--visits", type=int, default=None,
                     help="visits of each shopper, a simulated day apart, each 1-3 page views (default: the plan's; "
                          "1 with --users)")
    sim.add_argument("--concurrency", type=int, default=8)
    sim.add_argument("--seed", type=int, default=0)

    ev = commands.add_parser("events", help="back up or restore the SQLite event store (serve.event_db)")
    ev.add_argument("action", choices=["backup", "restore"])
    ev.add_argument("file", help="backup: the copy to write; restore: the backup to put in place")
    ev.add_argument("--config", default="demo")
    ev.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ev.add_argument("--replace", action="store_true", help="restore over a store that holds events")
    ev.add_argument("--app", metavar="URL", help="restore through the running Serve app at URL (admin key), which "
                    "pauses its writer meanwhile; the backup is a path on the app's host")

    cat = commands.add_parser("catalogue", help="change the live catalogue from a file of products (the catalogue "
                                                "change log in serve.event_db)")
    cat.add_argument("action", choices=["sync"])
    cat.add_argument("file", help="CSV, Parquet or JSON Lines: one product a row in the catalogue's schema; a true "
                                  "'deleted' column marks a row that deletes its product")
    cat.add_argument("--format", default="auto", choices=["auto", "csv", "parquet", "jsonl"],
                     help="the file's format (default: from its extension)")
    cat.add_argument("--config", default="demo")
    cat.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    cat.add_argument("--app", metavar="URL", help="send the changes through the running Serve app at URL (admin key), "
                     "in batches of at most 1000; without it they are written to the configured event store "
                     "(serve.event_db) in one transaction, which an SQLite store allows only while no app writes it")

    exp = commands.add_parser("experiment", help="plan an A/B experiment, or calibrate its tests by simulation")
    actions = exp.add_subparsers(dest="action", required=True)
    pl = actions.add_parser("plan", help="users per arm for a minimum detectable effect, or the effect a size detects")
    pl.add_argument("--metric", default="conversion_per_user",
                    help="the decision metric (docs/experiments.md), one of the readout's user-level metrics")
    pl.add_argument("--baseline", type=float, default=None,
                    help="the control's value of the metric (default for conversion per user: the demo's)")
    pl.add_argument("--std", type=float, default=None,
                    help="per-user standard deviation (default for conversion per user: sqrt(baseline (1 - baseline)))")
    size = pl.add_mutually_exclusive_group()
    size.add_argument("--mde", type=float, help="relative effect to detect (0.05: 5%% of the baseline)")
    size.add_argument("--users", type=int, help="users per arm you can get: print the effect they detect")
    pl.add_argument("--config", default="demo",
                    help="without --mde or --users: the preset whose run's offline evaluation predicts the effect")
    pl.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    pl.add_argument("--search-share", type=float, default=None,
                    help="share of page views that are searches (the rest recommendations), to weigh the tasks "
                         "(default: shoprank simulate's)")
    pl.add_argument("--pass-through", type=float, default=None,
                    help="share of the offline relative NDCG@10 change expected on the metric online (default: the "
                         "demo's measured one)")
    pl.add_argument("--alpha", type=float, default=0.05,
                    help="the family's level: with --arms N each comparison gets alpha / (N - 1)")
    pl.add_argument("--power", type=float, default=0.8)
    pl.add_argument("--arms", type=int, default=2,
                    help="variants in the experiment, the control included (A/B/n): each treatment is compared with "
                         "the control at Bonferroni's alpha / (arms - 1), the worst case of the report's Holm "
                         "correction (default 2: an A/B test)")
    cal = actions.add_parser("calibrate", help="A/A false-positive rates and A/B power of each test, by simulation "
                                               "on the simulated shop's ground truth (no Ray)")
    cal.add_argument("--config", default="demo", help="preset whose simulated shop (source.synthetic) is used")
    cal.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    cal.add_argument("--experiments", type=int, default=200, help="A/A experiments, and as many A/B ones")
    cal.add_argument("--shoppers", type=int, default=2000, help="simulated shoppers per experiment")
    cal.add_argument("--look-every", type=int, default=20, help="shoppers between two looks (page refreshes)")
    cal.add_argument("--alpha", type=float, default=0.05)
    cal.add_argument("--seed", type=int, default=0)

    rd = actions.add_parser("readout", help="the running app's A/B report as Markdown and PNG files (admin key)")
    rd.add_argument("--config", default="demo")
    rd.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    rd.add_argument("--serve-url", default=None)
    rd.add_argument("--out", default=None, help="folder of ab_readout.md and ab_readout.png (default: run.root/readout)")

    keys = commands.add_parser("keys", help="create this machine's API keys and the page's logins for a run root")
    keys.add_argument("action", choices=["create", "show"])
    keys.add_argument("--config", default="demo")
    keys.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")

    cfg = commands.add_parser("config", help="print a preset with overrides applied, validated")
    cfg.add_argument("--config", default="demo")
    cfg.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    return parser


def serve_app(preset: str, overrides: list[str], register: bool, address: str) -> str:
    """Deploy the app and say where it answers."""
    import os

    from shoprank.serving.app import AppArgs, deploy
    from shoprank.serving.variants import register_variants
    from shoprank.store.run import Run

    config = load_config(preset, overrides)
    if register:
        register_variants(config, Run.for_config(config))
    if address != "auto":
        os.environ["RAY_ADDRESS"] = address  # Serve connects to the cluster itself when it starts
    keys = create_keys(config)
    with cluster.on_loopback() if cluster.is_loopback_address(address) else contextlib.nullcontext():
        url = deploy(AppArgs(config=preset, overrides=overrides))
    docs = f"API docs: {url}/docs, OpenAPI: {url}/openapi.json" if config.serve.docs else "API docs off: serve.docs"
    return (f"Serve app: {url}  ({docs})\n{keys_note(keys)}\n"
            f"Variants: " + ", ".join(f"{name} = registry alias {alias!r}" for name, alias in config.serve.variants.items()))


def variants_command(args: argparse.Namespace) -> str:
    """``shoprank variants register|list``: write one registry alias (:func:`~shoprank.serving.variants.register_variant`,
    nothing trained), or list them with the variants the config serves."""
    from shoprank.serving.variants import register_variant
    from shoprank.store.registry import Registry

    config = load_config(args.config, args.set)
    registry = Registry(config.run.root)
    if args.action == "list":
        aliases = registry.aliases()
        served = {alias: name for name, alias in config.serve.variants.items()}
        lines = [f"{alias}: run {entry['run']}, encoder {entry.get('encoder', 'fine_tuned')}, strategy "
                 f"{entry.get('strategy', 'ranker')}" + (f" (base run {entry['base_run']})" if entry.get("base_run")
                                                          else "")
                 + (f"; served as variant {served[alias]}" if alias in served else "")
                 for alias, entry in sorted(aliases.items())]
        return "\n".join(lines) if lines else f"registry {registry.path}: no alias yet"
    entry = register_variant(registry, args.name, run=args.run, from_alias=args.from_alias, encoder=args.encoder,
                             strategy=args.strategy)
    variants = {**config.serve.variants, args.name: args.name}
    split = {name: config.serve.split.get(name, 1.0) for name in variants}
    return (f"registry alias {args.name!r}: run {entry['run']}, encoder {entry['encoder']}, strategy "
            f"{entry['strategy']} (registry {registry.path}; nothing trained)\n"
            f"Serve it as a variant: --set 'serve.variants={_flow(variants)}' --set 'serve.split={_flow(split)}' "
            "(weights are normalised; serve.control is the first variant unless set)")


def _flow(mapping: dict[str, object]) -> str:
    """A mapping as a YAML flow mapping, as ``--set`` takes it (``{A: A, B: 0.5}``)."""
    return "{" + ", ".join(f"{k}: {v:g}" if isinstance(v, float) else f"{k}: {v}" for k, v in mapping.items()) + "}"


def keys_note(path: Path) -> str:
    """Where this machine's API keys and page logins are, and what they are for."""
    return (f"API keys and the web page's logins: {path} (mode 0600; the app holds only their SHA-256). "
            "Send a key as 'Authorization: Bearer <key>': 'client' for /search, /recommend and /events, "
            "'admin' for everything; log in to the page as 'admin' (may send simulated shoppers) or 'viewer'.")


def serve_url(config: Config) -> str:
    return config.ui.serve_url or f"http://{config.serve.host}:{config.serve.port}"


def detached_ui(config: Config, preset: str, overrides: list[str], *, start: bool) -> str:
    """Stop the background page of this run root, then (``start``) start a new one and wait until it answers."""
    import os
    import signal
    import subprocess
    import time

    import httpx

    from shoprank.store.location import local_state_dir

    state = local_state_dir(config.run.root)
    pid_file = state / "ui.pid"
    if pid_file.exists():
        try:
            os.killpg(int(pid_file.read_text()), signal.SIGTERM)
        except (ProcessLookupError, ValueError, PermissionError):
            pass
        pid_file.unlink()
    if not start:
        return "Web page stopped."
    url = f"http://{config.ui.host}:{config.ui.port}"
    log = state / "ui.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "shoprank.cli", "ui", "--config", preset, *(f"--set={o}" for o in overrides)],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    pid_file.write_text(str(process.pid))
    deadline = time.time() + 180
    while time.time() < deadline:
        if process.poll() is not None:
            raise ShopRankError(f"the web page exited with status {process.returncode}; see {log}")
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return f"Web page: {url}  (Serve app: {serve_url(config)}; log {log})"
        except httpx.HTTPError:
            time.sleep(1.0)
    raise ShopRankError(f"the web page did not answer at {url} within 180 s; see {log}")


def run_simulation(config: Config, url: str, users: int | None, visits: int | None, concurrency: int,
                   seed: int) -> str:
    """Simulated shoppers with a progress bar, then the A/B report's summary. Without ``users``, the plan's shoppers
    and visits (:func:`~shoprank.experiment.plan.planned_simulation`), which the output explains; ``visits``
    defaults to 1 with ``users``."""
    from tqdm import tqdm

    from shoprank.experiment.plan import planned_simulation
    from shoprank.webui.client import ServeClient
    from shoprank.webui.page import shop_simulator
    from shoprank.webui.report import report_markdown
    from shoprank.webui.simulate import simulate

    planned = ""
    if users is None:
        try:
            result, effect, size = planned_simulation(config)
        except ShopRankError as exc:
            raise ShopRankError(f"no planned size to simulate ({exc}); give --users") from None
        users, visits = size.shoppers, visits or size.visits
        planned = (f"plan: {result.users_per_arm:,} shoppers per arm for conversion per user ({effect.explain()})\n"
                   f"{size.explain()}\n")
    visits = visits or 1
    if visits > 1 and visits + 1 > config.serve.simulated_days:
        raise ShopRankError(f"{visits} visits a day apart need serve.simulated_days of at least {visits + 1} (it is "
                            f"{config.serve.simulated_days:g}): the app refuses visits dated further ahead")
    keys = client_keys(config)
    ServeClient(url, keys["admin"]).health()  # a clear error now rather than one per shopper
    with tqdm(total=users * visits, desc="simulated visits", unit="visit") as bar:
        traffic = simulate(url, keys["client"], shop_simulator(config), users, visits=visits, concurrency=concurrency,
                           seed=seed, progress=lambda done, total: bar.update(done - bar.n))
    failed = f"; {len(traffic.errors)} failed, e.g. {traffic.errors[0]}" if traffic.errors else ""
    arms = ", ".join(f"{name} {count}" for name, count in sorted(traffic.arms.items()))
    return (f"{planned}{traffic.shoppers} shoppers, {traffic.visits} visits, {traffic.requests} requests, "
            f"{traffic.events} events{failed}\nshoppers per arm, as the router assigned them: {arms or 'none'}\n"
            + report_markdown(ServeClient(url, keys["admin"]).report()))


def planned_size(config: Config) -> "SimulationSize | None":
    """The simulation the experiment's plan asks of ``config``'s simulated shop, or None (said on stdout) when its
    run cannot be planned for: the page then offers its own default."""
    from shoprank.experiment.plan import planned_simulation

    try:
        return planned_simulation(config)[2]
    except ShopRankError as exc:
        print(f"The simulate control has no planned size: {exc}", flush=True)
        return None


def event_store_copy(config: Config, action: str, file: str, replace: bool, app: str | None = None) -> str:
    """``shoprank events backup|restore``: SQLite's online backup of the live store, or a checked restore, here
    (refused while the app writes to the store) or through the running app (``app``: its URL)."""
    from shoprank.store.events import SqliteEventStore, event_db_location, is_server_database, redacted, restore_sqlite
    from shoprank.webui.client import ServeClient

    if app is not None:
        if action != "restore":
            raise ShopRankError("--app is for restore: a backup reads the live store from this machine")
        restored = ServeClient(app, client_keys(config)["admin"], timeout_s=600.0).restore_events(
            str(Path(file).resolve()), replace)
        return f"the app at {app} restored its event store from {file}: {restored['events']} events"
    location = event_db_location(config)
    if is_server_database(location):
        raise ShopRankError(f"serve.event_db is a PostgreSQL server ({redacted(location)}): back it up with its own "
                            "tools (pg_dump / pg_restore, or your managed service's snapshots)")
    if action == "backup":
        if not Path(location).exists():
            raise ShopRankError(f"no event store at {location} (serve.event_db) to back up")
        store = SqliteEventStore(location)
        try:
            count = store.backup(file)
        finally:
            store.close()
        return f"{count} events backed up from {location} to {file}"
    count = restore_sqlite(file, location, replace=replace)
    return f"{location} restored from {file}: {count} events"


def catalogue_sync(config: Config, file: str, file_format: str, app: str | None) -> str:
    """``shoprank catalogue sync``: the file's products put and its deleted rows deleted in the catalogue change log.
    The whole file is validated first (:func:`~shoprank.data.catalogue.read_changes`), so a bad row stores nothing.
    Each run's batches get ids of their own: the same file synced again is stored again (a change it repeats
    changes no replica), and a later sync whose content equals an earlier one's (a recall after a re-listing, a
    price back to an earlier value) is never taken for a retry of it."""
    import datetime as dt
    import uuid

    from shoprank.data.catalogue import product_rows, read_changes
    from shoprank.store.events import (
        SqliteEventStore, StoreBusy, event_db_location, is_server_database, open_event_writer,
    )

    puts, deletes = read_changes(file, file_format)
    rows = product_rows(puts)
    if app is not None:
        from shoprank.webui.client import ServeClient

        client = ServeClient(app, client_keys(config)["admin"], timeout_s=600.0)
        try:
            deleted, seq = sync_through_app(client, config.serve.max_body_bytes, rows, deletes)
        finally:
            client.close()
        return f"{file}: {len(rows)} products put, {deleted} deleted through the app at {app}; change log at {seq}"
    location = event_db_location(config)
    try:
        store = (open_event_writer(location) if is_server_database(location)
                 else SqliteEventStore(location, writer=True, lock_wait_s=0.0))
    except StoreBusy:
        raise ShopRankError(f"{location} (serve.event_db) is in use: the Serve app is writing to it. Send the changes "
                            f"through the app instead: shoprank catalogue sync {file} --app URL; nothing was "
                            "stored") from None
    try:
        store.change_catalogue(rows, deletes, dt.datetime.now(dt.timezone.utc), f"sync-{uuid.uuid4().hex}")
        seq, _ = store.last_catalogue_change()
    finally:
        store.close()
    return f"{file}: {len(rows)} products put, {len(deletes)} deleted in {location}; change log at {seq}"


def sync_through_app(client: ServeClient, max_body_bytes: int, rows: list[dict],
                     deletes: list[str]) -> tuple[int, int]:
    """Send the puts in batches that fit a request (at most ``MAX_PRODUCTS_PER_REQUEST`` products, and under
    ``max_body_bytes``, ``serve.max_body_bytes``), then each delete, with a progress bar; (deleted, the log's
    position). Every row is checked against the app's own request model first (stricter than a file: no control
    character, bounded lengths), so a row the app would refuse stops the sync before anything is sent instead of
    leaving it half applied. Each batch is stored whole, under an id of this run (the ``Idempotency-Key``), so a
    batch resent after a lost answer is stored once."""
    import json
    import uuid

    from pydantic import ValidationError
    from tqdm import tqdm

    from shoprank.serving.api import MAX_PRODUCTS_PER_REQUEST, ProductIn, check_text

    for row in rows:
        try:
            ProductIn.model_validate(row)
        except ValidationError as exc:
            problem = exc.errors()[0]
            field = ".".join(str(part) for part in problem["loc"]) or "product"
            raise DataError(f"product {row.get('product_id')!r}, field {field!r}: {problem['msg']} (the app's PUT "
                            "/products would refuse it); nothing was sent") from None
    for product_id in deletes:
        try:
            check_text(product_id)
        except ValueError as exc:
            raise DataError(f"deleted product {product_id!r}: {exc} (the app's DELETE /products would refuse it); "
                            "nothing was sent") from None
    run = uuid.uuid4().hex

    budget = max_body_bytes * 0.9  # the JSON array's brackets and commas, and a margin
    batches: list[list[dict]] = [[]]
    size = 0
    for row in rows:
        row_size = len(json.dumps(row, ensure_ascii=False).encode()) + 1
        if batches[-1] and (len(batches[-1]) == MAX_PRODUCTS_PER_REQUEST or size + row_size > budget):
            batches.append([])
            size = 0
        batches[-1].append(row)
        size += row_size
    seq = deleted = 0
    with tqdm(total=len(rows) + len(deletes), desc="catalogue changes", unit="product") as bar:
        for i, batch in enumerate(b for b in batches if b):
            seq = client.put_products(batch, f"sync-{run}-put-{i}")["seq"]
            bar.update(len(batch))
        for i, product_id in enumerate(deletes):
            answer = client.delete_product(product_id, f"sync-{run}-delete-{i}")
            seq, deleted = answer["seq"], deleted + answer["deleted"]
            bar.update(1)
    return deleted, seq


def write_readout(config: Config, url: str, out: Path) -> str:
    """``shoprank experiment readout``: the app's ``/ab/report`` (admin key) as ``ab_readout.md`` and
    ``ab_readout.png`` in ``out``; where they are and the verdict."""
    from shoprank.experiment.readout import readout_png
    from shoprank.store.location import Location
    from shoprank.webui.client import ServeClient
    from shoprank.webui.report import report_markdown

    report = ServeClient(url, client_keys(config)["admin"]).report()
    markdown = out / "ab_readout.md"
    Location(str(out)).write_text(report_markdown(report) + "\n", markdown.name)
    readout_png(report, out / "ab_readout.png")
    verdict = (report.get("user_level") or {}).get("verdict")
    decision = f"{verdict['decision']} ({verdict['rule']})" if verdict else "none yet (both variants need users)"
    return f"A/B readout: {markdown} and {out / 'ab_readout.png'}\nVerdict: {decision}"


def plan_command(args: argparse.Namespace) -> str:
    """``shoprank experiment plan``: users per arm for the effect given (``--mde``) or predicted by the config's
    run's offline evaluation, or the effect ``--users`` detect; with the predicted effect, the simulation it asks
    of the config's simulated shop."""
    from shoprank.experiment.plan import (DEMO_CONVERSION_PER_USER, PASS_THROUGH, SEARCH_SHARE, binary_sigma,
                                          evaluation_table, plan, predicted_effect, simulation_size)
    from shoprank.experiment.userstats import PER_USER_METRICS, RATIO_METRICS
    from shoprank.store.run import Run

    metrics = (*PER_USER_METRICS, *RATIO_METRICS)
    if args.metric not in metrics:
        raise ShopRankError(f"--metric {args.metric!r} is none of the readout's user-level metrics: "
                            f"{', '.join(metrics)}")
    if args.metric != "conversion_per_user" and (args.baseline is None or args.std is None):
        raise ShopRankError(f"--metric {args.metric} needs --baseline and --std (the control's mean and per-user "
                            "standard deviation, from a readout): only conversion per user, a yes/no per user, has "
                            "a default")
    baseline = DEMO_CONVERSION_PER_USER if args.baseline is None else args.baseline
    lines = [f"decision metric: {args.metric}"]
    config = None
    mde = args.mde
    if mde is None and args.users is None:
        config = load_config(args.config, args.set)
        effect = predicted_effect(evaluation_table(Run.for_config(config)),
                                  SEARCH_SHARE if args.search_share is None else args.search_share,
                                  PASS_THROUGH if args.pass_through is None else args.pass_through)
        lines.append(effect.explain())
        mde = effect.relative_effect
    if args.arms < 2:
        raise ShopRankError(f"--arms {args.arms}: an experiment has at least 2 arms (a control and a treatment)")
    try:
        sigma = args.std if args.std is not None else binary_sigma(baseline)
        result = plan(baseline, sigma, relative_effect=mde, users=args.users, alpha=args.alpha,
                      target_power=args.power, arms=args.arms)
    except ValueError as exc:  # a baseline, power or size the maths cannot take: said as the option's problem
        raise ShopRankError(f"cannot plan: {exc}") from None
    relative = "" if result.relative_effect is None else f" ({result.relative_effect:.2%} of the baseline)"
    whose = "" if args.baseline is not None else " (the demo's)"
    level = (f"alpha {result.alpha:g} (two-sided)" if result.arms == 2 else
             f"alpha {result.alpha:.4g} per comparison (two-sided): {args.alpha:g} split by Bonferroni over the "
             f"{result.arms - 1} comparisons with the control, the worst case of the report's Holm correction")
    together = "both arms" if result.arms == 2 else f"all {result.arms} arms"
    lines += [f"baseline {result.baseline:g}{whose}, per-user standard deviation {result.sigma:.4g}, "
              f"{level}, power {result.power:g}",
              f"users per arm: {result.users_per_arm:,} ({together}: {result.total_users:,})",
              f"minimum detectable effect: {result.minimum_detectable_effect:.4g}{relative}",
              f"watched live (always-valid test tuned for this size): the interval is "
              f"{result.sequential_width_factor:.2f} times the fixed-horizon one; the same power needs about "
              f"{result.sequential_users_per_arm:,} users per arm"]
    if config is not None and config.source.kind == "synthetic":
        lines.append(simulation_size(result, config.source.synthetic.num_users).explain())
    lines.append(f"total: {result.total_users:,} users")
    return "\n".join(lines)


def experiment_command(args: argparse.Namespace) -> str:
    """``shoprank experiment plan|calibrate`` (numbers only, no cluster) and ``readout`` (the running app's)."""
    if args.action == "readout":
        config = load_config(args.config, args.set)
        if not args.out and "://" in config.run.root:
            raise ShopRankError(f"run.root is {config.run.root}: name a local folder for the readout with --out")
        out = Path(args.out) if args.out else Path(config.run.root) / "readout"
        return write_readout(config, args.serve_url or serve_url(config), out)
    if args.action == "plan":
        return plan_command(args)
    from shoprank.data.synthetic import ShopModel
    from shoprank.experiment.calibrate import calibrate

    config = load_config(args.config, args.set)
    result = calibrate(ShopModel.build(config.source.synthetic), args.experiments, args.shoppers, args.look_every,
                       args.alpha, args.seed)
    return result.table() + f"\n{result.seconds_per_experiment:.2f} s per simulated experiment."


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    with user_errors():
        if args.command == "cluster":
            head = cluster.LocalCluster(gcs_port=args.port, dashboard_port=args.dashboard_port, num_cpus=args.num_cpus,
                                        temp_dir=args.temp_dir, client_port=args.client_port)
            if args.action == "up":
                cluster.start(head)
                print(cluster.how_to_reach(head))
            elif args.action == "down":
                stopped = cluster.stop(head)
                print(f"Ray head on port {head.gcs_port}: {stopped} processes stopped" if stopped
                      else f"No Ray head on port {head.gcs_port}.")
            else:
                state = "running" if cluster.dashboard_ready(head) else "not running"
                print(f"Ray head is {state}.\n{cluster.how_to_reach(head)}")
        elif args.command == "serve":
            print(serve_app(args.config, args.set, args.register, args.address))
        elif args.command == "variants":
            print(variants_command(args))
        elif args.command == "ui" and (args.detach or args.stop):
            config = load_config(args.config, args.set)
            print(detached_ui(config, args.config, args.set, start=args.detach))
        elif args.command == "ui":
            config = load_config(args.config, args.set)
            url = args.serve_url or serve_url(config)
            print(f"Web page: http://{config.ui.host}:{config.ui.port}  (Serve app: {url})", flush=True)
            from shoprank.webui.page import launch, shop_simulator  # Gradio: 4 s of imports `cluster` need not pay

            launch(url, client_keys(config), config.ui.host, config.ui.port, lambda: shop_simulator(config),
                   planned_size(config))
        elif args.command == "simulate":
            config = load_config(args.config, args.set)
            print(run_simulation(config, args.serve_url or serve_url(config), args.users, args.visits, args.concurrency,
                                 args.seed))
        elif args.command == "events":
            print(event_store_copy(load_config(args.config, args.set), args.action, args.file, args.replace, args.app))
        elif args.command == "catalogue":
            print(catalogue_sync(load_config(args.config, args.set), args.file, args.format, args.app))
        elif args.command == "experiment":
            print(experiment_command(args))
        elif args.command == "keys":
            config = load_config(args.config, args.set)
            path = create_keys(config) if args.action == "create" else client_keys_path(config)
            print(keys_note(path))
        elif args.command == "config":
            config = load_config(args.config, args.set)
            print(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
