#!/usr/bin/env bash
# The GPU checks of pyro-lmscm as one prepared run, for a session that is lent a device machine
# (a GPU that reaches no package registry and takes at most 64 MiB of files along; see
# benchmarks/README.md, "A GPU run").
#
#   benchmarks/device_check.sh prepare   # here, once: the wheels the device machine lacks -> .whl/
#   benchmarks/device_check.sh run       # there (the device tool's run, carry [".whl"]): results in $OUT
#
# A rehearsal here, on the CPU, with this venv's python3 first on PATH (nothing to install then):
#   PATH=.venv/bin:$PATH OUT=/tmp/out DEVICE=cpu TOKENS=4 REPS=1 benchmarks/device_check.sh run
#
# SmolLM2's weights cannot travel (the PyPI wheel is 93 MB, the converted folder 540 MB), so the
# run times SmolLM2's architecture with random weights (bench_counterfactual.py's smollm2-arch-*
# models: the same shapes, so the same work per step; tests/test_benchmarks.py pins them to the
# embedded model's config and prompt ids). It first checks, on the GPU, that the null
# intervention gives back the factual string in every draw (fp32 and bf16), then runs the
# timed cases of bench_counterfactual.py with --device cuda, whose ratios include issue 34's
# "batch N / N x paper (<= 0.12)".
set -euo pipefail
cd "$(dirname "$0")/.."

# the device machine's image has torch, transformers, numpy, rich, opt-einsum, pytest; not these
WHEELS="pyro-ppl==1.9.2 pyro-api==0.1.2 rapidfuzz==3.14.6"

case "${1:-}" in
prepare)
    grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    rm -rf .whl && mkdir -p .whl
    # shellcheck disable=SC2086  # one argument per requirement
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl $WHEELS
    du -sh .whl
    ;;
run)
    : "${OUT:?run this on the device machine, where OUT is set}"
    export DEVICE="${DEVICE:-cuda}" TOKENS="${TOKENS:-64}" REPS="${REPS:-5}"
    if ! python3 -c "import pyro, rapidfuzz" 2>/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl
    fi
    export PYTHONPATH="/tmp/site:$PWD:$PWD/benchmarks" PYTHONUNBUFFERED=1
    set -o pipefail
    python3 - <<'EOF' 2>&1 | tee "$OUT/null_replay_$DEVICE.txt"
import os

import torch
from bench_counterfactual import PROMPT_IDS, load
from pyro_lmscm import LanguageModelSCM, counterfactual

device = os.environ["DEVICE"]
assert device == "cpu" or torch.cuda.is_available(), "no GPU"
where = torch.cuda.get_device_name() if device != "cpu" else "the CPU"
for name in ("smollm2-arch-fp32", "smollm2-arch-bf16"):
    scm = LanguageModelSCM(load(name, device), max_new_tokens=int(os.environ["TOKENS"]))
    result = counterfactual(scm, torch.tensor(PROMPT_IDS), None, {}, num_samples=16, seed=0)
    factual, draws = result.factual_ids, result.counterfactual_ids
    same = bool((draws[:, : factual.shape[-1]].cpu() == factual.cpu()).all())
    print(f"{name} on {where}: null intervention, 16 draws of {factual.shape[-1]} tokens, "
          f"every draw the factual string: {same}")
    assert same
EOF
    python3 benchmarks/bench_counterfactual.py --models smollm2-arch-fp32,smollm2-arch-bf16 --device "$DEVICE" \
        --tokens "$TOKENS" --reps "$REPS" 2>&1 | tee "$OUT/bench_counterfactual_$DEVICE.md"
    ;;
*)
    echo "usage: $0 prepare|run" >&2
    exit 2
    ;;
esac
