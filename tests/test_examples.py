"""Every example runs end to end with tiny flags (as Pyro's tests/test_examples.py)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = {
    "gender_story.py": ["--tiny", "--max-new-tokens", "6", "--samples", "3"],
    "own_messenger.py": ["--tiny", "--max-new-tokens", "5", "--samples", "2"],
    "chat_system_prompt.py": ["--tiny", "--max-new-tokens", "6", "--samples", "2"],
    "compare_inference.py": ["--tiny", "--num-samples", "32", "--max-new-tokens", "3", "--svi-steps", "50",
                             "--nuts-warmup", "20", "--plot", "compare.png"],
}


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_runs(name, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *EXAMPLES[name]],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
