"""A user's own Messenger in a study (run_study(messengers=...)): the records hold what the
exact query and the sampler give under it, and the resume fingerprint knows it."""

from __future__ import annotations

import pytest
import torch

from pyro_lmscm import exact_counterfactual
from pyro_lmscm.errors import StudyError
from pyro_lmscm.study import run_study
from pyro_lmscm.testing import BoostTokens


def _boost(scm):
    return BoostTokens(scm, [5, 6, 7, 8, 9], 3.0)


def test_exact_records_under_a_messenger_equal_the_exact_query(make_config):
    from pyro_lmscm.loading import load_lm

    config = make_config(intervention="", exact_only=True, attribute=None)
    lm = load_lm(config.model)
    seen = []

    def factory(scm):
        seen.append(scm)
        return _boost(scm)

    result = run_study(config, lm=lm, messengers={"boost": factory})
    scm = seen[0]
    plain_config = make_config(intervention="", exact_only=True, attribute=None, output=f"{config.output_dir}-plain")
    plain = run_study(plain_config, lm=lm)
    differs = 0
    for record, other in zip(result.records, plain.records):
        prompt = lm.encode(record["prompt"])
        factual = torch.tensor(record["factual"]["ids"])
        exact = exact_counterfactual(scm, prompt, factual, _boost(scm))
        assert record["exact"]["prob_unchanged"] == pytest.approx(exact.prob_unchanged(), abs=1e-6)
        assert other["exact"]["prob_unchanged"] == pytest.approx(1.0)  # the null intervention
        differs += record["exact"]["prob_unchanged"] < 1 - 1e-6
    assert differs >= len(result.records) // 2


def test_draws_in_records_follow_the_messenger(make_config):
    from pyro_lmscm.loading import load_lm

    config = make_config(intervention="", attribute=None, num_samples=4)
    lm = load_lm(config.model)
    result = run_study(config, lm=lm, messengers={"boost": _boost})
    boosted = {5, 6, 7, 8, 9}
    factual = sum(t in boosted for r in result.records for t in r["factual"]["ids"])
    drawn = sum(t in boosted for r in result.records for d in r["counterfactual"] for t in d["ids"])
    n_factual = sum(len(r["factual"]["ids"]) for r in result.records)
    n_drawn = sum(len(d["ids"]) for r in result.records for d in r["counterfactual"])
    assert drawn / n_drawn > factual / n_factual + 0.2  # the boosted tokens, in the intervened world only


def test_a_renamed_messenger_is_another_study_and_bad_factories_are_typed(make_config):
    from pyro_lmscm.loading import load_lm

    config = make_config(intervention="", exact_only=True, attribute=None)
    lm = load_lm(config.model)
    run_study(config, lm=lm, messengers={"boost": _boost})
    with pytest.raises(StudyError, match="messengers"):
        run_study(config, lm=lm, messengers={"boost-2": _boost})
    with pytest.raises(StudyError, match="not a Pyro Messenger"):
        run_study(make_config(output=str(config.output_dir) + "-b"), lm=lm, messengers={"x": lambda scm: 3})
    with pytest.raises(StudyError, match="factory"):
        run_study(config, lm=lm, messengers={"x": 3})
