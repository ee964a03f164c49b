"""Calibration by simulation: how often each A/B test errs, measured on the simulated shop's ground truth.

``shoprank experiment calibrate`` runs many simulated experiments, Ray-free and
vectorised (milliseconds each), and counts how often each test declares a
difference:

* **A/A** (both arms show the shop's own pages): every declared difference is a
  false positive, so the share must be about ``alpha``;
* **A/B** (arm B shows the same pages re-ordered by the shopper's hidden
  utility): the share is the test's power.

The shoppers are the shop's users (:class:`~shoprank.data.synthetic.ShopModel`:
hidden tastes, position bias, graded relevance), sent the way ``shoprank
simulate`` sends them through the live app: each shopper is drawn from the user
pool (without replacement while there are users enough), randomised by user,
and makes one visit of one to three pages, each a search (a query about the
visit's intent) or a browse of the intent's category, ten products a page.

To be fast, the pages are drawn once (:func:`build_bank`: ``pages_per_user``
pages per user, each page's products and, per product and arm, the ground
truth's probabilities of being examined, clicked, carted and bought, from
:meth:`ShopModel.response_probabilities`); an experiment then draws visits from
the bank and their clicks and purchases from those probabilities, all at once.
Each user's **pre-experiment history** is drawn the same way on the shop's own
pages, visits in proportion to the user's activity, as the simulated history is;
the CUPED covariate is the report's (:func:`~shoprank.experiment.userstats.pre_period_covariate`:
the share of the user's earlier visits that bought).

The **tests** are the report's own functions on the simulated users: the
per-impression two-proportion z-test (:func:`stats.compare`), the user-level
Welch and delta-method tests and CUPED (:mod:`userstats`), and the mSPRT
(:mod:`sequential`) looked at every ``look_every`` shoppers, as the page's
refresh does; the fixed-horizon Welch test peeked at every refresh shows why the
live view needs the sequential one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from shoprank.data.synthetic import ShopModel
from shoprank.experiment.plan import users_per_arm
from shoprank.experiment.sequential import always_valid, mixing_sd
from shoprank.experiment.stats import compare, wilson
from shoprank.experiment.userstats import UserTotals, compare_means, cuped, delta_ratio, pre_period_covariate, welch

PER_IMPRESSION_AA_FALSE_POSITIVES = {"ctr": 0.095, "conversion": 0.135}
"""The per-impression z-tests' A/A false-positive rates at alpha 0.05, as :func:`calibrate` measured them at its
defaults on the demo shop (docs/experiments.md's table): what the readout quotes above its per-impression figures."""
SHOP, RERANKED = 0, 1
"""Arms of the page bank: the shop's own order, and the same products by the shopper's hidden utility."""
ARM_NAMES = {SHOP: "the shop's own pages", RERANKED: "the same products re-ordered by the shopper's hidden utility"}


@dataclass
class PageBank:
    """Pre-drawn pages: ``pages_per_user`` per user; per page, slot and arm the response probabilities."""

    pages_per_user: int
    examine: np.ndarray
    """(slots,) P(examined) by position."""
    click: np.ndarray
    """(arms, pages, slots) P(click | examined); 0 for an empty slot."""
    cart: np.ndarray
    buy: np.ndarray
    price: np.ndarray
    activity: np.ndarray
    """(users,) each user's share of the shop's sessions: how often they visited before the experiment."""

    @property
    def users(self) -> int:
        return len(self.activity)


def build_bank(model: ShopModel, pages_per_user: int = 6, seed: int = 0) -> PageBank:
    """Draw every user's pages and their response probabilities under both arms (seconds for 2,000 users)."""
    shop = model.shop
    slots = shop.list_size
    users = len(model.users)
    probabilities = np.zeros((4, 2, users * pages_per_user, slots))
    price = np.zeros((2, users * pages_per_user, slots))
    examine_by_slot = np.zeros(slots)
    rng = np.random.default_rng([seed, 18])
    for user in range(users):
        for j in range(pages_per_user):
            page = user * pages_per_user + j
            intent = model.intent(user, rng)
            options = model.queries.by_leaf[intent]
            query: int | None = None
            if rng.random() < shop.search_fraction and len(options):
                query = int(options[rng.integers(len(options))])
                shown = model.search_results(query, slots, rng)
            else:
                shown = model.browse_results(intent, slots, rng)
            examine, click, cart, buy = model.response_probabilities(user, shown, query)
            examine_by_slot[: len(shown)] = examine
            best_first = np.argsort(-click, kind="stable")
            for arm, order in ((SHOP, np.arange(len(shown))), (RERANKED, best_first)):
                for k, values in enumerate((click, cart, buy)):
                    probabilities[k + 1, arm, page, : len(shown)] = values[order]
                price[arm, page, : len(shown)] = model.catalog.price[shown][order]
    return PageBank(pages_per_user, examine_by_slot, probabilities[1], probabilities[2], probabilities[3], price,
                    model.users.activity / model.users.activity.sum())


@dataclass
class Visits:
    """Simulated visits in arrival order: per visit its user and what it did."""

    user: np.ndarray
    impressions: np.ndarray
    clicks: np.ndarray
    purchases: np.ndarray
    revenue: np.ndarray


def _visits(bank: PageBank, users: np.ndarray, arm_of_user: np.ndarray, rng: np.random.Generator) -> Visits:
    """One visit per entry of ``users`` (1-3 pages, as ``shoprank simulate`` sends them), each user on its arm."""
    pages = 1 + np.minimum(rng.geometric(0.5, size=len(users)) - 1, 2)
    visit = np.repeat(np.arange(len(users)), pages)
    page_user = users[visit]
    rows = page_user * bank.pages_per_user + rng.integers(bank.pages_per_user, size=len(visit))
    arm = arm_of_user[page_user]
    draws = rng.random((4, len(visit), len(bank.examine)))
    shown = bank.price[arm, rows] > 0
    clicked = (draws[0] < bank.examine) & (draws[1] < bank.click[arm, rows])
    bought = clicked & (draws[2] < bank.cart[arm, rows]) & (draws[3] < bank.buy[arm, rows])

    def per_visit(values: np.ndarray) -> np.ndarray:
        return np.bincount(visit, weights=values.sum(axis=1), minlength=len(users))

    return Visits(users, per_visit(shown), per_visit(clicked), per_visit(bought),
                  per_visit(bought * bank.price[arm, rows]))


@dataclass
class Experiment:
    """One simulated experiment: the arms' visits in arrival order and each user's history."""

    visits: Visits
    treated: np.ndarray
    """(users,) True for the treatment arm."""
    before: Visits
    """Pre-experiment visits (all on the shop's own pages)."""


def simulate_experiment(bank: PageBank, shoppers: int, treatment: int, rng: np.random.Generator,
                        history_visits_per_user: float = 3.0) -> Experiment:
    """Draw one experiment: ``shoppers`` visits, users randomised 50/50, arm B on the ``treatment`` pages."""
    treated = rng.random(bank.users) < 0.5
    history_users = rng.choice(bank.users, size=round(history_visits_per_user * bank.users), p=bank.activity)
    before = _visits(bank, history_users, np.full(bank.users, SHOP), rng)
    users = rng.choice(bank.users, size=shoppers, replace=shoppers > bank.users)
    visits = _visits(bank, users, np.where(treated, treatment, SHOP), rng)
    return Experiment(visits, treated, before)


def _per_user(visits: Visits, pool: int, count: int | None = None) -> dict[str, np.ndarray]:
    """Per-user sums over the first ``count`` visits (all by default), for each of the ``pool`` users."""
    chosen = slice(None, count)

    def total(values: np.ndarray | None) -> np.ndarray:
        return np.bincount(visits.user[chosen], weights=None if values is None else values[chosen], minlength=pool)

    return {"visits": total(None), "impressions": total(visits.impressions), "clicks": total(visits.clicks),
            "purchases": total(visits.purchases), "revenue": total(visits.revenue)}


TESTS: tuple[tuple[str, str, str], ...] = (
    ("impression_z_ctr", "per-impression z-test, CTR", "end"),
    ("impression_z_conversion", "per-impression z-test, conversion", "end"),
    ("user_delta_ctr", "user-level delta method, CTR", "end"),
    ("user_welch_conversion", "user-level Welch, conversion per user", "end"),
    ("user_cuped_conversion", "user-level Welch + CUPED, conversion per user", "end"),
    ("user_welch_revenue", "user-level Welch, revenue per user", "end"),
    ("peeked_welch_conversion", "user-level Welch, conversion per user, peeked", "every refresh"),
    ("sequential_conversion", "mSPRT (planned-size threshold), conversion per user", "every refresh"),
    ("sequential_ctr", "mSPRT (planned-size threshold), CTR", "every refresh"),
    ("sequential_ville_conversion", "mSPRT (Ville threshold 1/alpha), conversion per user", "every refresh"),
)
"""(key, what the table calls it, when it is read)."""


@dataclass
class Verdicts:
    """Which tests declared a difference in one experiment, and what CUPED achieved."""

    rejected: dict[str, bool]
    conversion_difference: float
    conversion_sigma: float
    cuped_reduction: float | None


def judge(experiment: Experiment, look_every: int, alpha: float = 0.05) -> Verdicts:
    """Every test of :data:`TESTS` on one experiment."""
    visits, treated = experiment.visits, experiment.treated
    pool = len(treated)
    end = _per_user(visits, pool)
    seen = end["visits"] > 0
    a, b = seen & ~treated, seen & treated
    history = experiment.before
    converted_before = np.bincount(history.user, weights=(history.purchases > 0).astype(float), minlength=pool)
    visits_before = np.bincount(history.user, minlength=pool).astype(float)
    nothing = np.zeros(int(seen.sum()))
    before = pre_period_covariate("conversion_per_user", UserTotals(  # the report's covariate, over the shoppers seen
        nothing, nothing, nothing, nothing, nothing, visits_before[seen], converted_before[seen]))
    covariate = np.zeros(pool)
    covariate[seen] = before
    rejected: dict[str, bool] = {}
    ctr = compare(int(end["clicks"][a].sum()), int(end["impressions"][a].sum()),
                  int(end["clicks"][b].sum()), int(end["impressions"][b].sum()))
    conversion = compare(int(end["purchases"][a].sum()), int(end["impressions"][a].sum()),
                         int(end["purchases"][b].sum()), int(end["impressions"][b].sum()))
    rejected["impression_z_ctr"] = ctr.p_value < alpha
    rejected["impression_z_conversion"] = conversion.p_value < alpha
    bought = (end["purchases"] > 0).astype(float)
    delta = delta_ratio("ctr", end["clicks"][a], end["impressions"][a], end["clicks"][b], end["impressions"][b])
    plain = welch("conversion_per_user", bought[a], bought[b])
    adjusted = cuped("conversion_per_user", bought[a], covariate[a], bought[b], covariate[b])
    revenue = welch("revenue_per_user", end["revenue"][a], end["revenue"][b])
    for key, effect in (("user_delta_ctr", delta), ("user_welch_conversion", plain),
                        ("user_cuped_conversion", adjusted), ("user_welch_revenue", revenue)):
        rejected[key] = effect.p_value is not None and effect.p_value < alpha
    planned = max(1, len(visits.user) // 2)
    peeks = {key: False for key in ("peeked_welch_conversion", "sequential_conversion", "sequential_ctr",
                                    "sequential_ville_conversion")}
    for count in range(look_every, len(visits.user) + 1, look_every):
        now = _per_user(visits, pool, count)
        seen_now = now["visits"] > 0
        a_now, b_now = seen_now & ~treated, seen_now & treated
        bought_now = (now["purchases"] > 0).astype(float)
        for metric, effect in (
            ("conversion", compare_means("conversion_per_user", bought_now[a_now], bought_now[b_now], normal=True)),
            ("ctr", delta_ratio("ctr", now["clicks"][a_now], now["impressions"][a_now], now["clicks"][b_now],
                                now["impressions"][b_now])),
        ):
            if effect.standard_error is None or effect.difference is None:
                continue
            tau = mixing_sd(effect.standard_error, effect.users_control, effect.users_treatment, planned, alpha)
            peeks[f"sequential_{metric}"] |= always_valid(effect.difference, effect.standard_error, tau, alpha).reject
            if metric == "conversion":
                peeks["peeked_welch_conversion"] |= bool(effect.p_value is not None and effect.p_value < alpha)
                peeks["sequential_ville_conversion"] |= always_valid(effect.difference, effect.standard_error, tau,
                                                                     alpha, horizon=False).reject
    rejected.update(peeks)
    sigma = float(np.sqrt((bought[a].var(ddof=1) + bought[b].var(ddof=1)) / 2)) if a.sum() > 1 and b.sum() > 1 else 0.0
    return Verdicts(rejected, plain.difference or 0.0, sigma, adjusted.variance_reduction)


@dataclass
class Calibration:
    """What ``shoprank experiment calibrate`` prints."""

    experiments: int
    shoppers: int
    look_every: int
    alpha: float
    false_positives: dict[str, int]
    detections: dict[str, int]
    ab_conversion_difference: float
    conversion_sigma: float
    conversion_baseline: float
    cuped_reduction: float
    seconds_per_experiment: float

    def shoppers_for_power(self, target_power: float = 0.8) -> int | None:
        """Shoppers (both arms) the fixed-horizon conversion-per-user test needs for the measured A/B effect."""
        if self.ab_conversion_difference <= 0 or self.conversion_sigma <= 0:
            return None
        return 2 * users_per_arm(self.ab_conversion_difference, self.conversion_sigma, self.alpha, target_power)

    def table(self) -> str:
        """The Markdown table: per test the A/A false-positive rate with its Wilson interval, and the A/B power."""
        lines = [f"{self.experiments} A/A and {self.experiments} A/B experiments of {self.shoppers} simulated "
                 f"shoppers each, alpha {self.alpha}, the page refreshed every {self.look_every} shoppers",
                 "", "| test | read | A/A false positives [95% CI] | A/B power |", "|---|---|---|---|"]
        for key, name, when in TESTS:
            rate = wilson(self.false_positives[key], self.experiments)
            lines.append(f"| {name} | {when} | {rate.rate:.3f} [{rate.low:.3f}, {rate.high:.3f}] | "
                         f"{self.detections[key] / self.experiments:.2f} |")
        needed = self.shoppers_for_power()
        lines += ["", f"Arm A: {ARM_NAMES[SHOP]}; arm B: {ARM_NAMES[RERANKED]}. "
                  f"Conversion per user: A {self.conversion_baseline:.4f}, B - A {self.ab_conversion_difference:+.4f} "
                  f"(mean over the A/B experiments); CUPED removed {self.cuped_reduction:.1%} of its variance.",
                  "Shoppers for 80% power of the fixed-horizon conversion-per-user test at this effect: "
                  + (f"{needed:,}" if needed else "no effect to detect") + "."]
        return "\n".join(lines)


def calibrate(model: ShopModel, experiments: int = 200, shoppers: int = 2_000, look_every: int = 20,
              alpha: float = 0.05, seed: int = 0, pages_per_user: int = 6) -> Calibration:
    """Run ``experiments`` A/A and as many A/B experiments and count each test's rejections."""
    bank = build_bank(model, pages_per_user, seed)
    started = time.perf_counter()
    rng = np.random.default_rng([seed, 1818])
    false_positives = {key: 0 for key, _, _ in TESTS}
    detections = dict(false_positives)
    differences, sigmas, baselines, reductions = [], [], [], []
    for _ in range(experiments):
        null = judge(simulate_experiment(bank, shoppers, SHOP, rng), look_every, alpha)
        effect_run = simulate_experiment(bank, shoppers, RERANKED, rng)
        effect = judge(effect_run, look_every, alpha)
        for key in false_positives:
            false_positives[key] += null.rejected[key]
            detections[key] += effect.rejected[key]
        differences.append(effect.conversion_difference)
        sigmas.append(effect.conversion_sigma)
        baseline_users = _per_user(effect_run.visits, bank.users)
        control = (baseline_users["visits"] > 0) & ~effect_run.treated
        baselines.append(float((baseline_users["purchases"][control] > 0).mean()))
        reductions.append(null.cuped_reduction or 0.0)
    seconds = (time.perf_counter() - started) / max(1, 2 * experiments)
    return Calibration(experiments, shoppers, look_every, alpha, false_positives, detections,
                       float(np.mean(differences)), float(np.mean(sigmas)), float(np.mean(baselines)),
                       float(np.mean(reductions)), seconds)
