"""How texts become vectors outside training: the encoder in PyTorch, or exported to ONNX (fp32 or int8).

Three runtimes (``serve.encoder_runtime``, and the batch embedding of the ``embed`` stage):

* ``torch``: the saved model in PyTorch, the reference, and the GPU path;
* ``onnx``: the same graph exported by ``torch.onnx`` (the TorchScript exporter,
  ``dynamo=False``: exact here, where a first probe of another export drifted to a
  cosine of 0.94) and run by ONNX Runtime;
* ``onnx-int8``: that graph with its weights quantised to int8 per output channel
  (``onnxruntime.quantization.quantize_dynamic``): about twice the queries per
  second of ``torch`` on a CPU with VNNI, at a small cost in precision (cosine to
  ``torch`` about 0.99; the default per-tensor scheme fell to 0.94).

The ``export`` stage (:mod:`shoprank.encoder.export`) writes the ONNX files and, per
encoder, a verdict (``export.json``): whether the fp32 export matches PyTorch
(cosine at least ``export.min_cosine``), each runtime's queries per second and
validation NDCG@10, and the runtime ``auto`` picks: the fastest whose NDCG@10 is
within ``export.max_ndcg_drop`` of PyTorch's. Every reader goes through
:func:`load_embedder`, so Serve, the in-process pipeline and the batch embedding
share one path.

With ``student.enabled`` the ``distil`` stage (:mod:`shoprank.encoder.distil`) adds a
student with fewer layers, trained to put texts where the fine-tuned encoder puts
them: three more runtimes of the fine-tuned encoder, ``student``, ``student-onnx``
and ``student-onnx-int8``, judged by the export like the others. Because the student
lives in the teacher's space it only encodes what arrives at serving time (queries,
a live product's text) against the catalogue index the teacher built; the batch
embedding and the index stay the teacher's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np

from shoprank.encoder.tokens import fast_tokenizer
from shoprank.errors import ConfigError

if TYPE_CHECKING:
    from shoprank.config import Config
    from shoprank.store.run import Run

FINE_TUNED, ZERO_SHOT = "fine_tuned", "zero_shot"
"""The two encoders a run embeds its catalogue with (and serves): its trained one, and the pretrained
``encoder.model``."""
Runtime = Literal["torch", "onnx", "onnx-int8", "student", "student-onnx", "student-onnx-int8"]
RUNTIMES: tuple[Runtime, ...] = ("torch", "onnx", "onnx-int8")
"""Every encoder's own runtimes."""
STUDENT_RUNTIMES: tuple[Runtime, ...] = ("student", "student-onnx", "student-onnx-int8")
"""The fine-tuned encoder's distilled student in the same three forms (a run with ``student.enabled``)."""
STUDENT = ("encoder", "student")
"""Where the distil stage saves the student, under the run."""
EXPORT = ("encoder", "onnx")
"""Where the export stage writes, under the run."""
VERDICTS = "export.json"
INPUTS = ["input_ids", "attention_mask"]
OUTPUT = "sentence_embedding"
"""The graph's output name ("embedding" clashes with a name inside the exported graph under the dynamo exporter)."""


def onnx_file(name: str, runtime: Runtime) -> str:
    """The file of encoder ``name`` (``fine_tuned``, ``zero_shot``) for an ONNX ``runtime``; the student's files are
    ``student.onnx`` and ``student.int8.onnx`` (the fine-tuned encoder's only)."""
    if runtime in STUDENT_RUNTIMES:
        name = "student"
    return f"{name}.int8.onnx" if runtime.endswith("int8") else f"{name}.onnx"


class Embedder(Protocol):
    """Texts in, unit-length float32 rows out."""

    runtime: Runtime

    def embed(self, texts: list[str], max_length: int, batch_size: int = 128) -> np.ndarray: ...


@dataclass
class TorchEmbedder:
    """The PyTorch encoder (``shoprank.encoder.model.TextEncoder``) and its tokenizer."""

    encoder: Any
    tokenizer: Any
    device: str = "cpu"
    runtime: Runtime = "torch"

    def embed(self, texts: list[str], max_length: int, batch_size: int = 128) -> np.ndarray:
        from shoprank.encoder.model import encode

        return encode(self.encoder, self.tokenizer, texts, max_length, batch_size=batch_size, device=self.device)


@dataclass
class OnnxEmbedder:
    """An exported encoder in ONNX Runtime (CPU). ``threads``: its intra-op threads (default: ``OMP_NUM_THREADS``,
    which Ray sets to an actor's CPUs, else ONNX Runtime's own choice, one per core)."""

    path: Path
    tokenizer: Any
    runtime: Runtime = "onnx"
    threads: int | None = None
    session: Any = field(init=False, repr=False)

    def __post_init__(self) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        threads = self.threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
        if threads:
            options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = onnxruntime.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])

    def embed(self, texts: list[str], max_length: int, batch_size: int = 128) -> np.ndarray:
        out = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(texts[start: start + batch_size], padding=True, truncation=True,
                                   max_length=max_length, return_tensors="np")
            feed = {name: batch[name].astype(np.int64) for name in INPUTS}
            out.append(self.session.run([OUTPUT], feed)[0].astype(np.float32, copy=False))
        if not out:
            width = self.session.get_outputs()[0].shape[-1]  # the hidden size; a name where the export left it open
            return np.zeros((0, width if isinstance(width, int) else 0), np.float32)
        return np.concatenate(out)


def verdicts(run: Run) -> dict[str, Any]:
    """The export stage's ``export.json`` (encoder name -> verdict), or empty where the run has none."""
    return run.read_json(*EXPORT, VERDICTS) if run.exists(*EXPORT, VERDICTS) else {}


def chosen_runtime(config: Config, run: Run, name: str, asked: str) -> Runtime:
    """The runtime to serve encoder ``name`` with, for ``asked`` (``serve.encoder_runtime``).

    ``auto`` is the export's pick (:mod:`shoprank.encoder.export`) on CPU and ``torch``
    with ``ray.use_gpu`` or without an export; a named ONNX runtime must have passed
    the export's check, else the error says why it cannot serve. A student runtime
    asked of the zero-shot encoder (variant A, which has no student) is ``auto``:
    ``serve.encoder_runtime`` is one setting for every variant, and asking for the
    fine-tuned encoder's student must not stop the zero-shot baseline from serving.
    """
    verdict = verdicts(run).get(name, {})
    if asked in STUDENT_RUNTIMES and name == ZERO_SHOT:
        asked = "auto"
    if asked == "auto":
        return "torch" if config.ray.use_gpu else verdict.get("chosen", "torch")
    if asked == "torch":
        return "torch"
    offered = verdict.get("offered", [])
    if asked not in offered:
        if asked in STUDENT_RUNTIMES and not set(STUDENT_RUNTIMES) & set(offered):
            why = [f"{run.uri()} has no student encoder ({'/'.join(STUDENT)}, judged by its export): set "
                   "student.enabled: true and run its distil and export stages"]
        else:
            why = verdict.get("notes") or [f"{run.uri()} has no ONNX export ({'/'.join(EXPORT)}): run its export stage"]
        raise ConfigError(f"serve.encoder_runtime: {asked} cannot serve the {name} encoder of {run.uri()}: "
                          + "; ".join(why))
    return asked  # type: ignore[return-value]


def load_embedder(config: Config, run: Run, *, zero_shot: bool, runtime: Runtime = "torch",
                  device: str = "cpu") -> Embedder:
    """The run's fine-tuned encoder (or the pretrained one, ``zero_shot``) in ``runtime``: a student runtime is the
    fine-tuned encoder's student (the zero-shot encoder has none)."""
    name = ZERO_SHOT if zero_shot else FINE_TUNED
    if runtime in STUDENT_RUNTIMES and zero_shot:
        raise ConfigError(f"serve.encoder_runtime: {runtime} is the fine-tuned encoder's student; the zero-shot "
                          "encoder has none")
    if runtime == "student":
        from shoprank.encoder.model import load_saved

        encoder, tokenizer = load_saved(run.local_path(*STUDENT))
        encoder.to(device)
        return TorchEmbedder(encoder, tokenizer, device, "student")
    if runtime == "torch":
        from shoprank.encoder.model import load_encoder, load_encoder_from_config

        encoder, tokenizer = (load_encoder_from_config(config.encoder) if zero_shot
                              else load_encoder(run.local_path("encoder", "model")))
        encoder.to(device)
        return TorchEmbedder(encoder, tokenizer, device)
    path = run.local_path(*EXPORT) / onnx_file(name, runtime)
    return OnnxEmbedder(path, fast_tokenizer(tokenizer_source(config, run, zero_shot=zero_shot)), runtime)


def tokenizer_source(config: Config, run: Run, *, zero_shot: bool) -> str:
    """Where the tokenizer of the run's fine-tuned encoder (or the pretrained one, ``zero_shot``) loads from."""
    return config.encoder.model if zero_shot else str(run.local_path("encoder", "model") / "merged")
