"""Shared fixtures: one local Ray cluster per test session, one tiny run built once, one PostgreSQL server."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# Token authentication stays on, as on every shoprank cluster; Ray reads the mode once,
# when it is first imported, so it must be in the environment before `import ray`.
os.environ.setdefault("RAY_AUTH_MODE", "token")
# Ray Train starts a preemption watcher actor beside each training run's workers: observability for cloud nodes
# that are taken back, which the tests' local nodes never are. Off, a run starts a process fewer (about 1.5 s of CPU:
# a worker importing Ray Train). Ray Train passes it on to its controllers; the tests' subprocesses inherit it.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

import httpx  # noqa: E402
import pytest  # noqa: E402
import ray  # noqa: E402
from ray import serve  # noqa: E402

from postgres import PostgresServer
from shoprank.cli import main
from shoprank.config import Config, load_config
from shoprank.data.io import read_table
from shoprank.entrypoint import free_port, local_ray_options
from shoprank.privacy import Pseudonyms, pseudonyms
from shoprank.serving.app import APP_NAME, AppArgs, bind_app, deploy
from shoprank.serving.keys import client_keys, create_keys
from shoprank.serving.variants import register_variants
from shoprank.store.events import open_event_store
from shoprank.store.run import Run
from shoprank.stages import run_stages

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """A real local Ray cluster with 2 CPUs, shut down when the session ends.

    Started like an entrypoint's local cluster (``local_ray_options``), with its dashboard:
    Ray Train's placement-group cleaner asks the State API whether a controller still
    lives, and without an answer the placement group of a trial that Tune stopped early
    keeps its CPUs, so the next trial waits forever.
    """
    with local_ray_options(2, dashboard=True) as options:
        ray.init(**options, log_to_driver=False)
    yield
    ray.shutdown()


def shoprank(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """The ``shoprank`` command's exit status (a user error exits with 2) and its stdout and stderr."""
    try:
        status = main(argv)
    except SystemExit as exited:
        status = int(exited.code)
    out = capsys.readouterr()
    return status, out.out + out.err


def tiny_config(root: Path | str, *overrides: str) -> Config:
    """The tiny preset writing its run under ``root``."""
    return load_config("tiny", [f"run.root={root}", *overrides])


@pytest.fixture
def make_tiny_config() -> Callable[..., Config]:
    """``make_tiny_config(root, "a.b=c", ...)``: the tiny preset under ``root`` with overrides."""
    return tiny_config


@pytest.fixture(scope="session")
def tiny_run(ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> tuple[Config, Run]:
    """The tiny preset generated and preprocessed once for every test that only reads it.

    Its run root is a ``file://`` URI, so every test that reads this run (serving included)
    reads it the way a cluster reads a run on shared storage.
    """
    config = tiny_config(f"file://{tmp_path_factory.mktemp('runs')}")
    return config, run_stages(config, until="preprocess")


@pytest.fixture(scope="session")
def tiny_encoder_dir(tiny_run: tuple[Config, Run], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer BERT whose tokenizer is trained on the tiny catalogue and queries."""
    from shoprank.data.io import read_table
    from shoprank.encoder.text import product_texts
    from shoprank.encoder.tiny import build_tiny_encoder

    config, run = tiny_run
    texts = product_texts(read_table(run, "data", "products"), config.encoder)
    texts += read_table(run, "data", "query_pairs", columns=["query"]).column("query").to_pylist()
    return build_tiny_encoder(texts, tmp_path_factory.mktemp("tiny-encoder"))


@pytest.fixture(scope="session")
def tiny_trained(tiny_run: tuple[Config, Run], tiny_encoder_dir: Path) -> tuple[Config, Run]:
    """The tiny run with its encoder fine-tuned (tiny BERT) and its catalogue embedded and indexed."""
    config, _ = tiny_run
    config = config.model_copy(update={"encoder": config.encoder.model_copy(update={"model": str(tiny_encoder_dir)})})
    return config, run_stages(config, until="embed")


@pytest.fixture(scope="session")
def ranked(tiny_trained: tuple[Config, Run]) -> tuple[Config, Run]:
    """The tiny run with its ranking stages done: features, the XGBoost ranker, the offline evaluation."""
    config, _ = tiny_trained
    return config, run_stages(config)


def copied(session: tuple[Config, Run], root: Path, **sections: Any) -> tuple[Config, Run]:
    """A copy of a session run under ``root`` (the shared one stays as it is), with its root's user key (else the
    copy's users would be pseudonyms of another key, and it would ingest again), its config with ``sections``
    replaced."""
    config, run = session
    shutil.copytree(run.path(), root / run.name)
    shutil.copytree(Path(run.path()).parent / "secrets", root / "secrets")
    changed = config.model_copy(update={"run": config.run.model_copy(update={"root": str(root)}), **sections})
    return changed, Run.for_config(changed)


@pytest.fixture(scope="session")
def distilled(tiny_trained: tuple[Config, Run], tmp_path_factory: pytest.TempPathFactory) -> tuple[Config, Run]:
    """A copy of the tiny run (the shared one keeps no student) with a one-layer student of the tiny BERT's two
    distilled (``student.enabled``) and judged by its export."""
    config, _ = tiny_trained
    student = config.student.model_copy(update={"enabled": True, "layers": [1]})
    changed, copy = copied(tiny_trained, tmp_path_factory.mktemp("student"), student=student)
    return changed, run_stages(changed, copy, until="export")


def bearer(key: str) -> dict[str, str]:
    """The header that presents ``key`` to the app."""
    return {"Authorization": f"Bearer {key}"}


class App:
    """The deployed app: its args, name, URL, event store (``serve.event_db``), its run root's API keys
    (``keys``: client, admin and the page's logins), the pseudonyms it names shoppers by and an HTTP client
    holding the admin key."""

    def __init__(self, config: Config, run: Run | None, args: AppArgs | None, db: str, name: str = APP_NAME,
                 route_prefix: str = "/", keys: dict[str, str] | None = None,
                 category_of: dict[str, str] | None = None, user_pseudonyms: Pseudonyms | None = None) -> None:
        self.config, self.run, self.args, self.db = config, run, args, db
        self.pseudonyms = user_pseudonyms or pseudonyms(config)
        self.name, self.route_prefix = name, route_prefix
        self.url = f"http://127.0.0.1:{config.serve.port}{route_prefix.rstrip('/')}"
        if keys is None:
            create_keys(config)
            keys = client_keys(config)
        self.keys = keys
        self.http = httpx.Client(base_url=self.url, timeout=60.0, headers=bearer(self.keys["admin"]))
        if category_of is None and run is not None:
            products = read_table(run, "data", "products", columns=["product_id", "category"]).to_pylist()
            category_of = {p["product_id"]: p["category"] for p in products}
        self.category_of = category_of or {}

    def deploy(self) -> None:
        assert self.args is not None, "an app of the run's args (deploy_app); a fake shop's is bound by fake_app"
        deploy(self.args, name=self.name, route_prefix=self.route_prefix)
        self.wait_ready()

    def wait_ready(self, timeout_s: float = 240.0) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            try:
                if self.http.get("/healthz").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        raise AssertionError(f"the app did not answer /healthz within {timeout_s} s")

    def post(self, path: str, body: Any) -> httpx.Response:
        return self.http.post(path, json=body)

    def report_once(self, holds: Callable[[dict[str, Any]], bool], timeout_s: float = 15.0) -> dict[str, Any]:
        """``/ab/report`` once ``holds`` is true of it (or the last one read, after ``timeout_s``): each ingress
        replica writes its queued impressions every ``serve.impression_flush_s``, so a report may lag another
        replica's answers by that much."""
        deadline = time.time() + timeout_s
        while True:
            report = self.http.get("/ab/report").json()
            if holds(report) or time.time() > deadline:
                return report
            time.sleep(0.2)

    def stored_event_ids(self) -> set[str]:
        store = open_event_store(self.db)
        try:
            return set(store.events().column("event_id").to_pylist())
        finally:
            store.close()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A real PostgreSQL server (Debian's), started in a temporary directory for the session and stopped after."""
    server = PostgresServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def serve_port(ray_local: None) -> Iterator[int]:
    """The HTTP port of the session's Serve instance (one per cluster; each app deploys under a prefix of it)."""
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()


def deploy_app(ranked: tuple[Config, Run], port: int, db: str, name: str = APP_NAME, route_prefix: str = "/",
               *overrides: str) -> App:
    """The ranked tiny run's variants deployed as app ``name`` under ``route_prefix``, its events in ``db``, with
    more config ``overrides``."""
    config, run = ranked
    register_variants(config, run)
    settings = [f"run.root={config.run.root}", f"run.name={run.name}", f"encoder.model={config.encoder.model}",
                f"serve.port={port}", f"serve.event_db={db}", "serve.max_query_chars=80", *overrides]
    served = App(config.model_copy(update={"serve": config.serve.model_copy(update={"port": port})}), run,
                 AppArgs(config="tiny", overrides=settings), db, name, route_prefix)
    served.deploy()
    return served


@pytest.fixture(scope="session")
def app(ranked: tuple[Config, Run], serve_port: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[App]:
    """The session's app, its events in SQLite; two replicas of each variant, each with its own user cache, and a
    short queue per caller and few requests per variant replica, so that a burst of requests meets the overload
    answer (503). Its replicas check the registry every 0.5 s instead of 2 s: the hot-reload tests wait for every
    replica to load a moved alias (four times), and a check is one small file read."""
    served = deploy_app(ranked, serve_port, str(tmp_path_factory.mktemp("serve") / "events.sqlite"), APP_NAME, "/",
                        "serve.replicas=2", "serve.max_queued_requests=4", "serve.variant_max_ongoing_requests=16",
                        "serve.registry_poll_s=0.5")
    yield served
    served.http.close()


@pytest.fixture(scope="session")
def fake_app(serve_port: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[App]:
    """The app on the in-memory shop (``fake_shop.py``), app ``fake`` under ``/fake`` beside the session's trained
    ``app``: real Serve, real HTTP and a real SQLite event store, and no trained run, so the tests of routing, keys,
    validation, overload and erasure start in seconds. Its limits are the session app's: two replicas of each
    variant, a short queue per caller, few requests per variant replica."""
    import secrets

    from ray import cloudpickle

    import fake_shop
    from fake_shop import FakeShop, products

    cloudpickle.register_pickle_by_value(fake_shop)  # the replicas cannot import the tests' modules

    root = tmp_path_factory.mktemp("fake-shop")
    db = str(root / "events.sqlite")
    config = tiny_config(root, f"serve.port={serve_port}", f"serve.event_db={db}", "serve.max_query_chars=80",
                         "serve.replicas=2", "serve.max_queued_requests=4", "serve.variant_max_ongoing_requests=16")
    keys = {role: secrets.token_urlsafe(24) for role in ("client", "admin")}
    shop = FakeShop(config, keys, secrets.token_bytes(32))
    category_of = dict(zip(products().column("product_id").to_pylist(), products().column("category").to_pylist()))
    served = App(config, None, None, db, "fake", "/fake", keys=keys, category_of=category_of,
                 user_pseudonyms=Pseudonyms(shop.user_key))
    specs = shop.specs()
    serve.run(bind_app(config, specs, shop, shop), name="fake", route_prefix="/fake")
    served.wait_ready()
    yield served
    served.http.close()
    serve.delete("fake")
