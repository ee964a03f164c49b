"""Small input files in the shapes real shops bring, for reader and pipeline tests.

Each ``write_*`` function writes a few hundred deterministic rows (seeded) with the
real formats' column names and types into a directory and returns the ``--set``
overrides that point ``source`` at them, ready for ``load_config`` or the tests'
``tiny_config(root, *overrides)``:

* :func:`write_esci`: the Amazon Shopping Queries (ESCI) parquet pair, three locales,
  catalog and judgments, no behaviour;
* :func:`write_ratings`: a catalog CSV and a ratings export (``user,item,rating,timestamp``)
  whose event ids, sessions and types the reader derives through the config;
* :func:`write_jsonl_shop`: catalog, events (with sessions, views and searches) and
  judgments in JSON Lines.

The data has structure to learn (each shopper's items cluster in a few categories,
relevance follows the query's product type), so a pipeline test can expect more than
"it ran". Paths in the overrides are JSON-quoted, which YAML reads back verbatim.
"""

from __future__ import annotations

import csv
import json
import random
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.parquet as pq

from shoprank.data.io import read_table
from shoprank.stages import STAGE_NAMES
from shoprank.store.run import Run

ESCI_LOCALES: tuple[str, ...] = ("us", "es", "jp")
ESCI_PRODUCTS_PER_LOCALE: dict[str, int] = {"us": 130, "es": 85, "jp": 85}
ESCI_QUERIES_PER_LOCALE: dict[str, int] = {"us": 16, "es": 12, "jp": 12}
ESCI_SHARED_IDS: dict[str, int] = {"es": 20, "jp": 15}
"""Product ids of a locale that are also us product ids, as in the real data (same ASIN)."""
ESCI_JUDGED_PER_QUERY = 16

RATING_EVENT_TYPES: dict[str, str] = {
    "5": "purchase", "4": "add_to_cart", "3": "click", "2": "click", "1": "click"
}
"""How :func:`write_ratings`'s config turns a rating into an event type."""
SESSION_GAP_MINUTES = 30

START = datetime(2026, 1, 5, tzinfo=timezone.utc)


def _set(key: str, value: Any) -> str:
    """One ``--set`` override; the value is written as JSON, which YAML reads back as is."""
    return f"{key}={json.dumps(value, ensure_ascii=False)}"


# ------------------------------------------------------------------------------ ESCI

# Per locale: product kinds (same order in every locale), colours, and words for titles.
_ESCI_KINDS: dict[str, list[str]] = {
    "us": ["coffee mug", "headphones", "running shoes", "phone case", "desk lamp", "yoga mat",
           "water bottle", "backpack"],
    "es": ["taza de café", "auriculares", "zapatillas de running", "funda de móvil",
           "lámpara de escritorio", "esterilla de yoga", "botella de agua", "mochila"],
    "jp": ["マグカップ", "ヘッドホン", "ランニングシューズ", "スマホケース", "デスクライト", "ヨガマット",
           "水筒", "リュック"],
}
_ESCI_COLORS: dict[str, list[str]] = {
    "us": ["black", "white", "red", "blue", "green"],
    "es": ["negro", "blanco", "rojo", "azul", "verde"],
    "jp": ["ブラック", "ホワイト", "レッド", "ブルー", "グリーン"],
}
_ESCI_ADJECTIVES: dict[str, list[str]] = {
    "us": ["Premium", "Lightweight", "Durable", "Compact", "Classic"],
    "es": ["premium", "ligero", "resistente", "compacto", "clásico"],
    "jp": ["プレミアム", "軽量", "丈夫な", "コンパクト", "クラシック"],
}
_ESCI_BULLETS: dict[str, list[str]] = {
    "us": ["Easy to clean", "1-year warranty", "Gift ready packaging", "Made from recycled materials"],
    "es": ["Fácil de limpiar", "Garantía de 1 año", "Listo para regalar", "Hecho con materiales reciclados"],
    "jp": ["お手入れ簡単", "1年保証", "ギフト包装対応", "リサイクル素材使用"],
}
_ESCI_BRANDS = ["Acme", "Zenta", "Koru", "Valdo", "Mizu", "Northway", "Lumo"]
_ESCI_COMPLEMENTS = {0: 4, 1: 3, 2: 6, 3: 1, 4: 0, 5: 6, 6: 2, 7: 6}
"""kind -> a kind bought with it (mug and desk lamp, headphones and phone case, ...)."""


def _asin(rng: random.Random, taken: set[str]) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    while True:
        asin = "B0" + "".join(rng.choice(alphabet) for _ in range(8))
        if asin not in taken:
            taken.add(asin)
            return asin


def _esci_title(locale: str, kind: int, color: int, brand: str, adjective: int) -> str:
    k, c, a = _ESCI_KINDS[locale][kind], _ESCI_COLORS[locale][color], _ESCI_ADJECTIVES[locale][adjective]
    if locale == "us":
        return f"{brand} {a} {k.title()} - {c.title()}"
    if locale == "es":
        return f"{brand} {k.capitalize()} {a}, color {c}"
    return f"{brand} {k} {c} {a}"


def _esci_product(rng: random.Random, locale: str, asin: str, kind: int, color: int, brand: str) -> dict[str, Any]:
    """One products-file row; nulls where the real data has them (description, bullets, brand, colour)."""
    adjective = rng.randrange(5)
    bullets = rng.sample(_ESCI_BULLETS[locale], 2)
    description: str | None = None
    if rng.random() < 0.6:
        description = f"<p>{_esci_title(locale, kind, color, brand, adjective)}.</p><p>{bullets[0]}</p>"
    return {
        "product_id": asin,
        "product_title": _esci_title(locale, kind, color, brand, adjective),
        "product_description": description,
        "product_bullet_point": "\n".join(bullets) if rng.random() < 0.85 else None,
        "product_brand": brand if rng.random() < 0.95 else None,
        "product_color": _ESCI_COLORS[locale][color] if rng.random() < 0.8 else None,
        "product_locale": locale,
    }


def _esci_label(query: tuple[int, int | None, str | None], product: tuple[int, int, str]) -> str:
    """E: the kind asked for with every asked attribute; S: the kind, another colour or brand;
    C: a kind bought with it; I: anything else."""
    kind, color, brand = query
    p_kind, p_color, p_brand = product
    if p_kind == kind:
        matches = (color is None or p_color == color) and (brand is None or p_brand == brand)
        return "E" if matches else "S"
    return "C" if _ESCI_COMPLEMENTS[kind] == p_kind else "I"


def write_esci(directory: Path, locale: str = "us", seed: int = 0) -> list[str]:
    """ESCI's ``shopping_queries_dataset_{examples,products}.parquet`` in the public layout.

    Three locales (us, es, jp; Spanish and Japanese text), :data:`ESCI_PRODUCTS_PER_LOCALE`
    products (some es and jp ASINs are us ASINs too), :data:`ESCI_QUERIES_PER_LOCALE`
    queries of :data:`ESCI_JUDGED_PER_QUERY` judgments each, rows of all locales
    interleaved. Returns the overrides for ``source.kind: esci`` at ``locale``.
    """
    rng = random.Random(seed)
    taken: set[str] = set()
    products: list[dict[str, Any]] = []
    # (kind, colour, brand) per product id, per locale, for the labels.
    traits: dict[str, dict[str, tuple[int, int, str]]] = {}
    for loc in ESCI_LOCALES:
        traits[loc] = {}
        shared = rng.sample(sorted(traits["us"]), ESCI_SHARED_IDS.get(loc, 0)) if loc != "us" else []
        for index in range(ESCI_PRODUCTS_PER_LOCALE[loc]):
            if index < len(shared):  # the same item sold in another market: same ASIN
                asin = shared[index]
                kind, color, brand = traits["us"][asin]
            else:
                asin = _asin(rng, taken)
                kind, color, brand = index % 8, rng.randrange(5), rng.choice(_ESCI_BRANDS)
            traits[loc][asin] = (kind, color, brand)
            products.append(_esci_product(rng, loc, asin, kind, color, brand))
    rng.shuffle(products)

    queries: list[tuple[str, str, tuple[int, int | None, str | None]]] = []
    for loc in ESCI_LOCALES:
        for q in range(ESCI_QUERIES_PER_LOCALE[loc]):
            kind = q % 8
            color = rng.randrange(5) if q % 3 == 1 else None
            brand = rng.choice(_ESCI_BRANDS) if q % 3 == 2 else None
            words = [_ESCI_KINDS[loc][kind]]
            if color is not None:
                words.insert(0 if loc == "us" else 1, _ESCI_COLORS[loc][color])
            if brand is not None:
                words.insert(0, brand.lower())
            queries.append((loc, " ".join(words), (kind, color, brand)))
    rng.shuffle(queries)

    examples: list[dict[str, Any]] = []
    for query_id, (loc, text, wanted) in enumerate(queries, start=1000):
        ids = sorted(traits[loc])
        same = [i for i in ids if traits[loc][i][0] == wanted[0]]
        other = [i for i in ids if traits[loc][i][0] != wanted[0]]
        judged = rng.sample(same, 8) + rng.sample(other, ESCI_JUDGED_PER_QUERY - 8)
        rng.shuffle(judged)
        small = int(query_id % 2 == 0)
        split = "test" if rng.random() < 0.3 else "train"
        for asin in judged:
            examples.append({
                "example_id": len(examples),
                "query": text,
                "query_id": query_id,
                "product_id": asin,
                "product_locale": loc,
                "esci_label": _esci_label(wanted, traits[loc][asin]),
                "small_version": small,
                "large_version": 1,
                "split": split,
            })

    example_schema = pa.schema([
        ("example_id", pa.int64()), ("query", pa.string()), ("query_id", pa.int64()),
        ("product_id", pa.string()), ("product_locale", pa.string()), ("esci_label", pa.string()),
        ("small_version", pa.int64()), ("large_version", pa.int64()), ("split", pa.string()),
    ])
    product_schema = pa.schema([(name, pa.string()) for name in products[0]])
    directory.mkdir(parents=True, exist_ok=True)
    examples_path = directory / "shopping_queries_dataset_examples.parquet"
    products_path = directory / "shopping_queries_dataset_products.parquet"
    pq.write_table(pa.Table.from_pylist(examples, schema=example_schema), examples_path)
    pq.write_table(pa.Table.from_pylist(products, schema=product_schema), products_path)
    return [
        "source.kind=esci",
        _set("source.esci.examples_path", str(examples_path)),
        _set("source.esci.products_path", str(products_path)),
        f"source.esci.locale={locale}",
    ]


# --------------------------------------------------------------------------- ratings

_GENRES = [
    "Books > Mystery", "Books > Science Fiction", "Books > Cooking", "Music > Jazz",
    "Music > Rock", "Music > Classical", "Games > Strategy", "Games > Puzzle",
]
_GENRE_WORDS = [
    ["Harbor", "Alibi", "Shadow", "Witness"], ["Orbit", "Nebula", "Android", "Colony"],
    ["Kitchen", "Bread", "Spice", "Supper"], ["Blue Note", "Swing", "Bebop", "Late Night"],
    ["Amplified", "Riot", "Highway", "Thunder"], ["Sonata", "Nocturne", "Requiem", "Overture"],
    ["Empire", "Conquest", "Frontier", "Tactics"], ["Cube", "Maze", "Riddle", "Tangram"],
]
_MAKERS = ["Penfold Press", "Northlight", "Copper Kettle", "Arcadia", "Bluebird Records", "Tessellate"]
RATINGS_ITEMS = 120
RATINGS_USERS = 40


def ratings_user_id(user: int) -> str:
    """Rating user ``user``'s id as the export names them: an e-mail address, as many shops key their customers,
    distinctive enough for the raw-id scans (:mod:`raw_ids`) to find it anywhere it leaks."""
    return f"reader{user:03d}@ratings-shop.example"


def write_ratings(directory: Path, seed: int = 0) -> list[str]:
    """A catalog CSV and a ratings export, the commonest shape of a shop's own data.

    ``catalog.csv`` has ``item_id,name,genre,maker,cost,blurb,specs`` (names unlike the
    record fields; ``specs`` holds JSON attributes, ``blurb`` is sometimes empty).
    ``ratings.csv`` is ``user,item,rating,timestamp``: e-mail addresses as users
    (:func:`ratings_user_id`), integer items, ratings 1..5, unix seconds, one rating
    per user and item, sorted by user then item as exports are (not by time). Each of
    :data:`RATINGS_USERS` users rates mostly items of two favourite genres, highly, in a
    few bursts days apart (sessions under a :data:`SESSION_GAP_MINUTES` gap). Returns the overrides for ``source.kind: files``
    that derive event types (:data:`RATING_EVENT_TYPES`), event ids and sessions.
    """
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    catalog_path = directory / "catalog.csv"
    ratings_path = directory / "ratings.csv"

    genre_of: dict[int, int] = {}
    with catalog_path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["item_id", "name", "genre", "maker", "cost", "blurb", "specs"])
        for item in range(1, RATINGS_ITEMS + 1):
            genre = (item - 1) % len(_GENRES)
            genre_of[item] = genre
            words = _GENRE_WORDS[genre]
            name = f"The {rng.choice(words)} of {rng.choice(words)} {item}"
            blurb = f"A {_GENRES[genre].split(' > ')[1].lower()} favourite." if rng.random() < 0.8 else ""
            specs = json.dumps({"format": rng.choice(["standard", "deluxe"]), "year": 1990 + item % 35})
            writer.writerow([item, name, _GENRES[genre], rng.choice(_MAKERS), f"{rng.uniform(5, 60):.2f}", blurb, specs])

    ratings: list[tuple[str, int, int, int]] = []
    for user in range(1, RATINGS_USERS + 1):
        favourites = rng.sample(range(len(_GENRES)), 2)
        liked = [i for i in genre_of if genre_of[i] in favourites]
        others = [i for i in genre_of if genre_of[i] not in favourites]
        items = rng.sample(liked, rng.randint(6, 10)) + rng.sample(others, rng.randint(1, 3))
        rng.shuffle(items)
        clock = START + timedelta(days=rng.randint(0, 5), hours=rng.randint(8, 20))
        for position, item in enumerate(items):
            if position and rng.random() < 0.3:  # a new visit, days later
                clock += timedelta(days=rng.randint(1, 9), hours=rng.randint(0, 6))
            else:
                clock += timedelta(minutes=rng.randint(1, 12))
            rating = rng.choice([4, 5, 5]) if genre_of[item] in favourites else rng.randint(1, 3)
            ratings.append((ratings_user_id(user), item, rating, int(clock.timestamp())))
    ratings.sort(key=lambda r: (r[0], r[1]))
    with ratings_path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["user", "item", "rating", "timestamp"])
        writer.writerows(ratings)

    return [
        "source.kind=files",
        _set("source.files.products.path", str(catalog_path)),
        _set("source.files.products.columns", {
            "product_id": "item_id", "title": "name", "category": "genre", "brand": "maker",
            "price": "cost", "description": "blurb", "attributes": "specs",
        }),
        _set("source.files.events.path", str(ratings_path)),
        _set("source.files.events.columns", {"user_id": "user", "product_id": "item", "ts": "timestamp"}),
        _set("source.files.events.event_type", {"column": "rating", "map": RATING_EVENT_TYPES}),
        "source.files.events.event_id=hash",
        f"source.files.events.session_id.gap_minutes={SESSION_GAP_MINUTES}",
    ]


# ------------------------------------------------------------------------ JSON Lines

_LEAVES = [
    ("Home > Kitchen > Mugs", "mug"), ("Home > Kitchen > Kettles", "kettle"),
    ("Home > Lighting > Desk Lamps", "desk lamp"), ("Sports > Running > Shoes", "running shoes"),
    ("Sports > Yoga > Mats", "yoga mat"), ("Sports > Outdoor > Bottles", "water bottle"),
    ("Electronics > Audio > Headphones", "headphones"), ("Electronics > Audio > Speakers", "speaker"),
    ("Electronics > Phones > Cases", "phone case"), ("Fashion > Bags > Backpacks", "backpack"),
]
_COLORS = ["black", "white", "red", "blue", "green"]
_BRANDS = ["Acme", "Zenta", "Koru", "Valdo", "Mizu", "Northway"]
JSONL_PRODUCTS = 150
JSONL_USERS = 25


def jsonl_user_id(user: int) -> str:
    """JSON Lines shopper ``user``'s id: an e-mail address (see :func:`ratings_user_id`)."""
    return f"shopper-{user:03d}@jsonl-shop.example"
JSONL_QUERIES = 15
JSONL_LIST_SIZE = 6


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def write_jsonl_shop(directory: Path, seed: int = 0) -> list[str]:
    """A shop's catalog, events and judgments as JSON Lines, with their own names.

    ``catalog.jsonl``: ``sku, title, description, category`` (a path), ``brand, price,
    attributes`` (an object). ``events.jsonl``: ``event_id, user_id, session_id, sku,
    type, timestamp`` (ISO-8601, UTC), ``search_query, rank``: sessions of
    :data:`JSONL_USERS` shoppers who search or browse their favourite categories, see a
    list of :data:`JSONL_LIST_SIZE` (``view`` with its rank), click, sometimes add to
    cart and buy. ``judgments.jsonl``: ``qid, query, sku, grade`` (0..3). Returns the
    overrides for ``source.kind: files``.
    """
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    products: list[dict[str, Any]] = []
    for index in range(JSONL_PRODUCTS):
        leaf, noun = _LEAVES[index % len(_LEAVES)]
        color, brand = rng.choice(_COLORS), rng.choice(_BRANDS)
        products.append({
            "sku": f"SKU-{index:04d}",
            "title": f"{brand} {color} {noun}",
            "description": f"A {color} {noun} by {brand}." if rng.random() < 0.8 else None,
            "category": leaf,
            "brand": brand,
            "price": round(rng.uniform(5, 150), 2),
            "attributes": {"color": color, "material": rng.choice(["steel", "cotton", "plastic"])},
        })
    by_leaf: dict[int, list[str]] = {}
    for index, product in enumerate(products):
        by_leaf.setdefault(index % len(_LEAVES), []).append(product["sku"])

    events: list[dict[str, Any]] = []
    for user in range(JSONL_USERS):
        favourites = rng.sample(range(len(_LEAVES)), 2)
        clock = START + timedelta(days=rng.randint(0, 3), hours=rng.randint(7, 21))
        for session in range(rng.randint(2, 3)):
            session_id = f"s-{user:03d}-{session}"
            leaf = rng.choice(favourites) if rng.random() < 0.85 else rng.randrange(len(_LEAVES))
            query = _LEAVES[leaf][1] if rng.random() < 0.6 else None
            shown = rng.sample(by_leaf[leaf], JSONL_LIST_SIZE - 2) + rng.sample(
                [p["sku"] for p in products], 2
            )
            rng.shuffle(shown)
            # (sku, type, rank, seconds after the previous event) in the order they happen
            steps: list[tuple[str, str, int | None, int]] = [
                (sku, "view", rank, 0) for rank, sku in enumerate(shown, start=1)
            ]
            in_leaf = [(r, s) for r, s in enumerate(shown, start=1) if s in by_leaf[leaf]]
            for rank, sku in rng.sample(in_leaf, rng.randint(1, 2)):
                steps.append((sku, "click", rank, rng.randint(20, 120)))
                if rng.random() < 0.4:
                    steps.append((sku, "add_to_cart", None, rng.randint(20, 90)))
                    if rng.random() < 0.6:
                        steps.append((sku, "purchase", None, rng.randint(60, 300)))
            for sku, kind, rank, after in steps:
                clock += timedelta(seconds=after)
                events.append({
                    "event_id": f"ev-{len(events):05d}", "user_id": jsonl_user_id(user),
                    "session_id": session_id, "sku": sku, "type": kind, "timestamp": _iso(clock),
                    "search_query": query, "rank": rank,
                })
            clock += timedelta(days=rng.randint(1, 6), hours=rng.randint(0, 5))

    judgments: list[dict[str, Any]] = []
    for q in range(JSONL_QUERIES):
        leaf = q % len(_LEAVES)
        color = rng.choice(_COLORS) if q >= len(_LEAVES) else None
        text = f"{color} {_LEAVES[leaf][1]}" if color else _LEAVES[leaf][1]
        judged = rng.sample(by_leaf[leaf], 8) + rng.sample(
            [p["sku"] for i, p in enumerate(products) if i % len(_LEAVES) != leaf], 4
        )
        for sku in judged:
            product = products[int(sku.split("-")[1])]
            same_leaf = product["category"] == _LEAVES[leaf][0]
            if same_leaf:
                grade = 3 if color is None or product["attributes"]["color"] == color else 2
            else:
                grade = 1 if product["category"].split(" > ")[0] == _LEAVES[leaf][0].split(" > ")[0] else 0
            judgments.append({"qid": f"q{q:02d}", "query": text, "sku": sku, "grade": grade})

    catalog_path, events_path, judgments_path = (
        directory / "catalog.jsonl", directory / "events.jsonl", directory / "judgments.jsonl"
    )
    _write_jsonl(catalog_path, products)
    _write_jsonl(events_path, events)
    _write_jsonl(judgments_path, judgments)
    return [
        "source.kind=files",
        _set("source.files.products.path", str(catalog_path)),
        _set("source.files.products.columns", {"product_id": "sku"}),
        _set("source.files.events.path", str(events_path)),
        _set("source.files.events.columns", {
            "product_id": "sku", "event_type": "type", "ts": "timestamp",
            "query": "search_query", "position": "rank",
        }),
        _set("source.files.judgments.path", str(judgments_path)),
        _set("source.files.judgments.columns", {"query_id": "qid", "product_id": "sku", "label": "grade"}),
    ]


# --------------------------------------------------------------- what every shape's run shows
# Shared by the data-shape tests on the session's cluster and the multi-node cluster test.


def check_every_stage(run: Run, tasks: set[str]) -> None:
    """The run finished every stage and registered its variants; its offline evaluation has figures for ``tasks``
    (of search and recommend) and says, in the file and in the stage's notes, why it has none for the others."""
    done = {entry["stage"] for entry in run.stage_log() if entry["status"] in ("done", "skipped")}
    assert set(STAGE_NAMES) <= done and "register" in done, done
    evaluation = run.read_json("evaluation", "offline.json")
    assert {kind for kind in ("search", "recommend") if kind in evaluation} == tasks
    notes = run.manifest()["stages"]["evaluate"].get("notes", [])
    for kind in {"search", "recommend"} - tasks:
        assert kind in evaluation["no_figures"], "a task without figures says why"
        assert any(kind in note for note in notes), notes
    for kind in tasks:
        assert evaluation[kind]["fine-tuned retrieval + ranker"]["requests"] > 0


def check_answers(url: str, run: Run, key: str) -> None:
    """``/search`` and ``/recommend`` of both variants answer from this run (called with ``key``): its products, for
    a known and an unknown shopper; a recommendation that is not personal says so, and without behaviour keeps the
    popular order."""
    catalogue = set(read_table(run, "data", "products", columns=["product_id"]).column("product_id").to_pylist())
    title = read_table(run, "data", "products", columns=["title"]).column("title")[0].as_py()
    users = read_table(run, "data", "events", columns=["user_id"]).column("user_id").to_pylist()
    with httpx.Client(base_url=url, timeout=120.0, headers={"Authorization": f"Bearer {key}"}) as http:
        for path, body in (("/search", {"query": title, "k": 5}),
                           ("/recommend", {"user_id": users[0] if users else "nobody", "k": 5}),
                           ("/recommend", {"user_id": "a-shopper-never-seen", "k": 5})):
            for variant in ("A", "B"):
                answer = _answer(http, path, {**body, "variant": variant})
                assert answer["variant"] == variant and answer["request_id"]
                ids = [item["product_id"] for item in answer["items"]]
                assert ids and set(ids) <= catalogue, (path, answer)
        cold = _answer(http, "/recommend", {"user_id": "a-shopper-never-seen", "k": 5, "variant": "A"})
        assert cold["note"], "a recommendation that is not personal says so"
        if not users:  # no behaviour: A (retrieval) keeps the popular order, by training queries judging relevant
            assert [item["product_id"] for item in cold["items"]] == _most_judged_relevant(run, 5)


def _most_judged_relevant(run: Run, k: int) -> list[str]:
    """The ``k`` products most often judged exact or substitute by training queries (ties: catalogue order): without
    behaviour no validation recommendation has a relevant product, so the run's recommendation diversity strength
    is 0 (:func:`shoprank.evaluation.offline.choose_diversity`) and the popular order is kept."""
    catalogue = read_table(run, "data", "products", columns=["product_id"]).column("product_id").to_pylist()
    pairs = read_table(run, "data", "query_pairs").to_pandas()
    relevant = pairs[(pairs["source"] == "judgment") & (pairs["split"] == "train") & (pairs["label"] >= 2)]
    counts = relevant["product_id"].value_counts()
    ordered = sorted(catalogue, key=lambda p: (-counts.get(p, 0), catalogue.index(p)))
    return ordered[:k]


def _answer(http: httpx.Client, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = http.post(path, json=body)
    assert response.status_code == 200, (path, body, response.text)
    return response.json()
