"""What an intervention on the SCM may say, and its translation to ``poutine.do`` data."""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence, Union

import torch

from ..errors import InterventionError, MechanismError, ObservationError
from ..models.sites import MECHANISM, PROMPT, parse_step_site, token_site
from ..validation import as_token_id

if TYPE_CHECKING:
    from ..models.scm import LanguageModelSCM

__all__ = ["Intervention", "InterventionValue", "TextOrIds", "as_do_data", "forced_tokens"]

#: A prompt given as text (encoded with :meth:`HFLanguageModel.encode`) or as token ids ``(L,)``.
TextOrIds = Union[str, torch.Tensor, Sequence[int]]

#: A value for one site: a mechanism name or index, prompt ids, or a token id.
InterventionValue = Union[str, int, Sequence[int], torch.Tensor]
#: Site name -> value, e.g. ``{"mechanism": "steer"}``, ``{"prompt": ids}``, ``{"w_3": 42}``;
#: ``{}`` is the null intervention.
Intervention = Mapping[str, InterventionValue]


def as_do_data(scm: LanguageModelSCM, intervention: Intervention | None) -> dict[str, torch.Tensor]:
    """Translate an :data:`Intervention` to tensors for ``poutine.do(scm.model, data=...)``.

    Keys may omit the SCM's name prefix; the returned keys carry it (:meth:`LanguageModelSCM.site`).

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
            try:
                data[name] = scm.check_prompt(torch.as_tensor(value))
            except ObservationError as error:
                raise InterventionError(f"do(prompt=...): {error}") from error
        else:
            parsed = parse_step_site(name)
            if parsed is None:
                raise InterventionError(
                    f"unknown site {name!r}; the SCM's sites are 'prompt', 'mechanism', "
                    "'u_<t>' and 'w_<t>'."
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
            token = as_token_id(value, scm.vocab_size, f"do({name}={value!r})", InterventionError)
            data[token_site(t)] = torch.tensor(token, device=device)
    return {scm.site(name): value for name, value in data.items()}


def forced_tokens(scm: LanguageModelSCM, data: Mapping[str, torch.Tensor]) -> dict[int, int]:
    """The steps that ``poutine.do`` data (from :func:`as_do_data`) forces, ``{t: token}``."""
    forced = {}
    for name, value in data.items():
        parsed = parse_step_site(name[len(scm.site("")) :] if scm.name else name)
        if parsed is not None and parsed[0] == "w":
            forced[parsed[1]] = int(value)
    return forced
