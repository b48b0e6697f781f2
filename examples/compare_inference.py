"""How good are approximate abduction methods for Gumbel counterfactuals of a language model?

A language model continued a prompt with an observed string. What would that very string
have been had one word of the prompt been different? Answering needs the posterior of the
Gumbel noise behind each sampled token (abduction), then a replay of the intervened model on
that noise (Ravfogel et al. 2024). The posterior is available exactly (hindsight Gumbel
sampling); this example measures how close the generic alternatives get, and at what cost:

* importance sampling with the prior as proposal (its effective sample size is
  ``N p(observed)``, which collapses as strings grow),
* SVI and NUTS on the Gumbel-softmax (Concrete) relaxation of the argmax at temperature tau,
* no abduction at all (fresh noise: the interventional baseline).

It prints one row per method (reproduction of the factual string, effective sample size
against the exact posterior, total-variation distance of the counterfactual strings to an
exact reference, KS statistic of the observed-token noise, wall time) and saves an ArviZ plot.

Run::

    python examples/compare_inference.py --tiny     # a tiny random model, seconds
    python examples/compare_inference.py            # SmolLM2-135M-Instruct, a few minutes on 2 CPU cores

References

[1] S. Ravfogel, A. Svete, V. Snæbjarnarson, R. Cotterell (2024), "Gumbel Counterfactual
    Generation From Language Models", arXiv:2411.07180.
[2] M. Oberst, D. Sontag (2019), "Counterfactual Off-Policy Evaluation with Gumbel-Max
    Structural Causal Models", ICML.
[3] C. J. Maddison, A. Mnih, Y. W. Teh (2017), "The Concrete Distribution"; E. Jang, S. Gu,
    B. Poole (2017), "Categorical Reparameterization with Gumbel-Softmax", ICLR.
[4] M. D. Hoffman, A. Gelman (2014), "The No-U-Turn Sampler", JMLR.
"""

import sys

from pyro_lmscm.cli import app

if __name__ == "__main__":
    app(["compare-inference", *sys.argv[1:]], prog_name="compare_inference.py")
