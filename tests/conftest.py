import os
import shutil
import signal
import threading

import pyro
import pytest
import torch

from pyro_lmscm.testing import tiny_llama


@pytest.fixture(autouse=True, scope="session")
def _sigint_as_python_sets_it():
    """Python's own SIGINT handler (``KeyboardInterrupt``) for the session, as an interactive run
    has it. A process started in the background by a shell without job control (``cmd &`` in a
    script, ``nohup``) inherits SIGINT *ignored*, and Python then keeps ``SIG_IGN``: the interrupt
    tests (tests/test_atomic.py, tests/interventions/test_restore.py) would raise signals that
    never arrive. Put back at the end."""
    inherited = signal.getsignal(signal.SIGINT)
    main = threading.current_thread() is threading.main_thread()
    if main and inherited == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    if main and inherited == signal.SIG_IGN:
        signal.signal(signal.SIGINT, inherited)


CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _require(what: str, hint: str) -> None:
    if _in_ci():
        pytest.fail(f"CI is set but {what} is missing; {hint}")
    pytest.skip(f"{what} is missing and CI is not set, so the browser test is skipped; {hint}")


@pytest.fixture
def chromium():
    """The system Chromium (``$PYRO_LMSCM_CHROMIUM`` or on PATH), for the browser tests of the
    study report and the explorer; skipped only outside CI."""
    path = os.environ.get("PYRO_LMSCM_CHROMIUM") or next(filter(None, map(shutil.which, CHROMIUM_NAMES)), None)
    if path is None:
        _require("a chromium binary", "install Debian's chromium (apt-get install chromium), as .ci/run does.")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _require("the playwright package", "pip install -e '.[test]' (only the Python package; no browser download).")
    return path


@pytest.fixture
def chromium_context(chromium, tmp_path):
    """A headless Chromium (a fresh profile, flags that make no request of their own, a
    1400 x 1000 viewport) driven by playwright; closed after the test."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=chromium, headless=True, args=list(CHROMIUM_ARGS),
            viewport={"width": 1400, "height": 1000},
        )
        try:
            yield context
        finally:
            context.close()


# Tiny models run fastest on one thread (and do not stall when another process holds a
# core); tests of the real model ask for more threads with the `all_threads` fixture: their
# process's share of the cores when pytest-xdist runs one process per core.
torch.set_num_threads(1)


def cores_per_process() -> int:
    """The cores of this machine over the pytest-xdist processes that share it (at least 1)."""
    processes = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return max(1, (os.cpu_count() or 1) // max(1, processes))


def pytest_collection_modifyitems(config, items):
    """The SmolLM2 tests (a minute or more each) first, in their order: pytest-xdist's
    processes then share out the short tests after them instead of waiting on a long one at
    the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture
def all_threads():
    torch.set_num_threads(cores_per_process())
    yield
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    yield


@pytest.fixture(scope="session")
def lm():
    """A tiny Llama with a word tokenizer (vocabulary 28, end of sequence 1, pad 0)."""
    return tiny_llama(seed=0)


@pytest.fixture(scope="session")
def other_lm():
    """Another tiny Llama over the same vocabulary (for model swaps)."""
    return tiny_llama(seed=1)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """``tiny_llama(seed=0)`` (the ``lm`` fixture's model) saved with its tokenizer by
    ``save_pretrained``: a local model folder, as a string, for the CLI and the loaders."""
    path = tmp_path_factory.mktemp("tiny")
    model = tiny_llama(seed=0)
    model.model.save_pretrained(path)
    model.tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def lm_bf16():
    return tiny_llama(seed=0, dtype=torch.bfloat16)


@pytest.fixture
def linear_calls(monkeypatch):
    """Every ``torch.nn.functional.linear`` call from here on, as ``(rows, input dtype, whether
    a heap_allocations scope was open)``; ``linear_calls.native(flag)`` says whether the CPU
    has native bfloat16 GEMM kernels. For the checks that an entry point runs all its model
    work in ``compute_scope``."""
    import torch

    from pyro_lmscm.runtime import heap, kernels

    class Calls(list):
        def native(self, flag: bool) -> None:
            monkeypatch.setattr(kernels, "native_bf16_gemm", lambda: flag)

        def all_in_heap_scope(self) -> bool:
            """Every call ran in a heap_allocations scope (vacuously without glibc, where the
            scope is a no-op)."""
            return heap._glibc() is None or all(heap for _, _, heap in self)

    calls = Calls()
    linear = torch.nn.functional.linear

    def spy(x, *args, **kwargs):
        calls.append((x.shape[:-1].numel(), x.dtype, heap._HEAP_SCOPES[0] > 0))
        return linear(x, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "linear", spy)
    return calls
