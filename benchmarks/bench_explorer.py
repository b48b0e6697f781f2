"""How long the explorer takes to show its first counterfactual, measured in a real browser.

Starts ``pyro-lmscm app`` (on the embedded SmolLM2 by default, cached), opens the page in a
headless Chromium, pastes a 24-token observed continuation of the demo prompt, keeps the
default intervention (gender steering, α = 1) and clicks Run; it prints the seconds from the
click to the aligned table, for the first run (which also computes the steering vector) and
for the next ones (a new seed; the steering vector is reused), and the seconds until the
exact probabilities and the most probable counterfactual complete the page (the page shows
them as they come). Optionally saves a screenshot of the complete page.

    python benchmarks/bench_explorer.py                        # SmolLM2, 3 runs
    python benchmarks/bench_explorer.py --screenshot docs/explorer.png
    python benchmarks/bench_explorer.py --model /path/to/tiny --tokens 8 --runs 1

Needs ``pip install -e '.[app,test]'`` (Gradio, playwright) and a chromium binary.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time

PROMPT = "My brother is a doctor. Every morning, he"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--tokens", type=int, default=24, help="length of the observed continuation")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the app (default: all)")
    parser.add_argument("--screenshot", default=None, help="save a PNG of the page after the first run")
    parser.add_argument("--chromium", default=os.environ.get("PYRO_LMSCM_CHROMIUM") or shutil.which("chromium"))
    args = parser.parse_args()

    from playwright.sync_api import expect, sync_playwright

    from pyro_lmscm.explorer import Explorer
    from pyro_lmscm.loading import load_lm

    # a 24-token observation: a sample of the model itself (the app would encode the same text)
    lm = load_lm(args.model)
    ids = Explorer(lm).sample(PROMPT, max_new_tokens=args.tokens, seed=1, top_k=50)
    observed = lm.decode([i for i in ids if i not in lm.eos_token_ids])
    del lm
    from pyro_lmscm.testing import served_app

    started = time.perf_counter()
    with served_app("--model", args.model, *(["--threads", str(args.threads)] if args.threads else [])) as url:
        print(f"app serving after {time.perf_counter() - started:.1f} s (model load included)")
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=args.chromium, headless=True,
                                                 args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1500, "height": 1100})
            page.goto(url)
            page.wait_for_selector("#run")
            page.locator("#prompt textarea").fill(PROMPT)
            page.locator("#observed textarea").fill(observed)
            times, done = [], []
            page.locator("button", has_text="Settings").first.click()
            for run in range(args.runs):
                page.get_by_label("Seed").fill(str(run))  # a new seed: new draws, so a new table
                page.evaluate("document.querySelector('#worlds table')?.remove()")
                click = time.perf_counter()
                page.locator("#run").click()
                expect(page.locator("#worlds table tr.counterfactual").first).to_be_visible(timeout=120_000)
                times.append(time.perf_counter() - click)
                expect(page.locator("#summary")).to_contain_text("Most probable counterfactual", timeout=120_000)
                done.append(time.perf_counter() - click)
                print(f"run {run + 1}: first counterfactual after {times[-1]:.1f} s, "
                      f"all (exact, mode) after {done[-1]:.1f} s")
                if run == 0 and args.screenshot:
                    page.screenshot(path=args.screenshot, full_page=True)
                    print(f"screenshot: {args.screenshot}")
            browser.close()
        def median(values):
            return sorted(values)[len(values) // 2]

        print("| run | first counterfactual | exact probabilities and most probable counterfactual |")
        print("|---|---:|---:|")
        print(f"| first (steering vector computed) | {times[0]:.1f} s | {done[0]:.1f} s |")
        if len(times) > 1:
            print(f"| later (median of {len(times) - 1}) | {median(times[1:]):.1f} s | {median(done[1:]):.1f} s |")


if __name__ == "__main__":
    main()
