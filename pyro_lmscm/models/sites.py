"""Names of the sample sites of :class:`~pyro_lmscm.models.LanguageModelSCM`.

The site structure is fixed so that Pyro's handlers (``do``, ``condition``, ``replay``)
and ChiRho's can address every variable of the SCM by name:

* ``"prompt"`` -- the prompt token ids;
* ``"mechanism"`` -- the index of the causal mechanism that computes the logits;
* ``"u_{t}"`` -- the exogenous Gumbel noise of step ``t`` (a vector over the vocabulary);
* ``"w_{t}"`` -- the token emitted at step ``t``.

Intervention mappings may also hold ``"exclude_{t}"``, which is not a site: "anything but
this token at step ``t``" (:class:`~pyro_lmscm.models.ExcludeTokensMessenger`).

Always build step names with :func:`noise_site`, :func:`token_site` and :func:`exclude_key`.
"""

from __future__ import annotations

import re

from ..errors import InterventionError

__all__ = [
    "EXCLUDE_PREFIX",
    "MECHANISM",
    "PROMPT",
    "exclude_key",
    "noise_site",
    "parse_step_site",
    "token_site",
]

PROMPT = "prompt"
MECHANISM = "mechanism"
NOISE_PREFIX = "u"
TOKEN_PREFIX = "w"
EXCLUDE_PREFIX = "exclude"

# canonical names only: ASCII digits, no leading zeros ("w_3", never "w_03", "w_3\n" or "w_٣")
_STEP_SITE = re.compile(rf"({NOISE_PREFIX}|{TOKEN_PREFIX}|{EXCLUDE_PREFIX})_(0|[1-9][0-9]*)", re.ASCII)
# what reads as a step site to a person: a non-canonical spelling of one is an error, not
# another site
_LOOSE_STEP_SITE = re.compile(rf"\s*({NOISE_PREFIX}|{TOKEN_PREFIX}|{EXCLUDE_PREFIX})_\s*(\d+)\s*")


def noise_site(t: int) -> str:
    """Name of the Gumbel noise site of step ``t``, e.g. ``"u_3"``."""
    return f"{NOISE_PREFIX}_{t}"


def token_site(t: int) -> str:
    """Name of the token site of step ``t``, e.g. ``"w_3"``."""
    return f"{TOKEN_PREFIX}_{t}"


def exclude_key(t: int) -> str:
    """The intervention key that excludes a token at step ``t``, e.g. ``"exclude_3"``."""
    return f"{EXCLUDE_PREFIX}_{t}"


def parse_step_site(name: str) -> tuple[str, int] | None:
    """Split a canonical step site name into its prefix and step.

    Only the names that :func:`noise_site` and :func:`token_site` build are step sites.

    :returns: ``("u", t)``, ``("w", t)`` or ``("exclude", t)`` (the intervention key of
        :func:`exclude_key`), or ``None`` if ``name`` is none of them.
    :raises InterventionError: for a non-canonical spelling of a step site (``"w_03"``,
        ``"w_3\\n"``, ``"w_٣"``), which would otherwise match no site and be ignored.

    >>> parse_step_site("w_3"), parse_step_site("prompt")
    (('w', 3), None)
    """
    if not isinstance(name, str):
        return None
    match = _STEP_SITE.fullmatch(name)
    if match is not None:
        return match.group(1), int(match.group(2))
    loose = _LOOSE_STEP_SITE.fullmatch(name)
    if loose is not None:
        canonical = f"{loose.group(1)}_{int(loose.group(2))}"
        raise InterventionError(
            f"site name {name!r} is not canonical: step sites are written {canonical!r} "
            "(ASCII digits, no leading zeros, no spaces)."
        )
    return None
