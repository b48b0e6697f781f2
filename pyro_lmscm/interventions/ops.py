"""What an intervention on the SCM may say, and its translation to ``poutine.do`` data."""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Sequence, Union

import pyro.poutine as poutine
import torch
from pyro.poutine.messenger import Messenger

from ..errors import InterventionError, MechanismError, ObservationError
from ..models.exclude_tokens_messenger import ExcludeTokensMessenger
from ..models.sites import EXCLUDE_PREFIX, MECHANISM, PROMPT, TOKEN_PREFIX, exclude_key, parse_step_site, token_site
from ..validation import as_token_id, is_integer

if TYPE_CHECKING:
    from ..models.scm import LanguageModelSCM

__all__ = [
    "FACTUAL_TOKEN",
    "Action",
    "Intervention",
    "InterventionValue",
    "TextOrIds",
    "as_do_data",
    "check_intervention",
    "excluded_tokens",
    "forced_tokens",
    "intervene",
    "world",
]

#: A prompt given as text (encoded with :meth:`HFLanguageModel.encode`) or as token ids ``(L,)``.
TextOrIds = Union[str, torch.Tensor, Sequence[int]]

#: A value for one site: a mechanism name or index, prompt ids (or chat messages, encoded
#: with :meth:`HFLanguageModel.encode`), or a token id.
InterventionValue = Union[str, int, Sequence[int], torch.Tensor]
#: Site name -> value, e.g. ``{"mechanism": "steer"}``, ``{"prompt": ids}``, ``{"w_3": 42}``,
#: ``{"exclude_3": "factual"}`` (anything but the observed token at step 3; or a token id);
#: ``{}`` is the null intervention. Or a Pyro ``Messenger`` that acts on the intervened world
#: (e.g. on the effectful ``step_decoded``), or a list mixing mappings and Messengers.
Intervention = Union[
    Mapping[str, InterventionValue], Messenger, Sequence[Union[Mapping[str, InterventionValue], Messenger]]
]


class Action(dict):
    r"""An intervention, translated (Pearl's *action*): the ``poutine.do`` data on the SCM's
    sites (site name -> tensor, plus ``exclude_<t>`` entries) and the user's own
    :class:`~pyro.poutine.messenger.Messenger` instances, in order.

    It is a ``dict`` of the data, so it goes wherever ``poutine.do`` data goes; the
    Messengers ride along in :attr:`messengers`. :func:`world` enters the handlers of the
    intervened world (the exclusions and the Messengers) around a decoding run or a
    teacher-forced pass alike; the factual world never sees them.

    :ivar messengers: the user's Messengers, applied innermost-last in this order.
    """

    def __init__(self, data: Mapping[str, torch.Tensor] | None = None, messengers: Iterable[Messenger] = ()) -> None:
        super().__init__(data or {})
        self.messengers: tuple[Messenger, ...] = tuple(messengers)

    def same(self, other: Mapping[str, torch.Tensor]) -> bool:
        """The same data (tensors equal) and the very same Messenger instances."""
        return (
            self.keys() == other.keys()
            and all(torch.equal(self[key], other[key]) for key in self)
            and self.messengers == getattr(other, "messengers", ())
        )

    def __repr__(self) -> str:
        extra = f", messengers={list(self.messengers)!r}" if self.messengers else ""
        return f"Action({dict(self)!r}{extra})"


def _parts(intervention: Any) -> tuple[list[Mapping[str, Any]], list[Messenger]]:
    """The mappings and the Messengers of an :data:`Intervention`, in order."""
    if intervention is None:
        return [], []
    if isinstance(intervention, Messenger):
        return [], [intervention]
    if isinstance(intervention, Mapping):
        return [intervention], list(getattr(intervention, "messengers", ()))
    if isinstance(intervention, (list, tuple)):
        mappings: list[Mapping[str, Any]] = []
        messengers: list[Messenger] = []
        for i, part in enumerate(intervention):
            if isinstance(part, Messenger):
                messengers.append(part)
            elif isinstance(part, Mapping):
                mappings.append(part)
                messengers.extend(getattr(part, "messengers", ()))
            else:
                raise InterventionError(
                    f"intervention[{i}] must be a mapping of sites to values or a Pyro Messenger, "
                    f"got {type(part).__name__} {part!r:.80}."
                )
        if len(set(map(id, messengers))) != len(messengers):
            raise InterventionError("the same Messenger instance is given twice in one intervention.")
        return mappings, messengers
    raise InterventionError(
        f"an intervention is a mapping from site names to values, e.g. {{'mechanism': 'steer'}} "
        f"or {{'w_3': 42}}, a Pyro Messenger, or a list of those; got {type(intervention).__name__} "
        f"{intervention!r:.80}."
    )

#: The value of ``exclude_<t>`` that names the observed token at step ``t``.
FACTUAL_TOKEN = "factual"


def as_do_data(
    scm: LanguageModelSCM, intervention: Intervention | None, observed: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Translate an :data:`Intervention` to tensors for :func:`intervene` (``poutine.do``
    data, plus ``exclude_<t>`` entries that :func:`intervene` turns into a handler).

    Keys may omit the SCM's name prefix; the returned keys carry it (:meth:`LanguageModelSCM.site`).

    :param observed: the observation ``(n,)``, which ``exclude_<t>="factual"`` refers to.
    :returns: an :class:`Action`: the data, and the intervention's Messengers.
    :raises InterventionError: for an unknown site, a noise site, a bad value, a site given
        twice, or a part that is neither a mapping nor a Messenger.
    """
    mappings, messengers = _parts(intervention)
    items: list[tuple[Any, Any]] = [item for mapping in mappings for item in mapping.items()]
    data: dict[str, torch.Tensor] = {}
    device = scm.lm.device
    for name, value in items:
        if not isinstance(name, str):
            raise InterventionError(f"intervention site names are strings, got {name!r}.")
        if scm.name and name.startswith(scm.site("")):
            name = name[len(scm.site("")) :]
        if name == MECHANISM:
            if isinstance(value, torch.Tensor) or (is_integer(value) and not isinstance(value, int)):
                if not is_integer(value):  # a tensor of several values, or of floats
                    raise InterventionError(
                        f"do({name}=...): give a mechanism name or one integer index, got {value!r:.80}."
                    )
                value = int(value.item())  # a one-element integer tensor or a NumPy integer
            try:
                index = scm.mechanism_index(value)
            except MechanismError as error:
                raise InterventionError(f"do({name}={value!r}): {error}") from error
            data[name] = torch.tensor(index, device=device)
        elif name == PROMPT:
            from ..errors import TokenizationError

            # chat messages (a list of dicts): the conversation with the assistant's turn opened
            chat = isinstance(value, (list, tuple)) and bool(value) and isinstance(value[0], Mapping)
            try:
                ids = scm.lm.encode(value) if chat else value  # type: ignore[arg-type]
                data[name] = scm.check_prompt(ids, single=True)  # one string (L,); a str is refused, naming `prompt`
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
    if len(items) != len(data):
        raise InterventionError("a site is given twice across the parts of the intervention; give each once.")
    both = {t for t in _step_values(data, TOKEN_PREFIX)} & {t for t in _step_values(data, EXCLUDE_PREFIX)}
    if both:
        t = min(both)
        raise InterventionError(f"step {t} is both forced (w_{t}) and excluded (exclude_{t}); give one.")
    return Action({scm.site(name): value for name, value in data.items()}, messengers)



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


@contextmanager
def world(scm: LanguageModelSCM, data: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """The handlers of the intervened world of ``data`` (an :class:`Action` from
    :func:`as_do_data`), entered for the scope: an
    :class:`~pyro_lmscm.models.ExcludeTokensMessenger` for its ``exclude_<t>`` entries
    (outermost), then the intervention's Messengers in order. The decoding run of
    :func:`intervene` and every teacher-forced pass of the intervened world (exact
    probabilities, the scorer, beam search) run inside it, so each handler acts the same on
    all of them. The site data (``poutine.do``) is not entered here: a decoding run reads it
    at the sites, a teacher-forced pass from :func:`world_inputs`.

    :raises InterventionError: for a Messenger of the intervention that is active already
        (entered around the call: it would act on the factual world too, and Pyro cannot
        install one instance twice).
    """
    excluded = excluded_tokens(scm, data)
    with ExitStack() as stack:
        if excluded:
            stack.enter_context(ExcludeTokensMessenger(scm, excluded))
        for messenger in getattr(data, "messengers", ()):
            try:
                stack.enter_context(messenger)
            except ValueError as error:  # Pyro's refusal to install one instance twice (its stack is private)
                if "twice" not in str(error):
                    raise
                raise InterventionError(
                    f"the intervention's Messenger {messenger!r:.80} is active already (entered around this call), "
                    "so it would act on the factual world too; pass it as the intervention only (it acts on the "
                    "intervened world), or enter it around the call only (it acts on both worlds)."
                ) from None
        yield


def world_inputs(
    scm: LanguageModelSCM, data: Mapping[str, torch.Tensor], prompt: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """The prompt and the mechanism index that the intervened world of ``data`` runs on,
    given the factual ``prompt``: what ``poutine.do`` makes the sites ``prompt`` and
    ``mechanism`` of :meth:`~pyro_lmscm.models.LanguageModelSCM.model` evaluate to."""
    return data.get(scm.site(PROMPT), prompt), int(data.get(scm.site(MECHANISM), torch.tensor(0)))


def intervene(scm: LanguageModelSCM, data: Mapping[str, torch.Tensor]) -> Callable[..., Any]:
    """``scm.model`` under the intervention ``data`` (from :func:`as_do_data`):
    ``poutine.do`` on its sites, inside :func:`world` (its exclusions and Messengers)."""
    exclude_keys = {scm.site(exclude_key(t)) for t in excluded_tokens(scm, data)}
    sites = {name: value for name, value in data.items() if name not in exclude_keys}
    model = poutine.do(scm.model, data=sites)  # type: ignore[arg-type]  # tensors are values

    def intervened(*args: Any, **kwargs: Any) -> Any:
        with world(scm, data):
            return model(*args, **kwargs)

    return intervened
