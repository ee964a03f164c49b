"""A small HTTP client of the Serve app whose errors read well on a page or a terminal."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import httpx

from shoprank.errors import ShopRankError


class ServeError(ShopRankError):
    """The Serve app could not be reached or refused a request; the message says which and why."""


class ServeClient:
    """``POST /search``, ``/recommend``, ``/events``; ``GET /ab/report``, ``/variants``, ``/healthz``; ``PUT
    /products``, ``DELETE /products/{id}``; every call but ``/healthz`` with ``key`` (:mod:`shoprank.serving.keys`: a
    client key for the first three, an admin key for all)."""

    def __init__(self, url: str, key: str, timeout_s: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.http = httpx.Client(base_url=self.url, timeout=timeout_s, headers={"Authorization": f"Bearer {key}"})

    def _call(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None) -> Any:
        try:
            answer = self.http.request(method, path, json=body, headers=headers)
        except httpx.ConnectError:
            raise ServeError(f"The Serve app at {self.url} is not reachable. Is it running? "
                             "(`make demo` deploys it; `shoprank serve` redeploys it.)") from None
        except httpx.TimeoutException:
            raise ServeError(f"The Serve app at {self.url} did not answer {path} within {self.timeout_s:.0f} s; "
                             "it may be starting or overloaded. Try again.") from None
        except httpx.HTTPError as exc:
            raise ServeError(f"The request to {self.url}{path} failed: {type(exc).__name__}.") from None
        if answer.status_code == 404 and "detail" not in answer.text:
            raise ServeError(f"Nothing is deployed at {self.url}{path}: Serve runs, but not the shoprank app "
                             "(`shoprank serve` deploys it).")
        if answer.status_code in (401, 403):
            raise ServeError(f"{path}: {answer.status_code} {_reason(answer)} (this machine's keys: "
                             "`shoprank keys create --config <preset>` makes them; the app reads their digests)")
        if answer.status_code >= 400:
            raise ServeError(f"{path}: {answer.status_code} {_reason(answer)}")
        return answer.json()

    def search(self, query: str, user_id: str | None, k: int, variant: str | None = None,
               ts: str | None = None) -> dict[str, Any]:
        """``ts`` (ISO 8601): when the page was viewed, for a simulated visit; the app's clock when None."""
        return self._call("POST", "/search", {"query": query, "user_id": user_id, "k": k, "variant": variant, "ts": ts})

    def recommend(self, user_id: str | None, k: int, variant: str | None = None,
                  ts: str | None = None) -> dict[str, Any]:
        return self._call("POST", "/recommend", {"user_id": user_id, "k": k, "variant": variant, "ts": ts})

    def events(self, events: list[dict[str, Any]]) -> dict[str, Any]:
        return self._call("POST", "/events", events)

    def users(self, limit: int = 200) -> list[dict[str, str]]:
        return self._call("GET", f"/users?limit={limit}")

    def report(self) -> dict[str, Any]:
        return self._call("GET", "/ab/report")

    def variants(self) -> dict[str, Any]:
        return self._call("GET", "/variants")

    def restore_events(self, backup: str, replace: bool) -> dict[str, Any]:
        return self._call("POST", "/admin/events/restore", {"backup": backup, "replace": replace})

    def put_products(self, products: list[dict[str, Any]], batch_id: str | None = None) -> dict[str, Any]:
        """``PUT /products`` (an admin key): at most ``MAX_PRODUCTS_PER_REQUEST`` record rows, stored all or nothing;
        ``batch_id`` (the ``Idempotency-Key``) makes a resend of the same batch change nothing."""
        return self._call("PUT", "/products", products, {"Idempotency-Key": batch_id} if batch_id else None)

    def delete_product(self, product_id: str, batch_id: str | None = None) -> dict[str, Any]:
        """``DELETE /products/{product_id}`` (an admin key): ``deleted`` is False when it was deleted already."""
        return self._call("DELETE", f"/products/{quote(product_id, safe='')}", None,
                          {"Idempotency-Key": batch_id} if batch_id else None)

    def health(self) -> dict[str, Any]:
        return self._call("GET", "/healthz")

    def close(self) -> None:
        self.http.close()


def _reason(answer: httpx.Response) -> str:
    """The ``detail`` of a FastAPI error, as one line."""
    try:
        detail = answer.json().get("detail")
    except ValueError:
        return answer.text[:200]
    if isinstance(detail, list):
        return "; ".join(f"{'.'.join(str(p) for p in d.get('loc', [])[1:]) or 'body'}: {d.get('msg')}" for d in detail)
    return str(detail)
