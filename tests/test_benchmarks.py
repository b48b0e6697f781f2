"""The benchmark script runs end to end in a CI-size configuration (its timings are not
asserted: speed targets live in benchmarks/README.md, measured side by side)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_quick_benchmark_prints_every_ratio(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, str(ROOT / "benchmarks" / "bench_counterfactual.py"),
        "--quick", "--reps", "1", "--tokens", "8", "--draws", "4",
    ]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {}
    for line in result.stdout.splitlines():
        match = re.match(r"\| (.+?) \((?:≤ [0-9.]+|no target)\) \| ([0-9.]+)", line)
        if match:
            rows[match.group(1)] = float(match.group(2))
    assert set(rows) == {
        "abduction / forward",
        "abduction, traced sites / forward",
        "counterfactual / generate",
        "cf(N=1) / (forward + generate)",
        "cf(N=1), baseline / (forward + generate)",
        "batch N / N sequential",
        "batch N / N x paper",
        "generate N rows / N x paper",
        "batch N / generate N rows",
    }, result.stdout
    assert all(0.0 < value < 1e3 for value in rows.values()), rows


def test_quick_floor_counts_the_matrix_products_inside_the_batch(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, str(ROOT / "benchmarks" / "bench_counterfactual.py"),
        "--quick", "--floor", "--reps", "1", "--tokens", "8", "--draws", "4",
    ]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    pattern = r"^\| (.+?) \| \**([0-9.]+)\**(?: / [0-9.]+)? \|$"
    rows = {label: float(value) for label, value in re.findall(pattern, result.stdout, re.M)}
    total = rows["cf(N=4) under the profiler (s)"]
    gemm = next(value for label, value in rows.items() if label.startswith("its matrix products"))
    assert 0.0 < gemm < total, result.stdout  # the products are found, and are part of the batch's time
    assert rows["matrix products of cf(N=4) / 4 x paper (the target of the whole: ≤ 0.12)"] > 0.0, result.stdout


def test_quick_prefixes_count_the_shared_row_steps(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    draws, tokens = 4, 8
    command = [
        sys.executable, str(ROOT / "benchmarks" / "bench_counterfactual.py"),
        "--quick", "--prefixes", "--tokens", str(tokens), "--draws", str(draws),
    ]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {label: float(value) for label, value in re.findall(r"^\| (.+?) \| ([0-9.]+) \|$", result.stdout, re.M)}
    share = next(value for label, value in rows.items() if label.startswith("row-steps with a distinct prefix"))
    first = next(value for label, value in rows.items() if label.startswith("mean first step off"))
    # at least one prefix per step; at step 0 the N rows share the empty prefix
    assert 1 / draws <= share <= 1 - (draws - 1) / (draws * tokens), result.stdout
    assert 0.0 <= first <= tokens, result.stdout


def test_quick_study_benchmark_prints_every_rate(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_study.py"), "--quick", "--threads", "1"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    case = r"MC, batch \d+|MC unscored, batch \d+|reference|exact-only, batch \d+|draws only, batch \d+"
    rates = dict(re.findall(rf"^\| ({case}) \| \d+ \| [0-9.]+ \| ([0-9.]+) \|$", result.stdout, flags=re.M))
    names = {"MC, batch 1", "MC, batch 16", "MC unscored, batch 1", "MC unscored, batch 16", "reference",
             "exact-only, batch 64", "draws only, batch 16"}
    assert set(rates) == names, result.stdout
    assert all(float(rate) > 0 for rate in rates.values())
    assert "exact-only study, 500 strings x 25 tokens:" in result.stdout


def test_quick_bounds_benchmark_prints_its_ratios(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_bounds.py"), "--tokens", "6", "--reps", "3"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    row = r"^\| bounds / prob_unchanged(?:, CPU time)? \(≤ 1.2\) \| ([0-9.]+) \|$"
    ratios = re.findall(row, result.stdout, flags=re.M)
    assert len(ratios) == 2 and all(float(r) > 0 for r in ratios), result.stdout


def test_quick_attribute_benchmark_prints_every_row(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_attribute.py"), "--quick", "--tokens", "6"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = re.findall(r"^\| (\d+) \| layer \| 3 \| 8 \| ([0-9.]+) \|", result.stdout, flags=re.M)
    assert [row[0] for row in rows] == ["0", "1"] and all(float(s) > 0 for _, s in rows), result.stdout


def test_quick_scaling_benchmark_prints_every_case_and_ratio(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, str(ROOT / "benchmarks" / "bench_scaling.py"),
        "--quick", "--tokens", "4,8", "--reps", "1", "--big-draws", "6", "--big-tokens", "4",
    ]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    cell = r"[0-9.]+ \([0-9?]+\)"  # seconds (peak MiB)
    cases = dict(re.findall(rf"^\| (.+?) \| ({cell}) \| {cell} \|$", result.stdout, flags=re.M))
    assert set(cases) == {
        "counterfactual(N=4)", "exact (prob_unchanged, first_divergence)", "mode(4 beams)", "sample(4)",
    }, result.stdout
    ratios = dict(re.findall(r"^\| (.+?) \(≤ [0-9.]+\) \| ([0-9.]+) \|$", result.stdout, flags=re.M))
    assert len(ratios) == 4 + 2 + 1 and all(float(r) > 0 for r in ratios.values()), result.stdout
    assert "sample(6) / counterfactual(N=6), T=4" in ratios
    assert "load average at start" in result.stdout


def test_quick_ab_study_compares_a_checkout_with_itself(tmp_path):
    """Two processes of the same checkout: both cases timed, and the same records written (the
    digest that tells like work from unlike)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(ROOT / "benchmarks" / "ab_study.py"), str(ROOT), str(ROOT), "--quick", "--reps", "1"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    row = (r"^\| (MC, batch 16|exact-only, batch 64) \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \| [0-9., ]+ "
           r"\| (yes[^|]*|no[^|]*) \|$")
    rows = {name: rest for name, *rest in re.findall(row, result.stdout, flags=re.M)}
    assert set(rows) == {"MC, batch 16", "exact-only, batch 64"}, result.stdout
    assert all(float(value) > 0 for values in rows.values() for value in values[:3])
    assert all(values[3] == "yes" for values in rows.values()), result.stdout


def test_ab_study_refuses_a_folder_that_is_no_checkout(tmp_path):
    command = [sys.executable, str(ROOT / "benchmarks" / "ab_study.py"), str(tmp_path), str(ROOT), "--quick"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "before:" in result.stderr and "not a pyro-lmscm checkout" in result.stderr


@pytest.mark.slow
def test_the_smollm2_stand_in_has_the_embedded_models_architecture_and_prompt_ids():
    """benchmarks' smollm2-arch-* models time SmolLM2 where its weights cannot travel (a device machine):
    same config, hence the same shapes and work per step, and the real tokenizer's prompt ids."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_counterfactual as bench
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    from pyro_lmscm.loading import load_lm

    lm = load_lm("smollm2-135m-instruct", progress=False)
    assert lm.encode(bench.PROMPT).tolist() == list(bench.PROMPT_IDS)
    assert lm.encode(bench.ALT_PROMPT).tolist() == list(bench.ALT_PROMPT_IDS)
    stand_in = bench.load("smollm2-arch-fp32", "cpu")
    real, fake = lm.model.config, stand_in.model.config
    for key in bench.SMOLLM2_ARCH:
        if key != "rope_theta":
            assert getattr(fake, key) == getattr(real, key), key
    theta = [getattr(c, "rope_theta", None) or c.rope_parameters["rope_theta"] for c in (real, fake)]
    assert theta[0] == theta[1] == bench.SMOLLM2_ARCH["rope_theta"]
    shapes = {name: p.shape for name, p in lm.model.named_parameters()}
    assert {name: p.shape for name, p in stand_in.model.named_parameters()} == shapes
    assert stand_in.eos_token_ids == lm.eos_token_ids and stand_in.pad_token_id == lm.pad_token_id
