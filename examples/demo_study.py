"""Had SmolLM2 been steered toward "female", how would its own stories have read?

A counterfactual study over 50 sentence beginnings written for this project (17 about men,
17 about women, 16 about neither). For each, SmolLM2-135M-Instruct writes a continuation
(the factual string); we abduct the exact Gumbel noise behind it, steer the model toward
"female" (a difference-of-means direction at layer 10, alpha 1) and replay the same noise:
the counterfactual strings. Fresh noise through the steered model gives the interventional
baseline. The report compares them: how many strings change, where they diverge, edit
distances, log-probabilities, and whether male words flipped to female ones.

The paper's claim to check: counterfactual strings stay much closer to the original than
interventional ones, yet they still change in places unrelated to the target attribute
(side effects of the intervention).

References:

[1] Ravfogel, Svete, Snæbjarnarson, Cotterell, *Gumbel Counterfactual Generation From
    Language Models* (2024), arXiv:2411.07180, Sec. 5.
[2] Oberst & Sontag, *Counterfactual Off-Policy Evaluation with Gumbel-Max Structural
    Causal Models* (ICML 2019).

    python examples/demo_study.py                        # the demo study (SmolLM2, CPU)
    python examples/demo_study.py --ray --workers 2      # the same on a local Ray instance
    python examples/demo_study.py --screenshot docs/study_report.png
    python examples/demo_study.py --tiny                 # tiny random models, seconds
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from pyro_lmscm.study import StudyConfig, demo_config, run_study

#: Prompts over the tiny models' word vocabulary (pyro_lmscm.testing.TINY_WORDS).
TINY_CORPUS = """\
# group: men
the man said he
the old doctor walked home
# group: women
the woman said she
the young nurse smiled
# group: neither
the city was old
the story
"""


def tiny_config(root: Path, args: argparse.Namespace) -> StudyConfig:
    """Two tiny random Llamas saved as HF folders; the intervention swaps the second in."""
    from pyro_lmscm.testing import tiny_llama

    folders = []
    for seed in (0, 1):
        lm = tiny_llama(seed=seed)
        folder = root / f"tiny{seed}"
        lm.model.save_pretrained(folder)
        lm.tokenizer.save_pretrained(folder)
        folders.append(folder)
    (root / "corpus.txt").write_text(TINY_CORPUS)
    return StudyConfig(
        corpus=str(root / "corpus.txt"),
        output=args.output or str(root / "out"),
        name="tiny-demo",
        model=str(folders[0]),
        intervention=f"model={folders[1]}",
        num_samples=args.samples or 3,
        max_new_tokens=args.max_new_tokens or 8,
        seed=args.seed,
        attribute={
            "name": "gender",
            "source_label": "male",
            "source_words": ["he", "his", "man"],
            "target_label": "female",
            "target_words": ["she", "her", "woman"],
        },
        bootstrap=500,
        progress=False,
    )


def screenshot(html: Path, png: Path) -> None:
    """A full-page screenshot of the report in the system's headless Chromium (playwright)."""
    import shutil

    from playwright.sync_api import sync_playwright

    chromium = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    png.parent.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium, args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"]
        )
        page = browser.new_page(viewport={"width": 1500, "height": 1100})
        page.goto(html.resolve().as_uri())
        page.locator('th[data-sort="cf-distance"]').click()  # the closest counterfactuals first
        page.evaluate("document.querySelector('.plots').previousElementSibling.scrollIntoView()")
        page.screenshot(path=str(png))
        browser.close()
    print(f"screenshot: {png}")


def main(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            config = tiny_config(Path(tmp), args)
        else:
            config = demo_config(
                output=args.output, num_samples=args.samples, max_new_tokens=args.max_new_tokens,
                dtype=args.dtype, seed=args.seed, limit=args.limit,
            )
        if args.ray:
            config = config.replace(ray=True, num_workers=args.workers)
        result = run_study(config)
        print(f"{result.computed} strings computed, {result.skipped} resumed, {time.perf_counter() - start:.1f} s")
        print(result.summary_markdown)
        print(f"report: {result.files['html']}")
        if args.screenshot:
            screenshot(result.files["html"], Path(args.screenshot))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random models (seconds; for CI)")
    parser.add_argument("--output", default=None, help="results folder (default studies/demo)")
    parser.add_argument("--samples", type=int, default=None, help="draws per string (demo: 4)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="demo: 32")
    parser.add_argument("--dtype", default=None, help="demo: float32")
    parser.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ray", action="store_true", help="run on a local Ray instance")
    parser.add_argument("--workers", type=int, default=2, help="Ray workers")
    parser.add_argument("--screenshot", default=None, help="save a screenshot of the HTML report here (PNG)")
    main(parser.parse_args())
