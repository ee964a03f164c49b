"""The record schemas every reader produces (docs/data.md, "Records").

One module, one truth: the simulated shop, the ESCI reader and the generic file
readers all end in tables of exactly these Arrow schemas, checked by
:func:`conform`, so everything downstream can rely on names, types and
nullability.
"""

from __future__ import annotations

import pyarrow as pa

EVENT_TYPES: tuple[str, ...] = ("view", "click", "add_to_cart", "purchase")
"""Behaviour events in funnel order; a later type implies more interest."""

EVENT_STRENGTH: dict[str, int] = {name: rank for rank, name in enumerate(EVENT_TYPES)}
"""view 0, click 1, add_to_cart 2, purchase 3: the engagement grade of an event."""

ENGAGEMENT_TYPES: frozenset[str] = frozenset(EVENT_TYPES[1:])
"""The behaviour events that say a shopper wanted a product (a view only says it was looked at)."""

NEGATIVE_EVENT_TYPES: tuple[str, ...] = ("not_interested", "not_interested_brand", "not_interested_category")
"""A shopper hiding a product, or every product of its brand or its category ("not interested"): kept apart from
the funnel, since they are no grade of interest; the product names what is hidden, its brand and category are the
catalogue's."""

ALL_EVENT_TYPES: tuple[str, ...] = EVENT_TYPES + NEGATIVE_EVENT_TYPES
"""Every event type a client may send and a store or an export may hold."""

ESCI_LABELS: dict[str, int] = {"E": 3, "S": 2, "C": 1, "I": 0}
"""ESCI judgments as graded relevance: Exact 3, Substitute 2, Complement 1, Irrelevant 0."""

PRODUCT_SCHEMA = pa.schema(
    [
        pa.field("product_id", pa.string(), nullable=False),
        pa.field("title", pa.string(), nullable=False),
        # Optional: many real catalogues lack them (a transactions export has an id, a title and a price). A
        # missing one is null, never a made-up value, and every stage treats null as "not known".
        pa.field("description", pa.string(), nullable=True),
        pa.field("category", pa.string(), nullable=True),
        pa.field("brand", pa.string(), nullable=True),
        pa.field("price", pa.float64(), nullable=False),
        pa.field("attributes", pa.map_(pa.string(), pa.string()), nullable=False),
    ]
)

MAX_QUANTITY = 10_000
"""The most items one purchase event may carry (a larger number is a client's mistake, not an order)."""

EVENT_SCHEMA = pa.schema(
    [
        pa.field("event_id", pa.string(), nullable=False),
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("session_id", pa.string(), nullable=False),
        pa.field("product_id", pa.string(), nullable=False),
        pa.field("event_type", pa.string(), nullable=False),
        pa.field("ts", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("query", pa.string(), nullable=True),
        pa.field("position", pa.int32(), nullable=True),
        pa.field("request_id", pa.string(), nullable=True),
        pa.field("variant", pa.string(), nullable=True),
        pa.field("quantity", pa.int32(), nullable=True),  # items bought: a purchase's revenue is price x quantity
    ]
)

JUDGMENT_SCHEMA = pa.schema(
    [
        pa.field("query_id", pa.string(), nullable=False),
        pa.field("query", pa.string(), nullable=False),
        pa.field("product_id", pa.string(), nullable=False),
        pa.field("label", pa.int8(), nullable=False),
    ]
)

SCHEMAS: dict[str, pa.Schema] = {
    "products": PRODUCT_SCHEMA,
    "events": EVENT_SCHEMA,
    "judgments": JUDGMENT_SCHEMA,
}

REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    name: tuple(f.name for f in schema if not f.nullable) for name, schema in SCHEMAS.items()
}
"""Fields an input file must provide; the rest may be absent and are filled with nulls."""


def conform(table: pa.Table, kind: str) -> pa.Table:
    """Select, order and cast ``table``'s columns to the ``kind`` record schema.

    The caller has already validated values; this only guarantees the exact shape
    (column order, types, nullability) so tables from different sources concatenate.
    """
    schema = SCHEMAS[kind]
    columns = []
    for field in schema:
        if field.name in table.column_names:
            columns.append(table.column(field.name).cast(field.type))
        else:
            columns.append(pa.nulls(table.num_rows, field.type))
    return pa.Table.from_arrays(columns, schema=schema)
