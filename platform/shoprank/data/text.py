"""Text normalisation shared by preprocessing and serving.

Catalogues arrive with HTML, entities, odd Unicode forms and stray whitespace;
queries arrive in any case. One vectorised function (Arrow compute) makes both
comparable, and the same function runs offline and online so an encoder never
sees text at serving time that differs from what it was trained on.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

_ENTITIES = {"&amp;": "&", "&lt;": "<", "&gt;": ">", "&quot;": '"', "&#39;": "'", "&nbsp;": " "}


def normalize_text(values: pa.Array | pa.ChunkedArray, *, lower: bool = True, max_chars: int | None = None) -> pa.Array:
    """NFKC, HTML tags and entities removed, whitespace collapsed, optionally lower case and cut."""
    out = pc.utf8_normalize(pc.fill_null(values, ""), "NFKC")
    out = pc.replace_substring_regex(out, r"<[^>]{0,200}>", " ")
    for entity, char in _ENTITIES.items():
        out = pc.replace_substring(out, entity, char)
    out = pc.replace_substring_regex(out, r"\s+", " ")
    out = pc.utf8_trim_whitespace(out)
    if lower:
        out = pc.utf8_lower(out)
    if max_chars is not None:
        out = pc.utf8_slice_codeunits(out, 0, max_chars)
    return out


def normalize_query(query: str) -> str:
    """The normal form of one query string (the same as :func:`normalize_text`)."""
    return normalize_text(pa.array([query])).to_pylist()[0]
