"""Counterfactual studies at scale: the side effects of an intervention over a corpus.

Take many strings (sentence beginnings, with observed continuations or the model's own),
apply an intervention, and measure how the counterfactual strings differ from the factual
ones, next to the interventional baseline (fresh noise, intervened model): how many change,
where they diverge, edit distances, log-probabilities, whether a target attribute flipped
(Ravfogel et al. 2024, arXiv:2411.07180, Sec. 5).

* :class:`StudyConfig` (``config.py``): the settings, from YAML / JSON or flags;
* :func:`read_corpus` (``corpus.py``): ``.txt`` / ``.jsonl`` / ``.csv`` prompts;
* :class:`StudyWorker` (``worker.py``): one model, the per-string work;
* :func:`run_study` (``runner.py``): resumable runs, locally or on Ray (``ray_backend.py``);
* :func:`write_report` (``report.py``, ``html.py``): tables with bootstrap intervals,
  plots, the HTML report.
"""

from .attribute import (
    GENDER_WORDS,
    AttributeCheck,
    CallableAttribute,
    WordListAttribute,
    make_attribute,
)
from .config import RESULT_FIELDS, StudyConfig, StudyError, demo_config
from .corpus import CorpusItem, read_corpus
from .records import JSONLStore, ParquetStore, RecordStore, open_store
from .report import (
    METRICS,
    SummaryRow,
    draw_rows,
    load_records,
    summarize,
    summary_markdown,
    write_report,
)
from .runner import StudyResult, load_study, run_study
from .worker import StudyWorker, string_seed

__all__ = [
    "GENDER_WORDS",
    "METRICS",
    "RESULT_FIELDS",
    "AttributeCheck",
    "CallableAttribute",
    "CorpusItem",
    "JSONLStore",
    "ParquetStore",
    "RecordStore",
    "StudyConfig",
    "StudyError",
    "StudyResult",
    "StudyWorker",
    "SummaryRow",
    "WordListAttribute",
    "demo_config",
    "draw_rows",
    "load_records",
    "load_study",
    "make_attribute",
    "open_store",
    "read_corpus",
    "run_study",
    "string_seed",
    "summarize",
    "summary_markdown",
    "write_report",
]
