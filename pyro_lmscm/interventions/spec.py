"""Interventions written as text (command line) or as a JSON / YAML file.

A spec is a ``;``-separated list of ``key=value`` items, or a file holding a mapping:

* ``steer=female`` (or ``male``), optionally ``steer=female:ALPHA:LAYER`` -- a mechanism
  named ``"steer"`` from :func:`~pyro_lmscm.interventions.gender.gender_steering`, selected;
  ``LAYER`` may list several layers, ``steer=female:1.0:4,8,12``: a
  :class:`~pyro_lmscm.interventions.Combined` of one steering per layer (one part each);
* ``mimic=female`` (or ``male``, optionally ``:ALPHA:LAYER``) -- MiMiC,
  :func:`~pyro_lmscm.interventions.gender.gender_mimic` (mean and covariance), named
  ``"mimic"``, selected;
* ``finetune=victorian`` (optionally ``:STEPS:RANK``) -- a LoRA adapter trained by
  :func:`~pyro_lmscm.interventions.finetune.lora_finetune` on the built-in texts of that
  register, named ``"finetune"``, selected (about a minute on SmolLM2 on a CPU); in a
  file a mapping of its keyword arguments, with ``style`` or ``texts``;
* ``memit=SUBJECT|PROMPT|TARGET`` (several facts joined by ``&``) -- a
  :func:`~pyro_lmscm.interventions.memit.memit_edit` named ``"memit"``, selected, over
  its default layers (a mapping in a file may give ``requests`` and ``layers``);
* ``model=NAME_OR_PATH`` -- a :class:`~pyro_lmscm.interventions.ModelSwap` to another model
  with the same tokenizer, named ``"model"``, selected;
* ``rome=SUBJECT|PROMPT|TARGET`` (optionally ``|LAYER``) -- a
  :func:`~pyro_lmscm.interventions.rome.rome_edit` named ``"rome"``, selected: the model
  completes ``PROMPT`` (which mentions ``SUBJECT``) with ``TARGET``; the layer defaults to a
  fifth of the depth (layer 6 of SmolLM2's 30);
* ``prompt=TEXT`` -- replace the prompt (in a file also a list of chat messages,
  ``[{"role": "system", "content": ...}, {"role": "user", "content": ...}]``);
* ``system=TEXT`` -- for a chat prompt (``messages=`` of :func:`parse_intervention`): the
  same conversation with another system prompt (replacing the system message, or put
  first when there is none; ``system=`` with nothing after it removes it);
* ``user=TEXT`` -- for a chat prompt: the same conversation with another last user turn;
* ``w_T=ID`` or ``w_T="TEXT"`` -- force token ``T`` (a text must be exactly one token);
* ``exclude=T`` (or ``exclude=T1,T2``) -- anything but the observed token at step ``T``;
  ``exclude_T=ID`` or ``exclude_T="TEXT"`` excludes another token there.

In a file the same keys map to values; ``steer`` may also be a mapping with ``direction``,
``alpha`` and ``layer``, and ``rome`` one with ``subject``, ``prompt``, ``target`` and
``layer``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from ..errors import InterventionError, LMSCMError, RemoteCodeError
from ..models.sites import EXCLUDE_PREFIX, MECHANISM, PROMPT, TOKEN_PREFIX, exclude_key, parse_step_site
from ..validation import as_int, as_lm, load_data_file
from .gender import gender_steering
from .model_swap import ModelSwap
from .ops import FACTUAL_TOKEN

if TYPE_CHECKING:
    from ..lm import HFLanguageModel
    from ..models.mechanism import Mechanism

__all__ = [
    "CHAT_KEYS",
    "MECHANISM_KEYS",
    "InterventionSpec",
    "describe",
    "parse_intervention",
    "read_spec",
    "render_spec",
]


@dataclass
class InterventionSpec:
    """Mechanisms to add to the SCM and the intervention that selects them."""

    mechanisms: dict[str, Mechanism] = field(default_factory=dict)
    intervention: dict[str, Any] = field(default_factory=dict)


def read_spec(spec: str) -> Mapping[str, Any]:
    """The mapping of a spec string or of a JSON / YAML spec file (see the module docstring)."""
    if not isinstance(spec, str):
        raise InterventionError(
            f"an intervention spec is a str ('steer=female', a .json/.yaml file) or a mapping, "
            f"got {type(spec).__name__} {spec!r:.80}."
        )
    path = Path(spec)
    if spec.endswith((".json", ".yaml", ".yml")):
        if not path.exists():
            raise InterventionError(f"intervention file {spec!r} does not exist.")
        if not path.is_file():
            raise InterventionError(f"intervention file {spec!r} is not a file (a directory?).")
        data = _load_file(path)
        if not isinstance(data, Mapping):
            raise InterventionError(f"intervention file {spec!r} must hold a mapping, got {type(data).__name__}.")
        return data
    items: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        key, sep, value = part.partition("=")
        if not sep:
            raise InterventionError(
                f"intervention item {part!r} is not key=value; e.g. 'steer=female', 'w_3=\"she\"'."
            )
        items[key.strip()] = value.strip()
    return items


def _render_value(key: str, value: Any) -> str:
    """One value of a spec mapping in the text syntax that :func:`read_spec` and the builders
    read back; a value the text syntax cannot hold (a chat's messages, a fine-tune's own texts)
    as compact JSON."""
    import json

    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str):
        token_key = key.startswith((f"{TOKEN_PREFIX}_", f"{EXCLUDE_PREFIX}_"))
        quoted = len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'"
        if token_key and not quoted and not value.lstrip("-").isdigit():
            return f'"{value}"'
        return value
    if isinstance(value, (list, tuple)) and key == "exclude" and all(isinstance(v, int) for v in value):
        return ",".join(str(v) for v in value)
    if isinstance(value, Mapping) and key in ("steer", "mimic") and set(value) <= {"direction", "alpha", "layer"}:
        parts = [str(value.get("direction", "female"))]
        layer = value.get("layer")
        if "alpha" in value or layer is not None:
            parts.append(str(value.get("alpha", 1.0)))
        if layer is not None:
            parts.append(",".join(str(v) for v in layer) if isinstance(layer, (list, tuple)) else str(layer))
        return ":".join(parts)
    if isinstance(value, Mapping) and key == "rome" and {"subject", "prompt", "target"} <= set(value) <= {
        "subject", "prompt", "target", "layer"
    }:
        parts = [str(value["subject"]), str(value["prompt"]), str(value["target"])]
        return "|".join(parts + ([str(value["layer"])] if value.get("layer") is not None else []))
    if isinstance(value, Mapping) and key == "memit" and set(value) == {"requests"}:
        requests = value["requests"]
        requests = [requests] if isinstance(requests, (str, Mapping)) else requests
        if all(isinstance(r, Mapping) and set(r) == {"subject", "prompt", "target"} for r in requests):
            return "&".join(f"{r['subject']}|{r['prompt']}|{r['target']}" for r in requests)
        if all(isinstance(r, str) for r in requests):
            return "&".join(requests)
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)


def render_spec(spec: str | Mapping[str, Any]) -> str:
    """An intervention in the spec syntax, short: ``'steer=female:1.0:10; w_3="she"'``.

    The one rendering of an intervention (the command line, the explorer, the study report):
    :func:`read_spec` reads it back to the same mapping, up to the text form of values that
    a file gives as mappings (``steer: {direction: female, alpha: 1.0}`` renders
    ``steer=female:1.0``, which builds the same mechanism). A value that the text syntax
    cannot hold (a chat's messages) renders as JSON.

    :param spec: a spec string (or file), or a spec mapping.
    :returns: ``key=value`` items joined by ``"; "``; ``""`` for no intervention.

    >>> render_spec({"steer": {"direction": "female", "alpha": 1.0, "layer": 10}, "w_3": "she"})
    'steer=female:1.0:10; w_3="she"'
    >>> read_spec(render_spec("steer=female:1.0;  exclude=3"))
    {'steer': 'female:1.0', 'exclude': '3'}
    """
    items = read_spec(spec) if isinstance(spec, str) else spec
    if not isinstance(items, Mapping):
        raise InterventionError(f"an intervention spec is a str or a mapping, got {type(spec).__name__}.")
    return "; ".join(f"{key}={_render_value(str(key), value)}" for key, value in items.items())


def describe(spec: str | Mapping[str, Any]) -> str:
    """``do(...)`` of an intervention, for titles: ``do(steer=female:1.0)``, ``do(nothing)``."""
    text = render_spec(spec)
    return f"do({text})" if text else "do(nothing)"


def _load_file(path: Path) -> Any:
    """The parsed content of a JSON or YAML file; every failure names the file."""
    return load_data_file(path, "intervention file", InterventionError)


def _token(lm: HFLanguageModel, name: str, value: Any) -> int:
    if isinstance(value, int) or (isinstance(value, str) and value.lstrip("-").isdigit()):
        return int(value)
    text = str(value)
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1]
    ids = lm.encode(text).tolist()
    if len(ids) != 1:
        raise InterventionError(f"{name}={value!r}: the text is {len(ids)} tokens {ids}; give one token or an id.")
    return ids[0]


def _steps(value: Any) -> list[int]:
    """The steps of ``exclude=T1,T2`` (or a list of ints in a file)."""
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    steps = []
    for item in items:
        text = str(item).strip()
        if isinstance(item, bool) or not text.isascii() or not text.isdigit():
            raise InterventionError(f"exclude={value!r}: give steps as non-negative integers, e.g. exclude=3 or 3,5.")
        steps.append(int(text))
    if not steps:
        raise InterventionError("exclude= needs at least one step, e.g. exclude=3.")
    return steps


def _gender_options(value: Any) -> dict[str, Any]:
    """``DIRECTION[:ALPHA[:LAYER]]`` (or a mapping) as keyword arguments."""
    if isinstance(value, Mapping):
        return dict(value)
    direction, *rest = str(value).split(":")
    options: dict[str, Any] = {"direction": direction}
    if rest:
        options["alpha"] = float(rest[0])
    if len(rest) > 1:
        layers = [int(layer) for layer in rest[1].split(",")]
        options["layer"] = layers[0] if len(layers) == 1 else layers
    return options


def _by_layer(build: Callable[..., Mechanism], lm: HFLanguageModel, options: dict[str, Any]) -> Mechanism:
    """``build(lm, **options)``, or a :class:`Combined` of one per layer when ``layer`` is a list."""
    layers = options.get("layer")
    if not isinstance(layers, (list, tuple)):
        return build(lm, **options)
    from .combined import Combined

    return Combined([build(lm, **{**options, "layer": layer}) for layer in layers])


def _steer(lm: HFLanguageModel, value: Any) -> Mechanism:
    return _by_layer(gender_steering, lm, _gender_options(value))


def _mimic(lm: HFLanguageModel, value: Any) -> Mechanism:
    from .gender import gender_mimic

    return _by_layer(gender_mimic, lm, _gender_options(value))


def _finetune(lm: HFLanguageModel, value: Any) -> Mechanism:
    from .finetune import lora_finetune, style_texts

    if isinstance(value, Mapping):
        options = dict(value)
        style = options.pop("style", "victorian")
        if "texts" in options:  # texts of one's own instead of a built-in register
            return lora_finetune(lm, **options)
    else:
        style, *rest = str(value).split(":")
        options = {}
        if rest:
            options["steps"] = int(rest[0])
        if len(rest) > 1:
            options["rank"] = int(rest[1])
    return lora_finetune(lm, style_texts(style), **options)


def _rome(lm: HFLanguageModel, value: Any) -> Mechanism:
    from .rome import rome_edit

    options = _fact(value, "rome")
    rest = options.pop("_rest", [])
    if len(rest) > 1:
        raise InterventionError(f"rome={value!r}: give SUBJECT|PROMPT|TARGET[|LAYER].")
    if rest:
        options["layer"] = rest[0]
    unknown = set(options) - {"subject", "prompt", "target", "layer"}
    missing = {"subject", "prompt", "target"} - set(options)
    if unknown or missing:
        raise InterventionError(f"rome: give subject, prompt, target (and optionally layer); got {sorted(options)}.")
    depth = lm.model.config.num_hidden_layers
    layer = options.get("layer")
    if layer is None or (isinstance(layer, str) and not layer.strip()):
        layer = depth // 5
    elif isinstance(layer, str) and layer.strip().isdigit():
        layer = int(layer)
    layer = as_int(layer, "the rome layer", minimum=0, maximum=depth - 1, error=InterventionError)
    if not all(isinstance(options[key], str) and options[key].strip() for key in ("subject", "prompt", "target")):
        raise InterventionError("rome: the subject, prompt and target must be non-empty texts.")
    return rome_edit(lm, options["prompt"], options["subject"], options["target"], layer=layer)


def _fact(value: Any, key: str) -> dict[str, Any]:
    """``{subject, prompt, target}`` of ``SUBJECT|PROMPT|TARGET`` (the target keeps its
    leading space) or of a mapping."""
    if isinstance(value, Mapping):
        return dict(value)
    parts = str(value).split("|")
    if len(parts) < 3:
        raise InterventionError(
            f"{key}={value!r}: give SUBJECT|PROMPT|TARGET, e.g. "
            f"'{key}=The Louvre|The Louvre is located in the city of| Rome'."
        )
    return {"subject": parts[0].strip(), "prompt": parts[1].strip(), "target": parts[2], "_rest": parts[3:]}


def _memit(lm: HFLanguageModel, value: Any) -> Mechanism:
    from .memit import memit_edit

    layers = None
    if isinstance(value, Mapping):
        unknown = set(value) - {"requests", "layers"}
        if unknown or "requests" not in value:
            raise InterventionError(f"memit: give `requests` (and optionally `layers`); got {sorted(value)}.")
        requests, layers = value["requests"], value.get("layers")
        if isinstance(requests, (str, Mapping)):
            requests = [requests]
    else:
        requests = [part for part in str(value).split("&") if part.strip()]
    facts = []
    for request in requests:
        fact = _fact(request, "memit")
        if fact.pop("_rest", []):
            raise InterventionError(f"memit: {request!r} has more than SUBJECT|PROMPT|TARGET.")
        facts.append({"prompt": fact.get("prompt"), "subject": fact.get("subject"), "target": fact.get("target")})
    if not facts:
        raise InterventionError("memit: give at least one SUBJECT|PROMPT|TARGET.")
    return memit_edit(lm, facts, layers=layers)


def _model(lm: HFLanguageModel, value: Any) -> Mechanism:
    from ..loading import load_lm

    return ModelSwap(load_lm(str(value), dtype=lm.dtype, device=lm.device))


#: The spec keys that build a mechanism (named as the key and selected), and their builders.
MECHANISM_KEYS: dict[str, Callable[[HFLanguageModel, Any], Mechanism]] = {
    "steer": _steer,
    "mimic": _mimic,
    "finetune": _finetune,
    "memit": _memit,
    "rome": _rome,
    "model": _model,
}


#: The spec keys that edit one turn of a chat prompt.
CHAT_KEYS = ("system", "user")


def _edited_messages(messages: Any, edits: Mapping[str, Any]) -> list[dict[str, Any]]:
    """``messages`` with the system prompt and / or the last user turn replaced."""
    from ..lm import check_messages

    if messages is None:
        raise InterventionError(
            f"{'/'.join(sorted(edits))}= edits a chat prompt, but the prompt is text; give the prompt as chat "
            "messages (--user/--system or --messages on the command line)."
        )
    out = [dict(m) for m in check_messages(messages)]
    if "system" in edits:
        text = edits["system"]
        if not isinstance(text, str):
            raise InterventionError(f"system={text!r}: the system prompt must be text.")
        rest = [m for m in out if m["role"] != "system"]
        out = ([{"role": "system", "content": text}] if text else []) + rest
    if "user" in edits:
        text = edits["user"]
        users = [i for i, m in enumerate(out) if m["role"] == "user"]
        if not isinstance(text, str) or not users:
            raise InterventionError(
                f"user={text!r}: needs text and a conversation with a user turn (it replaces the last one)."
            )
        out[users[-1]] = {**out[users[-1]], "content": text}
    return out


def parse_intervention(
    spec: str | Mapping[str, Any] | None,
    lm: HFLanguageModel,
    messages: Any = None,
    cache: dict[tuple[str, str], Mechanism] | None = None,
) -> InterventionSpec:
    """Parse an intervention spec for ``lm``: the one parser of the spec syntax (the CLI,
    study configs and the explorer all call it).

    :param spec: ``None`` or ``""`` (null intervention), a spec string, a path to a JSON or
        YAML file, or a mapping.
    :param messages: the factual prompt as chat messages, which ``system=`` and ``user=``
        edit (``None``: the prompt is text).
    :param cache: mechanisms already built, by ``(key, repr(value))``; the ones built here are
        added (the explorer keeps one, since a steering vector or a ROME edit takes seconds).
    :raises InterventionError: on an unknown key or a bad value.
    :raises RemoteCodeError: for a ``model`` folder that needs code of its own.

    >>> parse_intervention("system=", tiny_lm).intervention  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    pyro_lmscm.errors.InterventionError: system= edits a chat prompt, but the prompt is text; ...
    """
    from ..lm import is_messages

    as_lm(lm, owner="parse_intervention")
    data = spec if isinstance(spec, Mapping) else read_spec("" if spec is None else spec)
    result = InterventionSpec()
    edits = {key: data[key] for key in CHAT_KEYS if key in data}
    if edits:
        if PROMPT in data:
            raise InterventionError("give either prompt= or system= / user=, not both.")
        try:
            result.intervention[PROMPT] = lm.encode(_edited_messages(messages, edits))
        except InterventionError:
            raise
        except (LMSCMError, ValueError, TypeError) as error:
            items = ", ".join(f"{k}={v!r}" for k, v in edits.items())
            raise InterventionError(f"intervention {items}: {error}") from error
    for key, value in data.items():
        try:
            if key in CHAT_KEYS:
                continue
            if key in MECHANISM_KEYS:  # a mechanism named as its key, selected
                cache_key = (key, repr(value))
                if cache is not None and cache_key in cache:
                    result.mechanisms[key] = cache[cache_key]
                else:
                    result.mechanisms[key] = MECHANISM_KEYS[key](lm, value)
                    if cache is not None:
                        cache[cache_key] = result.mechanisms[key]
                result.intervention[MECHANISM] = key
            elif key == PROMPT:
                encoded = isinstance(value, str) or is_messages(value)
                result.intervention[PROMPT] = lm.encode(value) if encoded else value
            elif key == EXCLUDE_PREFIX:
                for step in _steps(value):
                    result.intervention[exclude_key(step)] = FACTUAL_TOKEN
            elif (parsed := parse_step_site(key)) is not None and parsed[0] in (TOKEN_PREFIX, EXCLUDE_PREFIX):
                factual = parsed[0] == EXCLUDE_PREFIX and value == FACTUAL_TOKEN  # unquoted; "factual" is text
                result.intervention[key] = FACTUAL_TOKEN if factual else _token(lm, key, value)
            else:
                raise InterventionError(
                    f"unknown intervention key {key!r}; use steer, mimic, rome, memit, finetune, model, prompt, "
                    "system, user, w_<t>, exclude or exclude_<t>."
                )
        except (InterventionError, RemoteCodeError):  # a refused model folder keeps its type
            raise
        except (LMSCMError, ValueError, TypeError) as error:
            raise InterventionError(f"intervention {key}={value!r}: {error}") from error
    return result
