"""The explorer: its computations against the library's own queries, and the Gradio page
served by ``pyro-lmscm app`` on a tiny model, driven in a real headless Chromium."""

import contextlib
import re

import pytest
import torch

from pyro_lmscm import LanguageModelSCM, counterfactual
from pyro_lmscm.defaults import DEFAULTS
from pyro_lmscm.errors import InterventionError, ObservationError
from pyro_lmscm.explorer import Explorer, ExploreRequest
from pyro_lmscm.explorer.render import render_worlds
from pyro_lmscm.inference import exact_counterfactual
from pyro_lmscm.models import Decoding
from pyro_lmscm.testing import served_app, tiny_llama

PROMPT = "the man said"


@pytest.fixture(scope="module")
def explorer():
    return Explorer(tiny_llama(seed=0))


def test_run_matches_the_library(explorer):
    """The explorer's rows are counterfactual()'s draws, and its probabilities are those of
    exact_counterfactual(), computed here independently."""
    request = ExploreRequest(PROMPT, None, intervention={"exclude_2": "factual"}, num_samples=16, seed=3,
                             max_new_tokens=8, top_k=None)
    found = explorer.run(request)
    lm = explorer.lm
    scm = LanguageModelSCM(lm, 8, Decoding())
    prompt = lm.encode(PROMPT)
    result = counterfactual(scm, prompt, None, {"exclude_2": "factual"}, num_samples=16, seed=3)
    assert found.factual.ids == result.factual_ids.tolist()
    assert sum(row.count for row in found.counterfactuals) == 16
    drawn = sorted(tuple(r) for r in result.counterfactual_ids.tolist())
    padded = sorted(tuple(row.ids + [lm.pad_token_id] * (8 - len(row.ids))) for row in found.counterfactuals
                    for _ in range(row.count))
    assert padded == drawn
    exact = exact_counterfactual(scm, prompt, result.factual_ids, result.intervention)
    assert found.prob_unchanged == pytest.approx(exact.prob_unchanged(), abs=1e-12) == 0.0  # step 2 must change
    assert found.first_divergence == pytest.approx(exact.first_divergence().tolist(), abs=1e-12)
    assert found.first_divergence[2] == pytest.approx(1.0)
    for row in found.counterfactuals:
        ids = torch.tensor(row.ids + [lm.pad_token_id] * (8 - len(row.ids)))
        expected = exact.token_log_probs(ids)[0]
        assert row.probs == pytest.approx(expected.exp()[: len(row.ids)].tolist(), abs=1e-9)
        assert row.log_prob == pytest.approx(float(expected.sum()), abs=1e-9)
        assert row.first_divergence == 2 and row.ids[2] != found.factual.ids[2]
    mode_ids, mode_log_prob = exact.mode(num_beams=4)
    assert found.mode.log_prob == pytest.approx(mode_log_prob)
    assert found.mode.ids == mode_ids.tolist()[: len(found.mode.ids)]


def test_render_escapes_and_marks(explorer):
    lm = explorer.lm
    found = explorer.run(ExploreRequest(PROMPT, None, intervention={"exclude_1": "factual"}, max_new_tokens=5,
                                        baseline=True))
    html = render_worlds(found)
    assert html.count('class="counterfactual"') == len(found.counterfactuals)
    assert html.count('class="interventional"') == len(found.interventional)
    # each counterfactual row outlines exactly one first divergence, at step 1
    rows = re.findall(r'<tr class="counterfactual">(.*?)</tr>', html)
    assert len(rows) == len(found.counterfactuals)
    for row in rows:
        marked = re.findall(r'class="([^"]*first-divergence[^"]*)"[^>]*data-step="(\d+)"', row)
        assert marked == [("changed first-divergence", "1")]
    found.description = "do(<script>)"
    assert "<script>" not in render_worlds(found) and "&lt;script&gt;" in render_worlds(found)
    assert lm.eos_token_ids  # the end of sequence shows as a glyph, not as its token text


def _wcag_contrast(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """WCAG 2.x contrast ratio of two sRGB colours (0-255), from the standard's formula."""
    def luminance(rgb: tuple[float, ...]) -> float:
        c = [v / 255 for v in rgb]
        c = [v / 12.92 if v <= 0.03928 else ((v + 0.055) / 1.055) ** 2.4 for v in c]
        return 0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2]

    hi, lo = sorted((luminance(a), luminance(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def test_every_token_colour_is_readable_on_every_shade():
    """WCAG AA (4.5:1) for the token text on the shade of any probability, over the white page:
    the default black, the magenta of a changed token and the grey of a step past the observation.
    (The shade of before, blue-600 at alpha 0.75, gave the magenta 1.9:1 and the grey 1.3:1.)"""
    from pyro_lmscm.explorer.render import STYLE, _shade

    def rgb(hex_: str) -> tuple[int, ...]:
        return tuple(int(hex_[i:i + 2], 16) for i in (1, 3, 5))

    colours = {"default": (0, 0, 0)}
    for css_class in ("changed", "past"):
        match = re.search(rf"td\.{css_class} {{ color: (#[0-9a-f]{{6}});", STYLE)
        assert match, css_class
        colours[css_class] = rgb(match.group(1))
    for prob in [i / 100 for i in range(101)]:
        *shade, alpha = (float(v) for v in re.search(r"rgba\(([^)]*)\)", _shade(prob)).group(1).split(","))
        background = tuple(alpha * c + (1 - alpha) * 255 for c in shade)
        for name, colour in colours.items():
            assert _wcag_contrast(colour, background) >= 4.5, (name, prob, background)


@pytest.mark.parametrize(
    "request_, error, message",
    [
        (ExploreRequest("   "), ObservationError, "prompt is empty"),
        (ExploreRequest(PROMPT, "the man", intervention={"w_1": '"the man"'}), InterventionError, "2 tokens"),
        (ExploreRequest(PROMPT, "the man", intervention={"model": "/no/such/folder"}), InterventionError, "folder"),
        (ExploreRequest(PROMPT, "the man", intervention={"rome": {"subject": "x"}}), InterventionError, "rome"),
    ],
)
def test_bad_input_is_typed(explorer, request_, error, message):
    with pytest.raises(error, match=message):
        explorer.run(request_)


@pytest.mark.parametrize("native", [False, True])
def test_a_bf16_explorer_computes_in_compute_scope_and_leaves_it_at_each_snapshot(linear_calls, native):
    """Every linear of a bfloat16 explorer run (the draws, the exact probabilities, the beam
    search) runs in ``compute_scope``: from 8 rows on in float32 where the CPU has no native
    bfloat16 GEMM and in bfloat16 where it has one (the baseline: the scope then changes no
    kernel), and in a heap_allocations scope. At each snapshot the stream yields, the scope is
    closed: no linear is left patched and glibc has its defaults back."""
    from pyro_lmscm.runtime import heap

    linear_calls.native(native)
    explorer = Explorer(tiny_llama(seed=0, dtype=torch.bfloat16))
    request = ExploreRequest(PROMPT, None, intervention={"prompt": "the woman said"}, num_samples=8, max_new_tokens=6,
                             baseline=True)
    snapshots = 0
    for _ in explorer.stream(request):
        snapshots += 1
        assert not any("forward" in vars(m) for m in explorer.lm.model.modules())
        assert heap._HEAP_SCOPES[0] == 0
    assert snapshots == 3
    wide = {dtype for rows, dtype, _ in linear_calls if rows >= 8}
    narrow = {dtype for rows, dtype, _ in linear_calls if rows < 8}
    assert wide == ({torch.bfloat16} if native else {torch.float32}) and narrow == {torch.bfloat16}
    assert linear_calls.all_in_heap_scope()


def test_default_decoding_is_the_full_softmax():
    """A pasted string outside any top-k support can be abducted by default (the README's
    --text example failed under the old hidden top-k 50)."""
    assert DEFAULTS.top_k is None and ExploreRequest(PROMPT).top_k is None


def test_bounds_beside_p_unchanged_and_as_a_band(explorer):
    """The exploration's bounds are exact_counterfactual(...).bounds(), computed here
    independently; the summary prints both intervals and the plot draws the CDF band."""
    from pyro_lmscm.explorer.render import first_divergence_figure, render_summary

    request = ExploreRequest(PROMPT, None, intervention={"prompt": "the woman said"}, max_new_tokens=6, top_k=None)
    found = explorer.run(request)
    lm = explorer.lm
    scm = LanguageModelSCM(lm, 6, Decoding())
    exact = exact_counterfactual(scm, lm.encode(PROMPT), torch.tensor(found.factual.ids),
                                 {"prompt": lm.encode("the woman said")})
    expected = exact.bounds()
    assert found.bounds.prob_unchanged["stable"] == pytest.approx(expected.prob_unchanged["stable"], abs=1e-12)
    assert found.bounds.prob_unchanged["any"] == pytest.approx(expected.prob_unchanged["any"], abs=1e-12)
    low, high = found.bounds.prob_unchanged["stable"]
    assert low <= found.prob_unchanged <= high
    text = render_summary(found)
    stable, any_ = found.bounds.prob_unchanged["stable"], found.bounds.prob_unchanged["any"]
    assert f"stable mechanisms {stable[0]:.2g}–{stable[1]:.2g}; any mechanism {any_[0]:.2g}–{any_[1]:.2g}" in text
    figure = first_divergence_figure(found)
    bands = [c for c in figure.axes[0].collections if c.get_label().startswith("P(first divergence ≤ t)")]
    assert len(bands) == 2  # stable and any
    assert found.attribution is None and "selects no mechanism" in found.attribution_note


def test_attribution_to_the_parts_of_a_model_swap(explorer, tmp_path):
    """A second model of the same architecture is split into its layers' weight differences;
    the exploration's values are attribute()'s, and the bar chart has one bar per part."""
    from pyro_lmscm.explorer.render import attribution_figure, render_summary
    from pyro_lmscm.inference import attribute
    from pyro_lmscm.interventions import ModelSwap

    other = tiny_llama(seed=1)
    other.model.save_pretrained(tmp_path)
    other.tokenizer.save_pretrained(tmp_path)
    snapshots = list(explorer.stream(ExploreRequest(PROMPT, None, intervention={"model": str(tmp_path)},
                                                    max_new_tokens=5)))
    found = snapshots[-1]
    assert len(snapshots) == 4 and snapshots[-2].pending.startswith("the attribution") and found.pending is None
    lm = explorer.lm
    scm = LanguageModelSCM(lm, 5, Decoding(), mechanisms={"swap": ModelSwap(other)})
    expected = attribute(scm, lm.encode(PROMPT), torch.tensor(found.factual.ids), {"mechanism": "swap"})
    assert found.attribution.parts == expected.parts and len(expected.parts) > 1
    for part in expected.parts:
        assert found.attribution.shapley[part] == pytest.approx(expected.shapley[part], abs=1e-9)
        assert found.attribution.prob_unchanged_alone[part] == pytest.approx(
            expected.prob_unchanged_alone[part], abs=1e-9)
    figure = attribution_figure(found)
    assert len(figure.axes[0].patches) == len(expected.parts)
    assert "Parts:" not in render_summary(found)
    # a one-part mechanism says so instead of a chart (attribution off: also said)
    off = explorer.run(ExploreRequest(PROMPT, None, intervention={"model": str(tmp_path)}, max_new_tokens=5,
                                      attribute=False))
    assert off.attribution is None and "off" in off.attribution_note and attribution_figure(off) is None


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_the_second_model_loads_on_the_apps_device(device, tmp_path, monkeypatch):
    """The second-model field loads its model on the factual model's device and in its dtype
    (the counterfactual runs both in one process), and says so in its help text. load_lm is
    given that device (on a CPU-only machine its default would be the CPU too; with CUDA, the
    CPU case would load on CUDA under the default)."""
    import pyro_lmscm.loading as loading
    from pyro_lmscm.explorer.ui import second_model_info
    from pyro_lmscm.interventions import ModelSwap

    other = tiny_llama(seed=1)
    other.model.save_pretrained(tmp_path)
    other.tokenizer.save_pretrained(tmp_path)
    lm = tiny_llama(seed=0)
    lm.model.to(device)
    explorer = Explorer(lm)
    given, load_lm = [], loading.load_lm
    monkeypatch.setattr(loading, "load_lm", lambda *a, **k: given.append(k) or load_lm(*a, **k))
    found = explorer.run(ExploreRequest(PROMPT, None, intervention={"model": str(tmp_path)}, max_new_tokens=4,
                                        num_samples=2, attribute=False))
    assert found.description.startswith("do(model=") and found.prob_unchanged is not None
    assert [torch.device(k["device"]) for k in given] == [lm.device]
    [swap] = explorer._mechanisms.values()
    assert isinstance(swap, ModelSwap)
    assert {(p.device, p.dtype) for p in swap.other.model.parameters()} == {(lm.device, lm.dtype)}
    info = second_model_info(explorer)
    assert f"app's device ({lm.device})" in info and "float32" in info and "--device" in info


# Gradio leaves sockets and event loops of its own for the garbage collector
@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_the_second_model_field_shows_where_it_loads():
    import gc

    pytest.importorskip("gradio", reason="the explorer needs the extra pyro-lmscm[app] (in the test extra)")
    from pyro_lmscm.explorer.ui import build_app, second_model_info

    explorer = Explorer(tiny_llama(seed=0))
    demo = build_app(explorer)
    [field] = [b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "model-folder"]
    assert field.info == second_model_info(explorer)
    del demo, field
    gc.collect()  # collect Gradio's leftovers here, under this test's filter, not in a later test


@pytest.mark.parametrize("device", ["mps", "xpu", "cuda:7", "garbage"])
def test_a_bad_app_device_is_refused_before_anything_loads(device, tmp_path, monkeypatch):
    """``pyro-lmscm app --device BAD``: one typed line (ModelLoadError, exit status 2) before
    the model folder is read, fetched or served."""
    pytest.importorskip("gradio", reason="the explorer needs the extra pyro-lmscm[app] (in the test extra)")
    from typer.testing import CliRunner

    import pyro_lmscm.explorer.ui as ui
    import pyro_lmscm.loading as loading
    from pyro_lmscm.cli import app
    from pyro_lmscm.errors import ModelLoadError

    touched = []
    monkeypatch.setattr(loading, "_local_folder", lambda name: touched.append(("read", name)))
    monkeypatch.setattr(loading, "fetch_embedded", lambda *a, **k: touched.append(("fetch", a)))
    monkeypatch.setattr(ui, "serve", lambda *a, **k: touched.append(("serve", a)))
    result = CliRunner().invoke(app, ["app", "--model", str(tmp_path), "--device", device])
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and repr(device) in result.output and "Traceback" not in result.output
    assert touched == []
    with pytest.raises(ModelLoadError):
        loading.check_device(device)


def test_chat_null_intervention_reproduces_the_reply(explorer):
    """Chat mode on a tiny model with a chat template: the observation is the assistant's
    reply ended by the end-of-turn token, the null intervention keeps it exactly, and a
    system-prompt edit runs through parse_intervention(messages=)."""
    import copy

    from pyro_lmscm.lm import HFLanguageModel

    template = (
        "{% set names = {'system': 'the', 'user': 'man', 'assistant': 'woman'} %}"
        "{% for message in messages %}<s> {{ names[message['role']] }} {{ message['content'] }} </s> {% endfor %}"
        "{% if add_generation_prompt %}<s> woman{% endif %}"
    )
    tokenizer = copy.deepcopy(explorer.lm.tokenizer)
    tokenizer.chat_template = template
    chat = Explorer(HFLanguageModel(explorer.lm.model, tokenizer))
    messages = [{"role": "system", "content": "he was old"}, {"role": "user", "content": "the man said"}]
    found = chat.run(ExploreRequest(messages, "she went home", num_samples=8))
    assert found.factual.ids == chat.lm.encode_reply("she went home").tolist()
    assert found.prompt_ids == chat.lm.encode(messages).tolist()
    assert found.prob_unchanged == 1.0 and [row.ids for row in found.counterfactuals] == [found.factual.ids]
    edited = chat.run(ExploreRequest(messages, "she went home", intervention={"system": "she was young"}))
    assert 0.0 <= edited.prob_unchanged <= 1.0 and edited.description == "do(system=she was young)"
    with pytest.raises(InterventionError, match="chat"):
        chat.run(ExploreRequest(PROMPT, "she went home", intervention={"system": "x"}))


def _blocks(html: str) -> list[list[int]]:
    """The steps of each block of the aligned table, from its step headers."""
    return [[int(t) for t in re.findall(r"<th>(\d+)</th>", header)]
            for header in re.findall(r'<tr class="steps">(.*?)</tr>', html)]


def test_whitespace_is_visible_and_long_strings_wrap(explorer):
    from pyro_lmscm.explorer.render import STEPS_PER_LINE, visible

    assert [visible(t) for t in (" ", "  ", "\n", " she", "\t", "")] == ["␣", "␣␣", "↵", " she", "⇥", "◌"]
    found = explorer.run(ExploreRequest(PROMPT, None, intervention={"exclude_1": "factual"}, max_new_tokens=30,
                                        num_samples=2))
    html = render_worlds(found)
    steps = max(len(found.factual.ids), *(len(r.ids) for r in found.counterfactuals))
    blocks = _blocks(html)
    assert steps > STEPS_PER_LINE and len(blocks) > 1 and html.count("<tbody>") == len(blocks)
    assert [t for block in blocks for t in block] == list(range(steps))  # every step once, in order
    assert html.count('<tr class="factual">') == len(blocks)  # each block with its step header and row labels
    assert re.findall(r'data-step="(\d+)"', "".join(re.findall(r'<tr class="factual">(.*?)</tr>', html))) == [
        str(t) for t in range(len(found.factual.ids))]


@pytest.mark.parametrize("long_token", [None, " " + "y" * 30, "xxxxxxxxxxx"])
def test_blocks_of_long_tokens_hold_fewer_steps_and_fit(explorer, long_token):
    """The blocks are rows of one table: the token columns (each as wide as its widest token,
    capped at TOKEN_WIDTH, plus a margin of 2) stay within BLOCK_WIDTH characters, and one
    more step per block would not (or the block has STEPS_PER_LINE). Long tokens: fewer
    steps per block; a token past TOKEN_WIDTH wraps in its cell."""
    from pyro_lmscm.explorer.render import BLOCK_WIDTH, STEPS_PER_LINE, STYLE, TOKEN_WIDTH, visible

    found = explorer.run(ExploreRequest(PROMPT, None, intervention={"exclude_1": "factual"}, max_new_tokens=30,
                                        num_samples=4))
    if long_token is not None:  # long tokens at every third step of the factual row
        found.factual.tokens[::3] = [long_token] * len(found.factual.tokens[::3])
    rows = [found.factual, *found.counterfactuals, found.mode]
    steps = max(len(r.tokens) for r in rows)
    widths = [max(min(len(visible(r.tokens[t])), TOKEN_WIDTH) + 2 for r in rows if t < len(r.tokens))
              for t in range(steps)]

    def table_width(k):
        return sum(max(widths[j::k]) for j in range(k))

    blocks = _blocks(render_worlds(found))
    k = len(blocks[0])
    assert [t for block in blocks for t in block] == list(range(steps))
    assert all(len(block) == k for block in blocks[:-1])
    assert table_width(k) <= BLOCK_WIDTH and (k == STEPS_PER_LINE or table_width(k + 1) > BLOCK_WIDTH)
    if long_token is None:
        assert k == STEPS_PER_LINE  # the tiny model's words are short
    else:
        assert k < STEPS_PER_LINE
    assert f"max-width: {TOKEN_WIDTH}ch" in STYLE and "overflow-wrap: anywhere" in STYLE


# -- the page in a real browser ---------------------------------------------------------------


@contextlib.contextmanager
def _app(root, *args: str, seconds: float):
    """``pyro-lmscm app ARGS`` (:func:`~pyro_lmscm.testing.served_app`), its log in
    ``root/app.log``: yields its url (fails with the log if it does not start)."""
    with open(root / "app.log", "w") as log, contextlib.ExitStack() as stack:
        try:
            url = stack.enter_context(served_app(*args, log=log, seconds=seconds))
        except RuntimeError as error:
            log.flush()
            pytest.fail(f"{error}:\n{(root / 'app.log').read_text()}")
        yield url


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """``pyro-lmscm app --model FOLDER`` on tiny_llama(seed=0), on a free port of 127.0.0.1;
    yields (url, the folder of a second tiny model)."""
    pytest.importorskip("gradio", reason="the explorer needs the extra pyro-lmscm[app] (in the test extra)")
    root = tmp_path_factory.mktemp("explorer")
    folders = []
    for seed in (0, 1):
        lm = tiny_llama(seed=seed)
        folders.append(root / f"tiny{seed}")
        lm.model.save_pretrained(folders[-1])
        lm.tokenizer.save_pretrained(folders[-1])
    # a loaded machine imports torch and gradio slowly
    with _app(root, "--model", str(folders[0]), "--threads", "1", seconds=240) as url:
        yield url, folders[1]


def test_explorer_in_headless_chromium(served, chromium_context):
    from playwright.sync_api import expect

    url, second_model = served
    problems, external = [], []
    page = chromium_context.new_page()
    page.on("console", lambda m: problems.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on("request", lambda r: None if r.url.startswith((url, "data:", "blob:")) else external.append(r.url))
    page.goto(url)
    page.wait_for_selector("#run")
    page.wait_for_load_state("load")
    assert problems == [] and external == []

    # a run: no intervention on a sampled string; every counterfactual is the factual string
    page.locator("#prompt textarea").fill(PROMPT)
    page.locator("#kind").get_by_label("none").check()
    page.locator("#run").click()
    table = page.locator("#worlds table")
    expect(table).to_be_visible(timeout=60_000)
    expect(page.locator("#summary")).to_contain_text(
        "P(unchanged) = 1 (Gumbel-max; stable mechanisms 1–1; any mechanism 1–1)")
    factual_row = [c.inner_text() for c in table.locator("tr.factual td").all()]
    assert all(factual_row), factual_row  # no blank chip: whitespace shows as a glyph
    rows = table.locator("tr.counterfactual")
    assert rows.count() == 1 and f"×{DEFAULTS.num_samples}/{DEFAULTS.num_samples}" in rows.first.inner_text()
    assert [c.inner_text() for c in rows.first.locator("td").all()] == factual_row
    n = len(factual_row)
    assert n >= 3, factual_row
    assert page.locator("#observed textarea").input_value()  # the sampled string, to edit or reuse


    # click factual token 2, then "Exclude it": every counterfactual changes at step 2 and
    # keeps the factual tokens before it; P(unchanged) is 0
    page.locator("#factual .token").nth(2).click()
    expect(page.locator("#selected")).to_contain_text("step 2")
    page.locator("#exclude-token").click()
    expect(table.locator("caption")).to_contain_text('do(exclude_2="factual")', timeout=60_000)
    expect(page.locator("#summary")).to_contain_text("P(unchanged) = 0 ")
    rows = table.locator("tr.counterfactual")
    assert rows.count() >= 1
    for i in range(rows.count()):
        cells = [c.inner_text() for c in rows.nth(i).locator("td").all()]
        assert cells[:2] == factual_row[:2] and cells[2] != factual_row[2], (cells, factual_row)
        assert rows.nth(i).locator("td.first-divergence").get_attribute("data-step") == "2"
    title = rows.first.locator("td").nth(2).get_attribute("title")
    assert re.fullmatch(r"t = 2 · q\(token \| prefix\) = [0-9.e-]+", title), title
    expect(page.locator("#divergence img")).to_be_visible()  # the exact law, as a bar plot

    # bad inputs show their message in the page; the server lives on
    page.locator("#kind").get_by_label("force / exclude a token").check()
    page.locator("#action").get_by_label("force a token").check()
    page.locator("#force-token textarea").fill("the man")
    page.locator("#run").click()
    expect(page.locator("#message")).to_contain_text("2 tokens", timeout=30_000)
    page.locator("#kind").get_by_label("second model").check()
    page.locator("#model-folder textarea").fill("/no/such/model/folder")
    page.locator("#run").click()
    expect(page.locator("#message")).to_contain_text("does not exist", timeout=30_000)
    page.locator("#prompt textarea").fill("")
    page.locator("#run").click()
    expect(page.locator("#message")).to_contain_text("prompt is empty", timeout=30_000)

    # and a real second model still runs afterwards; the message clears
    page.locator("#prompt textarea").fill(PROMPT)
    page.locator("#model-folder textarea").fill(str(second_model))
    page.locator("#run").click()
    expect(table.locator("caption")).to_contain_text("do(model=", timeout=60_000)
    expect(page.locator("#message")).to_have_text("")

    # a 15-word observation of long words: the aligned table wraps into blocks that fit the
    # page at 1400 and 1000 px (nothing clipped or scrolled away at the right, no token
    # spilling out of its cell), each block with its step header (8 steps of these words with
    # Gradio's cell padding overflowed 1000 px)
    page.locator("#observed textarea").fill(
        "the woman walked home and the nurse smiled and the doctor walked to the city")
    page.locator("#run").click()
    expect(table.locator("tr.steps").nth(1)).to_be_visible(timeout=60_000)
    fits = """() => { const box = document.querySelector('#lmscm-worlds');
        return [box.scrollWidth, box.clientWidth, document.querySelectorAll('#lmscm-worlds tbody').length,
                document.querySelectorAll('#lmscm-worlds tr.steps').length,
                [...box.querySelectorAll('td')].filter(c => c.scrollWidth > c.clientWidth).length]; }"""
    for width in (1400, 1000):
        page.set_viewport_size({"width": width, "height": 1000})
        page.wait_for_timeout(300)
        scroll, box, blocks, headers, spilled = page.evaluate(fits)
        assert scroll <= box and blocks == headers >= 2 and spilled == 0, (width, scroll, box, blocks, headers, spilled)
    assert problems == [] and external == []


# -- SmolLM2 in the browser: the README's --text example and a system-prompt counterfactual ----


@pytest.fixture(scope="module")
def served_smollm2(tmp_path_factory):
    """``pyro-lmscm app`` on the embedded SmolLM2-135M-Instruct, with its defaults."""
    pytest.importorskip("gradio", reason="the explorer needs the extra pyro-lmscm[app] (in the test extra)")
    root = tmp_path_factory.mktemp("explorer-smollm2")
    with _app(root, seconds=300) as url:
        yield url


@pytest.mark.slow
def test_readme_text_example_in_the_explorer(served_smollm2, chromium_context):
    """README: ``counterfactual --prompt "The nurse said that" --text " she was tired."
    --intervention 'w_0=" he"'``, pasted into the explorer with its default settings (the
    old hidden top-k 50 refused it): every counterfactual starts with " he", P(unchanged) is 0."""
    from playwright.sync_api import expect

    page = chromium_context.new_page()
    page.goto(served_smollm2)
    page.wait_for_selector("#run")
    page.locator("#prompt textarea").fill("The nurse said that")
    page.locator("#observed textarea").fill(" she was tired.")
    page.locator("#kind").get_by_label("force / exclude a token").check()
    page.locator("#step input").fill("0")
    page.locator("#action").get_by_label("force a token").check()
    page.locator("#force-token textarea").fill(" he")
    page.locator("#run").click()
    table = page.locator("#worlds table")
    expect(table.locator("caption")).to_contain_text('do(w_0=" he")', timeout=600_000)
    expect(page.locator("#summary")).to_contain_text("P(unchanged) = 0 ", timeout=600_000)
    assert page.locator("#message").inner_text() == ""
    assert [c.inner_text() for c in table.locator("tr.factual td").all()] == [" she", " was", " tired", "."]
    rows = table.locator("tr.counterfactual")
    assert rows.count() >= 1
    for i in range(rows.count()):
        assert rows.nth(i).locator("td").first.inner_text() == " he"


@pytest.mark.slow
def test_system_prompt_counterfactual_in_the_explorer(served_smollm2, chromium_context):
    """Chat mode: a sampled assistant reply, then the null intervention reproduces it exactly
    (P(unchanged) = 1, one counterfactual row equal to the factual one), then a system-prompt
    edit runs end to end."""
    from playwright.sync_api import expect

    page = chromium_context.new_page()
    page.goto(served_smollm2)
    page.wait_for_selector("#run")
    page.locator("#chat input").check()
    expect(page.locator("#system textarea")).to_be_visible()
    page.locator("#kind").get_by_label("none").check()
    page.locator("#run").click()  # samples a reply (24 tokens at most) and keeps it
    table = page.locator("#worlds table")
    expect(page.locator("#summary")).to_contain_text("P(unchanged) = 1 ", timeout=600_000)
    reply = page.locator("#observed textarea").input_value()
    assert reply.strip()
    factual_row = [c.inner_text() for c in table.locator("tr.factual td").all()]
    rows = table.locator("tbody").first.locator("tr.counterfactual")  # one row per block of steps
    assert rows.count() == 1 and f"×{DEFAULTS.num_samples}/{DEFAULTS.num_samples}" in rows.first.inner_text()
    cells = [c.inner_text() for c in table.locator("tr.counterfactual td").all()]
    assert cells[: len(factual_row)] == factual_row
    page.locator("#kind").get_by_label("system prompt edit (chat)").check()
    page.locator("#new-system textarea").fill("You are a pirate. Answer like a pirate.")
    page.locator("#run").click()
    caption = "do(system=You are a pirate. Answer like a pirate.)"
    expect(table.locator("caption")).to_contain_text(caption, timeout=600_000)
    expect(page.locator("#summary")).to_contain_text("stable mechanisms", timeout=600_000)
    assert page.locator("#message").inner_text() == ""
    assert page.locator("#observed textarea").input_value() == reply
