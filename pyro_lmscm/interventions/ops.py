"""What an intervention on the SCM may say, and its translation to ``poutine.do`` data."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence, Union

import pyro.poutine as poutine
import torch

from ..errors import InterventionError, MechanismError, ObservationError
from ..models.exclude_tokens_messenger import ExcludeTokensMessenger
from ..models.sites import EXCLUDE_PREFIX, MECHANISM, PROMPT, TOKEN_PREFIX, exclude_key, parse_step_site, token_site
from ..validation import as_token_id

if TYPE_CHECKING:
    from ..models.scm import LanguageModelSCM

__all__ = [
    "FACTUAL_TOKEN",
    "Intervention",
    "InterventionValue",
    "TextOrIds",
    "as_do_data",
    "check_intervention",
    "excluded_tokens",
    "forced_tokens",
    "intervene",
]

#: A prompt given as text (encoded with :meth:`HFLanguageModel.encode`) or as token ids ``(L,)``.
TextOrIds = Union[str, torch.Tensor, Sequence[int]]

#: A value for one site: a mechanism name or index, prompt ids (or chat messages, encoded
#: with :meth:`HFLanguageModel.encode`), or a token id.
InterventionValue = Union[str, int, Sequence[int], torch.Tensor]
#: Site name -> value, e.g. ``{"mechanism": "steer"}``, ``{"prompt": ids}``, ``{"w_3": 42}``,
#: ``{"exclude_3": "factual"}`` (anything but the observed token at step 3; or a token id);
#: ``{}`` is the null intervention.
Intervention = Mapping[str, InterventionValue]

#: The value of ``exclude_<t>`` that names the observed token at step ``t``.
FACTUAL_TOKEN = "factual"


def as_do_data(
    scm: LanguageModelSCM, intervention: Intervention | None, observed: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Translate an :data:`Intervention` to tensors for :func:`intervene` (``poutine.do``
    data, plus ``exclude_<t>`` entries that :func:`intervene` turns into a handler).

    Keys may omit the SCM's name prefix; the returned keys carry it (:meth:`LanguageModelSCM.site`).

    :param observed: the observation ``(n,)``, which ``exclude_<t>="factual"`` refers to.
    :raises InterventionError: for an unknown site, a noise site, or a bad value.
    """
    if intervention is None:
        intervention = {}
    if not isinstance(intervention, Mapping):
        raise InterventionError(
            f"an intervention is a mapping from site names to values, e.g. {{'mechanism': 'steer'}} "
            f"or {{'w_3': 42}}; got {type(intervention).__name__} {intervention!r:.80}."
        )
    data: dict[str, torch.Tensor] = {}
    device = scm.lm.device
    for name, value in intervention.items():
        if not isinstance(name, str):
            raise InterventionError(f"intervention site names are strings, got {name!r}.")
        if scm.name and name.startswith(scm.site("")):
            name = name[len(scm.site("")) :]
        if name == MECHANISM:
            try:
                index = scm.mechanism_index(value.item() if isinstance(value, torch.Tensor) else value)  # type: ignore[arg-type]
            except MechanismError as error:
                raise InterventionError(f"do({name}={value!r}): {error}") from error
            data[name] = torch.tensor(index, device=device)
        elif name == PROMPT:
            from ..errors import TokenizationError

            # chat messages (a list of dicts): the conversation with the assistant's turn opened
            chat = isinstance(value, (list, tuple)) and bool(value) and isinstance(value[0], Mapping)
            try:
                ids = scm.lm.encode(value) if chat else value  # type: ignore[arg-type]
                data[name] = scm.check_prompt(torch.as_tensor(ids))
            except (ObservationError, TokenizationError) as error:
                raise InterventionError(f"do(prompt=...): {error}") from error
        else:
            parsed = parse_step_site(name)
            if parsed is None:
                raise InterventionError(
                    f"unknown site {name!r}; the SCM's sites are 'prompt', 'mechanism', "
                    "'u_<t>' and 'w_<t>' (and 'exclude_<t>' excludes a token at step t)."
                )
            kind, t = parsed
            if kind == "u":
                raise InterventionError(
                    f"do() on the noise site {name!r} is not an intervention on the model; to fix "
                    "noise, replay a trace (poutine.replay) instead."
                )
            if t >= scm.max_new_tokens:
                raise InterventionError(
                    f"site {name!r} does not exist: the SCM has steps 0..{scm.max_new_tokens - 1}."
                )
            if kind == EXCLUDE_PREFIX:
                token = _excluded(scm, name, t, value, observed)
                data[exclude_key(t)] = torch.tensor(token, device=device)
            else:
                token = as_token_id(value, scm.vocab_size, f"do({name}={value!r})", InterventionError)
                data[token_site(t)] = torch.tensor(token, device=device)
    both = {t for t in _step_values(data, TOKEN_PREFIX)} & {t for t in _step_values(data, EXCLUDE_PREFIX)}
    if both:
        t = min(both)
        raise InterventionError(f"step {t} is both forced (w_{t}) and excluded (exclude_{t}); give one.")
    return {scm.site(name): value for name, value in data.items()}


def check_intervention(scm: LanguageModelSCM, intervention: Intervention | None) -> None:
    """Check an intervention before its observation exists (it is sampled later): as
    :func:`as_do_data` against a stand-in observation of ``T`` tokens, so that
    ``exclude_<t>="factual"`` is checked for everything but the token it will name.

    :raises InterventionError: as :func:`as_do_data`.
    """
    as_do_data(scm, intervention, torch.zeros(scm.max_new_tokens, dtype=torch.long))


def _excluded(scm: LanguageModelSCM, name: str, t: int, value: Any, observed: torch.Tensor | None) -> int:
    """The token that ``exclude_<t>=value`` excludes."""
    if isinstance(value, str) and value == FACTUAL_TOKEN:
        if observed is None:
            raise InterventionError(
                f"{name}='factual' refers to the observed token at step {t}, but there is no observation here; "
                "pass a token id instead."
            )
        if t >= observed.shape[-1]:
            raise InterventionError(
                f"{name}='factual': the observation has {observed.shape[-1]} tokens, so step {t} has no factual token."
            )
        return int(observed[..., t].reshape(-1)[0])
    return as_token_id(value, scm.vocab_size, f"{name}={value!r} (a token id or 'factual')", InterventionError)


def _step_values(data: Mapping[str, torch.Tensor], kind: str, prefix: str = "") -> dict[int, int]:
    values = {}
    for name, value in data.items():
        parsed = parse_step_site(name[len(prefix) :] if name.startswith(prefix) else name)
        if parsed is not None and parsed[0] == kind:
            values[parsed[1]] = int(value)
    return values


def forced_tokens(scm: LanguageModelSCM, data: Mapping[str, torch.Tensor]) -> dict[int, int]:
    """The steps that ``poutine.do`` data (from :func:`as_do_data`) forces, ``{t: token}``."""
    return _step_values(data, TOKEN_PREFIX, scm.site(""))


def excluded_tokens(scm: LanguageModelSCM, data: Mapping[str, torch.Tensor]) -> dict[int, int]:
    """The tokens that data from :func:`as_do_data` excludes, ``{t: token}``."""
    return _step_values(data, EXCLUDE_PREFIX, scm.site(""))


def intervene(scm: LanguageModelSCM, data: Mapping[str, torch.Tensor]) -> Callable[..., Any]:
    """``scm.model`` under the intervention ``data`` (from :func:`as_do_data`):
    ``poutine.do`` on its sites, inside :class:`~pyro_lmscm.models.ExcludeTokensMessenger`
    for its ``exclude_<t>`` entries."""
    excluded = excluded_tokens(scm, data)
    exclude_keys = {scm.site(exclude_key(t)) for t in excluded}
    sites = {name: value for name, value in data.items() if name not in exclude_keys}
    model = poutine.do(scm.model, data=sites)  # type: ignore[arg-type]  # tensors are values
    return ExcludeTokensMessenger(scm, excluded)(model) if excluded else model
