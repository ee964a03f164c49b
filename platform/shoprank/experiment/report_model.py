"""The A/B report's shape (``GET /ab/report``), as the API documents and checks it.

:func:`shoprank.experiment.report.ab_report` builds the report as plain dicts; these models say what each of them
holds, so the OpenAPI schema describes the real answer and the app validates every report it sends against it.
Where the report writes a statistics dataclass as it is (a rate, the sample-ratio check, an effect, the always-valid
readout), the model names that dataclass rather than a copy of its fields. Every model forbids fields it does not
name: a figure added to the report and not here fails the app's response validation (a 500 that the contract test
finds), instead of being dropped silently from the answer.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from shoprank.experiment.sequential import AlwaysValid
from shoprank.experiment.stats import Rate, SampleRatio
from shoprank.experiment.userstats import Effect


class Closed(BaseModel):
    """A part of the report: exactly these fields."""

    model_config = ConfigDict(extra="forbid")


class FunnelStep(Closed):
    step: Literal["view", "click", "add_to_cart", "purchase"]
    count: int
    rate_of_previous: float


class VariantCounts(Closed):
    """One variant's assigned traffic, an engagement counted once per impression and kind."""

    users: int
    impressions: int
    clicks: int
    add_to_carts: int
    purchases: int
    ctr: Rate
    conversion: Rate
    clicks_per_engaged_session: float
    funnel: list[FunnelStep]
    hides: int = Field(description='Impressions the shopper said "not interested" to (the product, its brand or its '
                                   "category), once each: no engagement, a guardrail.")
    hide_rate: Rate = Field(description="hides / impressions.")


class Comparison(Closed):
    """B against A on one rate (:class:`shoprank.experiment.stats.Comparison`); null where undefined (a control rate
    of 0 has no relative lift)."""

    control: Rate
    treatment: Rate
    lift: float | None
    lift_low: float | None
    lift_high: float | None
    z: float | None
    p_value: float | None


class Lift(Closed):
    ctr: Comparison
    conversion: Comparison


class SideBySide(Closed):
    """The forced answers' own counts (side-by-side views), apart from the test."""

    impressions: int
    clicks: int
    add_to_carts: int
    purchases: int


class TimelinePoint(Closed):
    ts: float = Field(description="Epoch seconds.")
    variant: str
    impressions: int
    ctr: float
    conversion: float


class UserFunnel(Closed):
    shown: int
    clicked: int
    carted: int
    bought: int


class UserVariant(Closed):
    users: int
    sessions: int
    revenue: float | None = Field(description="Null when the report has no prices.")
    revenue_per_user: float | None
    average_order_value: float | None
    funnel_users: UserFunnel


class MetricResult(Closed):
    """One metric, B against A: fixed-horizon, CUPED-adjusted, and the always-valid readout (null without a
    standard error) of the estimate ``estimate`` names."""

    fixed_horizon: Effect
    cuped: Effect
    always_valid: AlwaysValid | None
    estimate: Literal["fixed_horizon", "cuped"] = Field(
        description="The estimate the always-valid test and the verdict read: cuped where CUPED could adjust.")


class MetricMissing(Closed):
    missing: str = Field(description="Why the metric has no figures (a revenue metric without prices).")


class Verdict(Closed):
    decision: str = Field(pattern=r"^(ship \S+|keep \S+|keep running|fix the assignment)$", description="ship <treatment>, "
                          "keep <control>, keep running or fix the assignment (two variants: ship B, keep A, ...).")
    rule: str = Field(description="The rule that decided.")
    winner: str | None = Field(None, description="A/B/n: the treatment shipped (None: none).")


class UserLevel(Closed):
    """The shopper as the unit (:func:`shoprank.experiment.report.user_level`); ``metrics``, ``past_planned_size``
    and ``verdict`` need both the control and the treatment variant."""

    unit: Literal["user"]
    experiment_start: str | None
    variants: dict[str, UserVariant]
    session_gap_s: float
    planned_users_per_arm: int
    planned_size_from: str = Field(description="Where the planned size came from: serve.planned_users_per_arm, the "
                                   "plan for the served variants' offline figures, or the default.")
    alpha: float
    users_with_history: int = Field(description="The experiment's users with a pre-period (CUPED's covariate).")
    pre_period: str = Field(description="What the pre-period was: the run's event log and the live store's events.")
    decision_metric: str = Field(description="The metric the verdict reads (serve.decision_metric).")
    revenue: str
    metrics: dict[str, MetricResult | MetricMissing] | None = None
    past_planned_size: bool | None = None
    verdict: Verdict | None = None


class HolmAdjusted(Closed):
    """A comparison's p-values adjusted with Holm's step-down over its metric's family (every treatment against
    the control): null without a p-value."""

    p_value: float | None = Field(description="The fixed-horizon p-value of the estimate ``estimate`` names, "
                                              "adjusted.")
    always_valid_p_value: float | None = Field(description="The always-valid p-value, adjusted (valid at any look).")
    reject: bool = Field(description="Adjusted fixed-horizon p-value below alpha.")
    always_valid_reject: bool = Field(description="Adjusted always-valid p-value below alpha.")


class ArmMetricResult(MetricResult):
    """One metric, a treatment against the control, with its Holm-adjusted p-values."""

    holm: HolmAdjusted


class ArmComparison(Closed):
    """One treatment against the control (:func:`shoprank.experiment.report.comparisons`)."""

    users: int
    lift: Lift = Field(description="Per-impression lifts (descriptive).")
    lift_p_holm: dict[str, float | None] = Field(description="The lifts' p-values, Holm-adjusted over the treatments.")
    metrics: dict[str, ArmMetricResult | MetricMissing]


class Comparisons(Closed):
    """A/B/n: every treatment against the control, Holm-adjusted per metric, and the experiment's verdict."""

    control: str
    treatments: list[str]
    correction: Literal["holm"]
    family: str = Field(description="What one Holm family is.")
    alpha: float
    past_planned_size: bool = Field(description="Every arm has the planned users.")
    arms: dict[str, ArmComparison]
    verdict: Verdict


class OfflineFigures(Closed):
    """A variant's offline NDCG@10 per task (:func:`shoprank.serving.variants.offline_figures`)."""

    system: str | None = Field(description="The evaluation's row for what the variant serves (None: not evaluated).")
    ndcg_at_10: dict[str, float] = Field(alias="ndcg@10", description="Test split NDCG@10 per task (search, "
                                                                      "recommend) that has figures.")
    note: str | None = Field(description="Why a figure is missing, when one is.")


class Guardrail(Closed):
    """A variant's answers as the guardrails read them (:mod:`shoprank.experiment.guardrails`)."""

    requests: int = Field(description="Answers to /search and /recommend in the window.")
    errors: int = Field(description="Of those, 5xx answers.")
    error_rate: float
    p99_ms: float
    breached: list[str] = Field(description="The limits (serve.guardrail_*) this variant breaches; empty: none, or "
                                            "too few answers to judge.")


class ABReport(Closed):
    """``GET /ab/report``: see :mod:`shoprank.experiment.report`."""

    experiment: str
    variants: dict[str, VariantCounts]
    lift: Lift | None = Field(None, description="Present when both the control and the treatment variant serve.")
    sample_ratio: SampleRatio = Field(description="Chi-square test of the users of every variant against the "
                                                  "split's weights; mismatch below p = 0.001.")
    comparisons: Comparisons | None = Field(None, description="A/B/n: every variant but the control against it, "
                                                              "Holm-adjusted; present when the control and a "
                                                              "treatment serve.")
    side_by_side: dict[str, SideBySide]
    timeline: list[TimelinePoint]
    user_level: UserLevel
    impressions_dropped: int = Field(description="Impressions the ingress queues dropped under load (not counted). "
                                     "What an ingress replica still queued when it died without a graceful shutdown "
                                     "never reached the store and is not here: the shoprank_impressions_waiting gauge "
                                     "shows each replica's queue, so its last value is what such a loss was.")
    offline: dict[str, OfflineFigures] = Field(
        default_factory=dict, description="Each variant's offline figures, from its run's evaluation.")
    guardrails: dict[str, Guardrail] = Field(
        default_factory=dict, description="Per variant: latency and server errors of its last serve.guardrail_window "
        "answers in the ingress replica that wrote this report; a treatment that breaches a limit is not shipped.")
