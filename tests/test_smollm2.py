"""Slow tests on the embedded SmolLM2-135M-Instruct (fetched from PyPI once, then cached)."""

import pyro
import pyro.poutine as poutine
import pytest
import torch

from pyro_lmscm import HindsightGumbelGuide, LanguageModelSCM, counterfactual
from pyro_lmscm.loading import load_lm

pytestmark = pytest.mark.slow

PROMPTS = ["The old man walked to the city and", "My sister told me that she"]


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def smollm2(request):
    return load_lm("smollm2-135m-instruct", dtype=request.param, progress=False)


def test_null_intervention_reproduces_and_the_anchor_is_what_makes_bf16_exact(smollm2, all_threads):
    scm = LanguageModelSCM(smollm2, max_new_tokens=16)
    changed_with_anchor = changed_without = 0
    for seed, text in enumerate(PROMPTS):
        prompt = smollm2.encode(text)
        observed = counterfactual(scm, prompt, None, {}, seed=seed).factual_ids
        guide = HindsightGumbelGuide(scm, observed)
        with pyro.plate("draws", 24, dim=-1):
            guide_trace = poutine.trace(guide).get_trace(prompt)
            with guide.anchored(prompt):
                anchored = poutine.replay(scm.model, trace=guide_trace)(prompt)
            # baseline, outside the anchor's scope: the factual logits recomputed along the KV-cached path
            free = poutine.replay(scm.model, trace=guide_trace)(prompt)
        n = len(observed)
        changed_with_anchor += int((anchored[:, :n] != observed).any(-1).sum())
        changed_without += int((free[:, :n] != observed).any(-1).sum())
    assert changed_with_anchor == 0
    if smollm2.dtype == torch.bfloat16:
        # measured: 38 of 96 replays changed a token without the anchor (bf16 rounding)
        assert changed_without > 0


def test_bf16_batch_dependence_and_deterministic_decoding(smollm2, all_threads):
    """Intervened rows in bf16 depend on which rows share their batch where the CPU's bf16
    matrix kernels round with the batch size; ``deterministic`` decodes each row alone, so a
    row's tokens equal its decoding alone whatever the batch. In float32, and in bf16 on a CPU
    whose kernels do not round with the batch (:func:`bf16_kernels_round_with_the_batch`), the
    batched rows equal the rows alone."""
    from pyro_lmscm.inference import noise_handler, predict
    from pyro_lmscm.interventions.gender import gender_steering

    # where the kernels round with the batch: 8 rows of 24 tokens, the size at which the batch
    # dependence was measured; elsewhere (float32, bf16 on AMX or without native bf16 kernels)
    # the same equalities on 4 rows of 16 tokens
    rounds = smollm2.dtype == torch.bfloat16 and bf16_kernels_round_with_the_batch(smollm2)
    rows, tokens = (8, 24) if rounds else (4, 16)
    scm = LanguageModelSCM(smollm2, max_new_tokens=tokens, mechanisms={"female": gender_steering(smollm2, "female")})
    intervened = poutine.do(scm.model, data={"mechanism": torch.tensor(1)})
    batch_dependent = 0
    for seed, text in enumerate(PROMPTS):
        prompt = smollm2.encode(text)
        observed = counterfactual(scm, prompt, None, {}, seed=seed).factual_ids
        guide = HindsightGumbelGuide(scm, observed)
        anchor = guide.anchor(prompt)  # one teacher-forced pass, held here
        noise = guide.sample_noise(anchor, (rows,))

        def replay_noise(scm, model, prompt, noise, deterministic=False):
            return predict(scm, model, prompt, noise.shape[0], lambda a, b: noise_handler(scm, noise[a:b]),
                           anchor=anchor, deterministic=deterministic)

        alone = torch.cat([replay_noise(scm, intervened, prompt, noise[i : i + 1]) for i in range(rows)])
        batched = replay_noise(scm, intervened, prompt, noise)
        deterministic = replay_noise(scm, intervened, prompt, noise, deterministic=True)
        reordered = replay_noise(scm, intervened, prompt, noise.flip(0), deterministic=True).flip(0)
        assert torch.equal(deterministic, alone) and torch.equal(reordered, alone)
        batch_dependent += int((batched != alone).any(-1).sum())
    print(f"{smollm2.dtype}: {batch_dependent} of {2 * rows} batched steered rows differ from the row decoded alone")
    print(f"bf16 kernels of this CPU round with the batch: {rounds}")
    if rounds:  # the baseline that deterministic decoding fixes (measured: 7 of 16 rows, AVX-512 without AMX)
        assert batch_dependent > 0
    else:  # float32, or bf16 kernels that do not round with the batch (measured: AMX)
        assert batch_dependent == 0


def bf16_kernels_round_with_the_batch(lm) -> bool:
    """Whether this CPU's bf16 ``linear`` gives a row other bits in a batch of 8 than alone, on
    the model's own weight matrices at the shapes of a decoding step (one token per row): a
    property of the kernels (AVX-512 CPUs without AMX: yes; with AMX: no), measured directly."""
    generator = torch.Generator().manual_seed(0)
    for weight in {lm.model.get_output_embeddings().weight, *(m.weight for m in lm.model.modules()
                                                             if isinstance(m, torch.nn.Linear))}:
        rows = torch.randn(8, weight.shape[1], generator=generator).to(weight.dtype)
        batched = torch.nn.functional.linear(rows, weight)
        alone = torch.cat([torch.nn.functional.linear(rows[i : i + 1], weight) for i in range(8)])
        if not torch.equal(batched, alone):
            return True
    return False


FACTUAL_SAMPLE = """
import sys, torch
from pyro_lmscm import LanguageModelSCM, counterfactual
from pyro_lmscm.loading import load_lm
torch.set_num_threads(1)
lm = load_lm("smollm2-135m-instruct", dtype="bfloat16", progress=False)
scm = LanguageModelSCM(lm, max_new_tokens=32)
for seed, text in enumerate(["The old man walked to the city and", "Once upon a time, a dragon"]):
    prompt = lm.encode(text)
    sample = counterfactual(scm, prompt, None, {}, seed=seed).factual_ids
    if sys.argv[1] == "after-abduction":  # abduct that very string (teacher-forced logits), then sample again
        counterfactual(scm, prompt, sample, {}, num_samples=4, seed=100 + seed)
        sample = counterfactual(scm, prompt, None, {}, seed=seed).factual_ids
    print(sample.tolist())
"""


@pytest.mark.parametrize("smollm2", ["bfloat16"], indirect=True)
def test_factual_sampling_after_an_abduction_equals_a_fresh_process(smollm2, tmp_path):
    """Bit-identical in bf16: abduction leaves nothing behind that later sampling could read
    (before the redesign the guide's anchor stayed on the SCM and fed later factual runs)."""
    import subprocess
    import sys

    script = tmp_path / "sample.py"
    script.write_text(FACTUAL_SAMPLE)
    runs = [
        subprocess.run([sys.executable, str(script), mode], capture_output=True, text=True, timeout=300, check=True)
        for mode in ("fresh", "after-abduction")
    ]
    fresh, after = (run.stdout.strip().splitlines()[-2:] for run in runs)
    assert fresh == after and all(len(line) > 10 for line in fresh)
