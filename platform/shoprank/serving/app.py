"""The Serve application: ``build_app(args)`` binds the graph and starts nothing.

    serve run serve/config.yaml                 # or: shoprank serve --config demo
    serve deploy serve/config.yaml              # on a running cluster

``args`` (:class:`AppArgs`) name a config preset and overrides; the variants come
from the registry under ``run.root`` (``serve.variants``: name -> alias). Each
variant is one deployment (``Variant_A``, ...) that encodes, retrieves and ranks;
with ``ray.use_gpu`` (or ``serve.separate_query_encoder``) its query encoder is a
deployment of its own (``QueryEncoder_A``, ..., with a GPU when ``ray.use_gpu``).
Replicas, autoscaling and CPUs come from ``serve``. The app needs the user pseudonym key
that every variant's run was ingested under, and refuses to start otherwise
(:func:`shoprank.privacy.serving_pseudonyms`).

**Hot reload.** Each variant replica gets its variant's registry alias through
``user_config`` (``reconfigure``) and watches the registry (``serve.registry_poll_s``).
When ``update_ranker`` moves the alias to a new ranker over the same base run, the
replicas load it and swap it in between two batches: no redeploy, no restart, no
request dropped. An alias moved to another base run (a new encoder or index) needs a
redeploy (``shoprank serve``), which Serve rolls out replica by replica.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import Application
from ray.serve.config import BackpressureConfig

from shoprank.config import Config, load_config
from shoprank.privacy import serving_pseudonyms
from shoprank.serving.deployments import EventStoreWriter, Ingress
from shoprank.serving.loaders import RunLoader, ShopSource, VariantLoader
from shoprank.serving.variant_deployments import QueryEncoder, Variant
from shoprank.serving.variants import VariantSpec, resolve_variants
from shoprank.store.events import event_db_location, is_server_database

APP_NAME = "shoprank"


class AppArgs(BaseModel):
    """What ``serve run`` / ``serve deploy`` pass to :func:`build_app` (``args:`` in serve/config.yaml)."""

    model_config = ConfigDict(extra="forbid")

    config: str = Field("demo", description="Preset name or YAML path.")
    overrides: list[str] = Field(default_factory=list, description="``key=value`` overrides, as ``--set``.")


HEAD_NODE_RESOURCE = "node:__internal_head__"
"""The resource only Ray's head node has."""


def state_placement(config: Config, db: str) -> dict[str, Any]:
    """Where the event store's writer runs (and, for SQLite, the variants that read the store): on the nodes that
    ``serve.state_resource`` names; else, for SQLite (a file on one disk), Ray's head node; a server database is
    reached from any node."""
    if config.serve.state_resource:
        return {"resources": {config.serve.state_resource: 0.001}}
    return {} if is_server_database(db) else {"resources": {HEAD_NODE_RESOURCE: 0.001}}


@dataclass(frozen=True)
class Placement:
    """One deployment's replicas: what each asks of a node, and how many there may be."""

    ray_actor_options: dict[str, Any]
    min_replicas: int
    max_replicas: int


def placements(config: Config, variants: list[str]) -> dict[str, Placement]:
    """Deployment name -> its placement, for ``variants`` (names): what :func:`build_app` deploys, so that a
    cluster's node types can be checked against it before anything starts."""
    settings = config.serve
    cpu = {"num_cpus": settings.cpus_per_replica}
    scaled = (settings.replicas, max(settings.replicas, settings.max_replicas))
    separate = config.ray.use_gpu if settings.separate_query_encoder is None else settings.separate_query_encoder
    encoder = {**cpu, **({"num_gpus": settings.gpus_per_encoder} if config.ray.use_gpu else {})}
    db = event_db_location(config)
    state = {**cpu, **state_placement(config, db)}
    # the variants read the event store (their user caches): an SQLite file only on its own disk's node
    answering = cpu if is_server_database(db) else state
    found = {"Ingress": Placement(cpu, *scaled), "EventStoreWriter": Placement(state, 1, 1)}
    for name in variants:
        found[f"Variant_{name}"] = Placement(answering, *scaled)
        if separate:  # on CPU the variant encodes its queries itself: a hop less on every search
            found[f"QueryEncoder_{name}"] = Placement(encoder, *scaled)
    return found


def _scaling(placement: Placement, config: Config) -> dict[str, Any]:
    """Serve's replica settings for ``placement``: a fixed count, or autoscaling on ongoing requests between its
    bounds, with the target and delays of ``serve``."""
    if placement.max_replicas > placement.min_replicas:
        settings = config.serve
        return {"autoscaling_config": {
            "min_replicas": placement.min_replicas, "max_replicas": placement.max_replicas,
            "target_ongoing_requests": settings.target_ongoing_requests,
            "upscale_delay_s": settings.upscale_delay_s, "downscale_delay_s": settings.downscale_delay_s}}
    return {"num_replicas": placement.min_replicas}


def build_app(args: AppArgs | dict[str, Any]) -> Application:
    """The application for ``args`` (nothing starts until ``serve.run`` / ``serve deploy``): the variants of the
    registry under ``run.root``, loaded from their runs (:class:`RunLoader`)."""
    args = AppArgs.model_validate(args) if isinstance(args, dict) else args
    config = load_config(args.config, args.overrides)
    specs = resolve_variants(config)
    serving_pseudonyms(config, [spec.run for spec in specs.values()])  # refused here, before anything starts
    loader = RunLoader(config)
    return bind_app(config, specs, loader, loader)


def bind_app(config: Config, specs: dict[str, VariantSpec], variants_from: VariantLoader,
             shop: ShopSource) -> Application:
    """The graph serving ``specs`` (name -> variant) with ``config``: each variant's replicas load through
    ``variants_from``, the ingress reads the shop (keys, pseudonym key, catalogues) through ``shop``. The loaders
    are bound, as every deployment's arguments, so a test binds in-memory ones to the same graph."""
    settings = config.serve
    dumped = config.model_dump(mode="json")
    placed = placements(config, list(specs))
    # a full queue is a 503 with Retry-After wherever it is met (Serve's proxy, or the ingress calling a variant)
    backpressure = BackpressureConfig(retry_after_s=settings.retry_after_s)
    db = event_db_location(config)
    variants = {}
    for name, spec in specs.items():
        encoder_name = f"QueryEncoder_{name}"
        query_encoder = QueryEncoder.options(
            name=encoder_name, ray_actor_options=placed[encoder_name].ray_actor_options,
            max_ongoing_requests=settings.variant_max_ongoing_requests, **_scaling(placed[encoder_name], config),
            user_config={"batch_size": settings.encoder_batch_size, "batch_wait_s": settings.batch_wait_s},
        ).bind(dumped, spec, variants_from) if encoder_name in placed else None
        variants[name] = Variant.options(
            name=f"Variant_{name}", ray_actor_options=placed[f"Variant_{name}"].ray_actor_options,
            max_ongoing_requests=settings.variant_max_ongoing_requests, max_queued_requests=settings.max_queued_requests,
            backpressure_config=backpressure, **_scaling(placed[f"Variant_{name}"], config),
            user_config={"variant": name, "alias": spec.alias,
                         "batch_size": settings.ranker_batch_size, "batch_wait_s": settings.batch_wait_s},
        ).bind(dumped, spec, variants_from, db, query_encoder)
    store = EventStoreWriter.options(
        ray_actor_options=placed["EventStoreWriter"].ray_actor_options,
        max_ongoing_requests=4 * settings.event_batch_size, user_config={"batch_size": settings.event_batch_size},
    ).bind(db)
    return Ingress.options(
        ray_actor_options=placed["Ingress"].ray_actor_options, max_ongoing_requests=settings.max_ongoing_requests,
        max_queued_requests=settings.max_queued_requests,
        backpressure_config=backpressure, **_scaling(placed["Ingress"], config),
        user_config={"variants": {name: spec.model_dump() for name, spec in specs.items()}, "deployed_at_s": time.time()},
    ).bind(dumped, variants, store, shop)


def deploy(args: AppArgs, *, blocking: bool = False, name: str = APP_NAME, route_prefix: str = "/") -> str:
    """Start Serve on the connected cluster (host and port from config) and run the app; its URL.

    ``name`` and ``route_prefix`` let a second app (another run, say) answer beside the first
    under its own prefix of the same HTTP port.
    """
    config = load_config(args.config, args.overrides)
    serve.start(http_options={"host": config.serve.host, "port": config.serve.port,
                              "request_timeout_s": config.serve.request_timeout_s})
    serve.run(build_app(args), name=name, route_prefix=route_prefix, blocking=blocking)
    return f"http://{config.serve.host}:{config.serve.port}{route_prefix.rstrip('/')}"
