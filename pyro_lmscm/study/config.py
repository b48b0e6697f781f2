"""The settings of a counterfactual study: a dataclass, loadable from YAML or JSON.

A study is fully described by a :class:`StudyConfig`. Its fields are of two kinds:

* **result fields** (:data:`RESULT_FIELDS`) decide the numbers: model, dtype, intervention,
  decoding, draws per string, seed and attribute check. They are written to
  ``<output>/study.json``; resuming into a folder written with other result fields is refused.
  ``batch_size`` (unless 1), ``exact_only`` (if set) and ``draw_scores`` (if off) are result
  fields too.
* **execution fields** decide only how the work is done: output format, threads, Ray,
  workers, shard size, device, progress bar, bootstrap size. Changing them between runs is
  allowed, except the output format once records are stored (a folder holds one store).

In a YAML or JSON file, relative paths (``corpus``) are read from the file's folder; the
output folder is relative to the working directory (default ``studies/<name>``).

A config is data: no key of a file or mapping switches code on. ``allow_code`` (an attribute
that names a function to import and run) is set only by a caller, ``--allow-code`` on the
command line or ``allow_code=True`` in Python, and is never written to ``study.json``. A
config file cannot name a Ray cluster either (``ray_address``: the cluster runs code in this
process); ``--ray-address`` or a Python caller does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Union

from ..defaults import DEFAULTS
from ..errors import DecodingError, StudyError
from ..models.decoding import Decoding
from ..validation import MAX_THREADS, as_int, as_path, as_seed, load_data_file
from .attribute import check_code_allowed

__all__ = [
    "DEMO_CONFIG",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_EXACT_BATCH_SIZE",
    "MAX_BOOTSTRAP",
    "RESULT_FIELDS",
    "StudyConfig",
    "StudyError",
    "demo_config",
]

#: Intervention given as a spec string (``"steer=female:1.0"``) or a mapping (see
#: :func:`~pyro_lmscm.interventions.spec.parse_intervention`).
InterventionSpec = Union[str, Mapping[str, Any]]

#: The fields that decide the results; a resumed study must agree on all of them.
RESULT_FIELDS = (
    "model",
    "dtype",
    "intervention",
    "num_samples",
    "max_new_tokens",
    "temperature",
    "top_k",
    "top_p",
    "seed",
    "attribute",
)

#: The defaults of :attr:`StudyConfig.attribution` (those of :func:`~pyro_lmscm.inference.attribute`).
_ATTRIBUTION_DEFAULTS: dict[str, Any] = {"by": "layer", "max_exact_parts": 12, "num_permutations": 64}

#: Strings per batch by default (:attr:`StudyConfig.batch_size`), measured on the 2-core CPU
#: with SmolLM2 bfloat16 (benchmarks/README.md): the MC study (4 draws, 32 tokens) runs 2.74,
#: 2.56 and 2.61 s per string at 8, 16 and 32 strings per batch.
DEFAULT_BATCH_SIZE = 16

#: The same for an exact-only study (25 tokens, top-k 50: 0.34, 0.29, 0.29 and 0.28 s per
#: string at 16, 32, 64 and 128; larger batches hold more memory for little more speed).
DEFAULT_EXACT_BATCH_SIZE = 64

#: The most bootstrap resamples (:attr:`StudyConfig.bootstrap`): the summary draws a
#: ``(bootstrap, strings)`` table of indices at once (10**5 resamples of 1000 strings: 800 MB).
MAX_BOOTSTRAP = 100_000

#: The packaged demo study (``pyro-lmscm study --demo``).
DEMO_CONFIG = "demo_study.yaml"

_FORMATS = ("jsonl", "parquet")


def _data_path(name: str) -> Path:
    return Path(str(resources.files("pyro_lmscm.study").joinpath("data", name)))


@dataclass
class StudyConfig:
    """Everything a study needs.

    :param corpus: a ``.txt``, ``.jsonl`` or ``.csv`` file of prompts (see
        :func:`~pyro_lmscm.study.corpus.read_corpus`), or ``"demo"`` for the built-in corpus.
    :param output: the results folder; default ``studies/<name>``.
    :param name: a short name, used in the report and the default output folder.
    :param model: an embedded model name, a local ``save_pretrained`` folder or a hub id
        (:func:`~pyro_lmscm.loading.load_lm`).
    :param dtype: ``"float32"`` or ``"bfloat16"`` (or any dtype ``load_lm`` accepts).
    :param intervention: an intervention spec (string or mapping) for
        :func:`~pyro_lmscm.interventions.spec.parse_intervention`.
    :param num_samples: posterior draws per string (and as many interventional draws).
    :param max_new_tokens: :math:`T`, the length of sampled continuations and the most
        tokens kept of a given one.
    :param temperature: decoding temperature.
    :param top_k: decoding top-k, ``None`` for none.
    :param top_p: decoding top-p, ``None`` for none.
    :param seed: the study seed; string ``i`` is seeded by ``(seed, i)`` only.
    :param attribute: the target-attribute check: ``"gender"`` (male to female words),
        ``"gender:male"`` (the reverse), a mapping (see
        :func:`~pyro_lmscm.study.attribute.make_attribute`) or ``None``.
    :param allow_code: allow an ``attribute`` that names a function to import and run on
        every text (off: a config is data, and such a config is refused). Only a caller sets
        it (``StudyConfig(allow_code=True)``, ``from_file(..., allow_code=True)``,
        ``--allow-code``); a config file or mapping that holds the key is refused.
    :param force_recompute: on resume, recompute the records whose inputs changed (see
        :func:`~pyro_lmscm.study.runner.run_study`) instead of refusing.
    :param format: ``"jsonl"`` or ``"parquet"`` (needs ``pyarrow``); a folder with records
        resumes in its own format only.
    :param threads: torch threads per process (also per Ray worker).
    :param limit: process only the first ``limit`` strings of the corpus.
    :param bootstrap: bootstrap resamples for the confidence intervals, at most :data:`MAX_BOOTSTRAP`.
    :param confidence: the confidence level of the intervals.
    :param ray: run on Ray (a local instance unless ``ray_address`` is given).
    :param ray_address: the address of a Ray cluster (implies ``ray``).
    :param num_workers: Ray actors, each holding one model.
    :param shard_size: strings per Ray task.
    :param report: write the tables, plots and HTML report at the end.
    :param progress: show a progress bar with ETA.
    :param batch_size: strings decoded together, in blocks of consecutive corpus indices
        (see :mod:`~pyro_lmscm.study.worker`); results are reproducible for a given
        ``batch_size``, and ``1`` runs each string alone. ``0`` (the default):
        :data:`DEFAULT_BATCH_SIZE`, or :data:`DEFAULT_EXACT_BATCH_SIZE` with ``exact_only``.
    :param exact_only: record only the exact metrics per string, with no draws (P(unchanged),
        the first-divergence law and its mean, the most probable counterfactual).
    :param draw_scores: score every draw: its per-token log-probabilities under both
        mechanisms and, for a counterfactual draw, its exact per-token probabilities (the
        intervened ones recorded while the draw is decoded,
        :class:`~pyro_lmscm.inference.TokenScoreMessenger`). Off, those fields are
        null and the study runs about 1.5-2x faster in batches; the draws themselves, their
        distances and attributes, the factual string's scores and the string's exact metrics
        are the same numbers (the summary's log-probability rows then count no draws).
    :param device: the model's device (``"cpu"``, ``"cuda"``, ...); default: the loader's.
    :param attribution: add to every record the exact attribution of the intervention's effect
        to the parts of its mechanism (:func:`~pyro_lmscm.inference.attribute`, one
        teacher-forced pass per evaluated subset of parts): ``"layer"`` or a mapping
        ``{"by": "layer", "max_exact_parts": 12, "num_permutations": 64}`` (the permutation
        estimate above ``max_exact_parts`` parts is seeded by the string's seed); ``None``
        (the default) for none. It names what to attribute to, never a function. A result field.
    :raises StudyError: on a bad value.
    """

    corpus: str
    output: str | None = None
    name: str = "study"
    model: str = DEFAULTS.model
    dtype: str = DEFAULTS.dtype
    intervention: InterventionSpec = "steer=female"
    num_samples: int = DEFAULTS.num_samples
    max_new_tokens: int = DEFAULTS.max_new_tokens
    temperature: float = DEFAULTS.temperature
    top_k: int | None = DEFAULTS.top_k
    top_p: float | None = DEFAULTS.top_p
    seed: int = DEFAULTS.seed
    attribute: str | dict[str, Any] | None = "gender"
    allow_code: bool = False
    force_recompute: bool = False
    format: str = "jsonl"
    threads: int = 1
    limit: int | None = None
    bootstrap: int = 2000
    confidence: float = 0.95
    ray: bool = False
    ray_address: str | None = None
    num_workers: int = 2
    shard_size: int = 4
    report: bool = True
    progress: bool = True
    batch_size: int = 0
    exact_only: bool = False
    draw_scores: bool = True
    device: str | None = DEFAULTS.device
    attribution: str | dict[str, Any] | None = None
    _base_dir: str | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        def positive(name: str, minimum: int = 1) -> None:
            value = getattr(self, name)
            as_int(value, name, minimum=minimum, error=StudyError, owner="StudyConfig")

        if not isinstance(self.corpus, (str, Path)) or not str(self.corpus):
            raise StudyError(f"StudyConfig: `corpus` must be a path or 'demo', got {self.corpus!r}.")
        self.corpus = str(self.corpus)
        if self.output is not None:
            if not isinstance(self.output, (str, Path)) or not str(self.output):
                raise StudyError(f"StudyConfig: `output` must be a folder path, got {self.output!r:.80}.")
            self.output = str(self.output)
        if self.batch_size == 0 and not isinstance(self.batch_size, bool):  # the default for the kind of study
            self.batch_size = DEFAULT_EXACT_BATCH_SIZE if self.exact_only is True else DEFAULT_BATCH_SIZE
        counts = ("num_samples", "max_new_tokens", "num_workers", "shard_size", "bootstrap", "batch_size")
        for name in counts:
            positive(name)
        as_int(self.bootstrap, "bootstrap", minimum=1, maximum=MAX_BOOTSTRAP, error=StudyError, owner="StudyConfig")
        as_int(self.threads, "threads", minimum=1, maximum=MAX_THREADS, error=StudyError, owner="StudyConfig")
        if self.limit is not None:
            positive("limit", 0)
        as_seed(self.seed, error=StudyError)
        if self.format not in _FORMATS:
            raise StudyError(f"StudyConfig: `format` must be one of {_FORMATS}, got {self.format!r}.")
        if not isinstance(self.confidence, float) or not 0.0 < self.confidence < 1.0:
            raise StudyError(f"StudyConfig: `confidence` must be a float in (0, 1), got {self.confidence!r}.")
        if not isinstance(self.intervention, (str, Mapping)):
            raise StudyError(
                f"StudyConfig: `intervention` must be a spec string or a mapping, got {self.intervention!r}; "
                "e.g. 'steer=female:1.0' or {'steer': {'direction': 'female'}}."
            )
        if isinstance(self.intervention, Mapping):
            self.intervention = dict(self.intervention)
        _check_name(self.name)
        if self.output is not None and "\0" in self.output:
            raise StudyError(f"StudyConfig: `output` must be a folder path, got {self.output!r} (it holds a NUL).")
        if self.ray_address is not None:
            self.ray = True
        if self.device is not None and not isinstance(self.device, str):
            raise StudyError(f"StudyConfig: `device` must be a device name such as 'cuda', got {self.device!r}.")
        for text in ("model", "dtype", "ray_address"):
            if not isinstance(getattr(self, text), str) and not (text == "ray_address" and self.ray_address is None):
                raise StudyError(f"StudyConfig: `{text}` must be a string, got {getattr(self, text)!r:.80}.")
        for flag in ("allow_code", "force_recompute", "exact_only", "draw_scores", "ray", "report", "progress"):
            if not isinstance(getattr(self, flag), bool):
                raise StudyError(f"StudyConfig: `{flag}` must be true or false, got {getattr(self, flag)!r}.")
        top_k = None if self.top_k == 0 and not isinstance(self.top_k, bool) else self.top_k  # the CLI's "none"
        try:  # the decoding settings, checked here rather than after the output folder is written
            Decoding(self.temperature, top_k, self.top_p)
        except DecodingError as error:
            raise StudyError(f"StudyConfig: {error}") from None
        # one value, one type: `temperature: 1` (YAML) and `--temperature 1` (a float) are one study,
        # with one fingerprint
        self.temperature = float(self.temperature)
        if self.top_p is not None:
            self.top_p = float(self.top_p)
        check_code_allowed(self.attribute, self.allow_code)
        self.attribution_options()  # checked now, not per string

    def attribution_options(self) -> dict[str, Any] | None:
        """:attr:`attribution` as the keyword arguments of :func:`~pyro_lmscm.inference.attribute`
        (``by``, ``max_exact_parts``, ``num_permutations``), defaults filled in; ``None`` for none.

        :raises StudyError: for anything else than ``"layer"`` or such a mapping.
        """
        value = self.attribution
        if value is None or value == "none":
            return None
        options = {"by": value} if isinstance(value, str) else value
        if not isinstance(options, Mapping):
            raise StudyError(
                f"StudyConfig: `attribution` must be 'layer' or a mapping {{by: layer, max_exact_parts: 12, "
                f"num_permutations: 64}}, got {value!r:.80}."
            )
        unknown = sorted(set(options) - set(_ATTRIBUTION_DEFAULTS), key=str)
        if unknown:
            raise StudyError(
                f"StudyConfig: unknown `attribution` keys {unknown}; known keys: {sorted(_ATTRIBUTION_DEFAULTS)}."
            )
        out = {**_ATTRIBUTION_DEFAULTS, **options}
        if out["by"] != "layer":
            hint = (
                " A study attributes to the parts of the mechanism only; the step curve of one string is "
                "`pyro-lmscm attribute --by step`." if out["by"] == "step" else ""
            )
            raise StudyError(f"StudyConfig: `attribution.by` must be 'layer', got {out['by']!r:.80}.{hint}")
        as_int(out["max_exact_parts"], "attribution.max_exact_parts", minimum=0, error=StudyError, owner="StudyConfig")
        as_int(out["num_permutations"], "attribution.num_permutations", minimum=1, error=StudyError,
               owner="StudyConfig")
        return out

    # -- construction ------------------------------------------------------------------

    @classmethod
    def from_mapping(
        cls,
        data: Mapping[str, Any],
        base_dir: str | Path | None = None,
        *,
        allow_code: bool = False,
        source: str | Path | None = None,
    ) -> StudyConfig:
        """Build from a mapping (a parsed YAML / JSON file); relative ``corpus`` paths are
        read from ``base_dir``.

        :param allow_code: see :class:`StudyConfig`; the caller's choice, never a key of ``data``.
        :param source: the file ``data`` was read from, for the messages.
        :raises StudyError: on an unknown key (the message lists the known ones), or an
            ``allow_code`` key.
        """
        if not isinstance(data, Mapping):
            raise StudyError(f"a study config must be a mapping, got {type(data).__name__}.")
        if "allow_code" in data:
            where = f"study config {str(source)!r}" if source is not None else "a study config"
            raise StudyError(
                f"{where} sets `allow_code` ({data['allow_code']!r}): a config is data and cannot switch code on. "
                "Remove the key; to run the function an attribute names, pass --allow-code on the command "
                "line (or allow_code=True in Python) if you trust this config."
            )
        known = {f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")}
        unknown = sorted(set(data) - known, key=str)
        if unknown:
            raise StudyError(f"unknown study config keys {unknown}; known keys: {sorted(known)}.")
        if "corpus" not in data:
            raise StudyError("the study config has no `corpus` (a .txt/.jsonl/.csv file or 'demo').")
        return cls(**dict(data), allow_code=allow_code, _base_dir=str(base_dir) if base_dir is not None else None)

    @classmethod
    def from_file(cls, path: str | Path, *, allow_code: bool = False, **overrides: Any) -> StudyConfig:
        """Load a YAML (``.yaml``, ``.yml``) or JSON (``.json``) config; ``overrides`` that are
        not ``None`` replace its values.

        :param allow_code: see :class:`StudyConfig`; the file cannot set it.
        :raises StudyError: if the file is missing or malformed, or sets ``allow_code`` or
            ``ray_address`` (a Ray cluster is trusted with the process: only an override sets it).
        """
        path = as_path(path, "study config file", StudyError)
        if not path.exists():
            raise StudyError(f"study config file {str(path)!r} does not exist.")
        if not path.is_file():
            raise StudyError(f"study config file {str(path)!r} is not a file (a directory?).")
        if path.suffix not in (".json", ".yaml", ".yml"):
            raise StudyError(f"study config {str(path)!r}: expected a .yaml, .yml or .json file.")
        data = load_data_file(path, "study config", StudyError)
        if data is not None and not isinstance(data, Mapping):
            raise StudyError(
                f"study config {str(path)!r} must hold a mapping of settings (corpus: ..., model: ...), "
                f"got {type(data).__name__} {data!r:.80}."
            )
        data = dict(data or {})
        if data.get("ray_address") is not None:
            raise StudyError(
                f"study config {str(path)!r} sets `ray_address` ({data['ray_address']!r}): joining a Ray cluster "
                "trusts it with this process (Ray passes pickled objects, which run code), so a config file "
                "cannot choose one. Remove the key and pass --ray-address (or ray_address= in Python)."
            )
        data.update({key: value for key, value in overrides.items() if value is not None})
        return cls.from_mapping(data, base_dir=path.resolve().parent, allow_code=allow_code, source=path)

    @classmethod
    def coerce(cls, config: StudyConfig | Mapping[str, Any] | str | Path) -> StudyConfig:
        """A :class:`StudyConfig` from itself, a mapping or a config file path."""
        if isinstance(config, StudyConfig):
            return config
        if isinstance(config, Mapping):
            return cls.from_mapping(config)
        if isinstance(config, (str, Path)):
            return cls.from_file(config)
        raise StudyError(f"expected a StudyConfig, a mapping or a config file, got {type(config).__name__}.")

    def replace(self, **changes: Any) -> StudyConfig:
        """A copy with ``changes`` (``None`` values are ignored)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    # -- derived -----------------------------------------------------------------------

    @property
    def corpus_path(self) -> Path:
        """The corpus file (``"demo"`` is the packaged demo corpus)."""
        if self.corpus == "demo":
            return _data_path("demo_corpus.txt")
        path = Path(self.corpus).expanduser()
        if not path.is_absolute() and self._base_dir is not None:
            path = Path(self._base_dir) / path
        return path

    @property
    def output_dir(self) -> Path:
        """The results folder."""
        return Path(self.output).expanduser() if self.output is not None else Path("studies") / self.name

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain JSON-able values (``corpus`` as an absolute path), without
        ``allow_code``: :meth:`from_mapping` takes that from its caller, not from data."""
        out = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if not f.name.startswith("_") and f.name != "allow_code"
        }
        out["corpus"] = "demo" if self.corpus == "demo" else str(self.corpus_path.resolve())
        return out

    def result_settings(self) -> dict[str, Any]:
        """The :data:`RESULT_FIELDS` and their values, ``batch_size`` unless it is 1,
        ``exact_only`` if set, ``draw_scores`` if off in a study with draws and ``attribution``
        (:meth:`attribution_options`) if set (so folders of the studies that ran one string at
        a time, before batches, still resume)."""
        out = {name: getattr(self, name) for name in RESULT_FIELDS}
        if self.batch_size != 1:
            out["batch_size"] = self.batch_size
        if self.exact_only:
            out["exact_only"] = True
        elif not self.draw_scores:
            out["draw_scores"] = False
        attribution = self.attribution_options()
        if attribution is not None:
            out["attribution"] = attribution
        return out

    def fingerprint(self) -> str:
        """A short hash of :meth:`result_settings`."""
        text = json.dumps(self.result_settings(), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _check_name(name: Any) -> None:
    """Refuse a study name that is no plain folder name (the default output is ``studies/<name>``).

    :raises StudyError: for ``'.'``, ``'..'``, a path separator, a drive colon, a NUL or
        another control character, or an empty name.
    """
    bad = isinstance(name, str) and (
        name.strip() in ("", ".", "..")
        or any(c in name for c in "/\\:")
        or (os.altsep is not None and os.altsep in name)
        or any(ord(c) < 32 or ord(c) == 127 for c in name)
    )
    if not isinstance(name, str) or bad:
        raise StudyError(
            f"StudyConfig: `name` must be a plain folder name (no '/', '\\', ':', control characters, "
            f"'.' or '..'), got {name!r}; it names the output folder studies/<name>."
        )


def demo_config(**overrides: Any) -> StudyConfig:
    """The built-in demo study (:data:`DEMO_CONFIG`), with ``overrides`` (``None`` ignored)."""
    return StudyConfig.from_file(_data_path(DEMO_CONFIG), **overrides)
