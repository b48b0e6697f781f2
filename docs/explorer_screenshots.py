"""The explorer's screenshots in docs/ (explorer_1400.png, explorer_1000.png), taken in a headless Chromium.

Starts ``pyro-lmscm app`` (SmolLM2 by default), runs the README's prompt "The nurse said that" with a
longer observed continuation than the README's " she was tired." (21 tokens: the aligned table wraps)
under a prompt edit, waits until the page is complete, then takes a full-page screenshot at each width
and prints, for each, whether the aligned table fits its box (its scroll width against its width) and
how many blocks of steps it has.

    python docs/explorer_screenshots.py                      # SmolLM2: docs/explorer_1400.png, docs/explorer_1000.png
    python docs/explorer_screenshots.py --model /path/to/tiny --out /tmp

Needs ``pip install -e '.[app,test]'`` (Gradio, playwright) and a chromium binary.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

TEXT = " she was tired after a long night shift at the hospital, so she went home and slept until noon."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompt", default="The nurse said that")
    parser.add_argument("--text", default=TEXT, help="the observed continuation")
    parser.add_argument("--new-prompt", default="The doctor said that", help="the intervention: a prompt edit")
    parser.add_argument("--widths", type=int, nargs="+", default=[1400, 1000])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent), help="folder of the PNGs")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--chromium", default=os.environ.get("PYRO_LMSCM_CHROMIUM") or shutil.which("chromium"))
    args = parser.parse_args()

    from playwright.sync_api import sync_playwright

    from pyro_lmscm.testing import served_app

    with served_app("--model", args.model, "--threads", str(args.threads)) as url:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=args.chromium, headless=True,
                                                 args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": args.widths[0], "height": 1000})
            page.goto(url)
            page.wait_for_selector("#run")
            page.locator("#prompt textarea").fill(args.prompt)
            page.locator("#observed textarea").fill(args.text)
            page.locator("#kind").get_by_label("prompt edit", exact=True).check()
            page.locator("#new-prompt textarea").fill(args.new_prompt)
            page.locator("#run").click()
            done = ("() => document.querySelector('#message').innerText.trim() || (!/computing/.test("
                    "document.querySelector('#summary').innerText) && /Most probable/.test("
                    "document.querySelector('#summary').innerText))")
            page.wait_for_function(done, timeout=1_800_000, polling=1000)
            message = page.locator("#message").inner_text().strip()
            if message:
                raise SystemExit(f"the explorer refused the run: {message}")
            for width in args.widths:
                page.set_viewport_size({"width": width, "height": 1000})
                page.wait_for_timeout(500)
                box = page.evaluate(
                    "() => { const b = document.querySelector('#lmscm-worlds'); return [b.scrollWidth, b.clientWidth,"
                    " b.querySelectorAll('tbody').length]; }"
                )
                png = Path(args.out) / f"explorer_{width}.png"
                page.screenshot(path=str(png), full_page=True)
                fits = "fits" if box[0] <= box[1] else "SCROLLS"
                print(f"{png}: table {box[0]} px wide in a {box[1]} px box ({fits}), {box[2]} blocks of steps")
            browser.close()


if __name__ == "__main__":
    main()
