"""Model folders of another ``transformers`` major version: the RoPE base is read as the
release that wrote the folder reads it, or loading raises ``ModelLoadError`` naming config.json.

transformers 5.x writes ``rope_parameters`` (``{"rope_type": "default", "rope_theta": ...}``)
and no top-level ``rope_theta``; 4.x reads only the top-level keys. The folders here are
written by hand, so each test runs under both major versions.
"""

import json
import shutil
import warnings

import pytest
import torch
import transformers

from pyro_lmscm.errors import LMSCMWarning, ModelLoadError
from pyro_lmscm.loading import load_model_and_tokenizer

MAJOR = int(transformers.__version__.split(".")[0])
THETA = 100_000.0  # not Llama's default 10000, so a reader that misses it runs another model
IDS = torch.tensor([[2] + [3 + (7 * i) % 25 for i in range(40)]])


def _rope_theta(config) -> float:
    """The RoPE base that the loaded model runs with, in either major version's attributes."""
    if MAJOR >= 5:
        return config.rope_parameters["rope_theta"]
    return config.rope_theta


def _folder(tiny_folder, tmp_path, edit):
    """A copy of the tiny model folder whose config.json is rewritten by ``edit(config)``."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_folder, folder)
    path = folder / "config.json"
    config = json.loads(path.read_text())
    for key in ("rope_theta", "rope_scaling", "rope_parameters"):
        config.pop(key, None)
    edit(config)
    path.write_text(json.dumps(config))
    return folder


def _as_5x(rope_parameters, version="5.0.0"):
    def edit(config):
        config["rope_parameters"] = rope_parameters
        config["transformers_version"] = version

    return edit


def _reference_logits(tiny_folder, rope_theta, **rope):
    """The oracle: the same weights in a Llama built in code with ``rope_theta`` (and ``rope``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=28, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, eos_token_id=1, bos_token_id=2,
        tie_word_embeddings=False, rope_theta=rope_theta, **rope,
    )
    model = LlamaForCausalLM(config).eval()
    from safetensors.torch import load_file

    model.load_state_dict(load_file(f"{tiny_folder}/model.safetensors"))
    with torch.no_grad():
        return model(IDS).logits


def _logits(folder):
    model, _ = load_model_and_tokenizer(str(folder), device="cpu")
    with torch.no_grad():
        return model, model(IDS).logits


@pytest.mark.parametrize("version", ["5.0.0", "6.1.0"])
def test_rope_parameters_folder_runs_with_its_rope_theta(tiny_folder, tmp_path, version):
    """Under 4.x the base is translated from rope_parameters; under 5.x it is read natively (a
    folder of a later major version loads with a warning there, see the test below)."""
    if MAJOR >= 5 and int(version[0]) > MAJOR:
        pytest.skip("a later major version's folder warns under 5.x (test_later_major_version_loads_with_a_warning)")
    folder = _folder(tiny_folder, tmp_path, _as_5x({"rope_type": "default", "rope_theta": THETA}, version))
    model, logits = _logits(folder)
    assert _rope_theta(model.config) == THETA
    reference = _reference_logits(tiny_folder, THETA)
    assert torch.equal(logits, reference)
    # the baseline that fails: the default base runs another model on these 41 positions
    assert (logits - _reference_logits(tiny_folder, 10_000.0)).abs().max() > 1e-4


def test_old_style_folder_runs_with_its_rope_theta(tiny_folder, tmp_path):
    """A folder as 4.x writes it (top-level rope_theta) reads right in both major versions."""

    def edit(config):
        config["rope_theta"] = THETA
        config["rope_scaling"] = None
        config["transformers_version"] = "4.56.2"

    model, logits = _logits(_folder(tiny_folder, tmp_path, edit))
    assert _rope_theta(model.config) == THETA
    assert torch.equal(logits, _reference_logits(tiny_folder, THETA))


@pytest.mark.skipif(MAJOR >= 5, reason="rope_parameters is what transformers 5.x reads itself")
def test_scaled_rope_parameters_become_rope_scaling_under_4x(tiny_folder, tmp_path):
    """A llama3-scaled base under 4.x equals a model built with the same rope_scaling in code."""
    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    folder = _folder(tiny_folder, tmp_path, _as_5x({"rope_type": "llama3", "rope_theta": THETA, **scaling}))
    model, logits = _logits(folder)
    assert model.config.rope_theta == THETA
    assert model.config.rope_scaling == {"rope_type": "llama3", **scaling}
    rope_scaling = {"rope_type": "llama3", **scaling}
    assert torch.equal(logits, _reference_logits(tiny_folder, THETA, rope_scaling=rope_scaling))
    assert not torch.equal(logits, _reference_logits(tiny_folder, THETA))  # the scaling takes effect


UNTRANSLATABLE = {
    "per layer type": {"full_attention": {"rope_type": "default", "rope_theta": THETA},
                       "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
    "longrope": {"rope_type": "longrope", "rope_theta": THETA, "short_factor": [1.0] * 4, "long_factor": [2.0] * 4},
    "unknown type": {"rope_type": "fancy", "rope_theta": THETA},
    "no rope_theta": {"rope_type": "default"},
    "partial rotary": {"rope_type": "default", "rope_theta": THETA, "partial_rotary_factor": 0.5},
}


@pytest.mark.skipif(MAJOR >= 5, reason="transformers 5.x reads rope_parameters itself")
@pytest.mark.parametrize("case", sorted(UNTRANSLATABLE))
def test_untranslatable_rope_parameters_raise_naming_config_json(tiny_folder, tmp_path, case):
    folder = _folder(tiny_folder, tmp_path, _as_5x(UNTRANSLATABLE[case]))
    with pytest.raises(ModelLoadError, match=r"config\.json was written by transformers 5\.0\.0") as raised:
        load_model_and_tokenizer(str(folder), device="cpu")
    assert str(folder / "config.json") in str(raised.value)
    assert transformers.__version__ in str(raised.value)


@pytest.mark.skipif(MAJOR >= 5, reason="transformers 5.x reads rope_parameters itself")
def test_top_level_rope_theta_that_disagrees_raises_under_4x(tiny_folder, tmp_path):
    def edit(config):
        _as_5x({"rope_type": "default", "rope_theta": THETA})(config)
        config["rope_theta"] = 10_000.0

    with pytest.raises(ModelLoadError, match="top-level rope_theta 10000.0 disagrees"):
        load_model_and_tokenizer(str(_folder(tiny_folder, tmp_path, edit)), device="cpu")


@pytest.mark.skipif(MAJOR < 5, reason="under 4.x a later version's folder is translated (tests above)")
def test_later_major_version_loads_with_a_warning(tiny_folder, tmp_path):
    """Under 5.x a folder of a later major version is read as this release reads it, with a
    warning that names its config.json (its format changes are not known yet)."""
    later = f"{MAJOR + 1}.0.0"
    folder = _folder(tiny_folder, tmp_path, _as_5x({"rope_type": "default", "rope_theta": THETA}, later))
    with pytest.warns(LMSCMWarning, match=rf"written by transformers {later}, a later major version") as caught:
        model, logits = _logits(folder)
    assert any(str(folder / "config.json") in str(w.message) for w in caught)
    assert _rope_theta(model.config) == THETA and torch.equal(logits, _reference_logits(tiny_folder, THETA))
    # the baseline: the same folder written by this major version loads without a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", LMSCMWarning)
        _logits(_folder(tiny_folder, tmp_path / "same", _as_5x({"rope_type": "default", "rope_theta": THETA},
                                                              transformers.__version__)))


@pytest.mark.skipif(MAJOR >= 5, reason="transformers 5.x imports its own TokenizersBackend")
def test_a_5x_tokenizer_under_4x_names_the_version(tiny_folder, tmp_path):
    """5.x names its tokenizer class TokenizersBackend, which 4.x cannot import: the error says so."""
    folder = _folder(tiny_folder, tmp_path, _as_5x({"rope_type": "default", "rope_theta": THETA}))
    path = folder / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "tokenizer_class": "TokenizersBackend"}))
    with pytest.raises(ModelLoadError, match=r"written by transformers 5\.0\.0, whose tokenizer files"):
        load_model_and_tokenizer(str(folder), device="cpu")
    # the baseline: the same tokenizer written by this major version is only called corrupt
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "transformers_version": transformers.__version__}))
    with pytest.raises(ModelLoadError, match="corrupt or of another tokenizer"):
        load_model_and_tokenizer(str(folder), device="cpu")
