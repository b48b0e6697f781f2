"""The one place where arguments are checked: integers, reals, token ids and seeds.

Every check raises the :class:`~pyro_lmscm.errors.LMSCMError` subclass its caller names
(``error=``), with the argument's name, its value and what was expected, so that bad input
never reaches torch as an ``OverflowError``, ``NotImplementedError`` or a 35 GB allocation.
Integers may be Python or NumPy integers (and 0-d integer tensors), never ``bool``.
"""

from __future__ import annotations

import functools
import json
import math
import numbers
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from .errors import InferenceError, LMSCMError, MechanismError

__all__ = [
    "MAX_THREADS", "as_bool", "as_entries", "as_int", "as_lm", "as_path", "as_real", "as_seed", "as_token_id",
    "has_integer_dtype", "is_integer", "is_real", "unique_keys",
]

#: The most torch CPU threads a setting may ask for: far above any machine's cores, and far
#: below the count at which libgomp's allocation aborts the process (``10**9``: 216 GB).
MAX_THREADS = 1024

#: torch's generators take seeds in ``[0, 2**64)``.
MAX_SEED = 2**64 - 1


def has_integer_dtype(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` holds integers: not floating, complex or ``bool``."""
    return not (tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool)


def is_integer(value: Any) -> bool:
    """Whether ``value`` is an integer scalar: ``int``, a NumPy integer or a 0-d or
    one-element integer tensor, and not ``bool``."""
    if isinstance(value, bool):
        return False
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and has_integer_dtype(value)
    if isinstance(value, numbers.Integral):
        return True
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency
        return False
    return isinstance(value, np.ndarray) and value.size == 1 and np.issubdtype(value.dtype, np.integer)


def as_int(
    value: Any,
    name: str,
    minimum: int | None = None,
    maximum: int | None = None,
    error: type[LMSCMError] = InferenceError,
    owner: str = "",
) -> int:
    """``value`` as a Python ``int`` in ``[minimum, maximum]``; ``owner`` (a class name)
    starts the message.

    :raises error: for a non-integer or a value out of range.

    >>> as_int(3, "num_samples", minimum=1)
    3
    """
    low = "" if minimum is None else f">= {minimum}"
    high = "" if maximum is None else f"<= {maximum}"
    bounds = " and ".join(part for part in (low, high) if part)
    expected = "a positive integer" if (minimum, maximum) == (1, None) else f"an integer {bounds}".rstrip()
    prefix = f"{owner}: " if owner else ""
    if not is_integer(value):
        raise error(f"{prefix}`{name}` must be {expected}, got {value!r:.80} ({type(value).__name__}).")
    number = int(value.item() if hasattr(value, "item") else value)
    if (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
        raise error(f"{prefix}`{name}` must be {expected}, got {number!r}.")
    return number


def is_real(value: Any) -> bool:
    """Whether ``value`` is a real number (a Python or NumPy int or float), not a ``bool``,
    which would count as 1."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def as_real(
    value: Any,
    name: str,
    minimum: float | None = None,
    exclusive: bool = False,
    error: type[LMSCMError] = InferenceError,
    owner: str = "",
) -> float:
    """``value`` as a finite ``float``, ``>= minimum`` (``> minimum`` if ``exclusive``).

    :raises error: for a non-number, NaN or infinity, or a value out of range.
    """
    expected = "a finite number" + ("" if minimum is None else f" {'>' if exclusive else '>='} {minimum:g}")
    prefix = f"{owner}: " if owner else ""
    if not is_real(value):
        raise error(f"{prefix}`{name}` must be {expected}, got {value!r:.80} ({type(value).__name__}).")
    number = float(value)
    below = minimum is not None and (number <= minimum if exclusive else number < minimum)
    if not math.isfinite(number) or below:
        raise error(f"{prefix}`{name}` must be {expected}, got {value!r}.")
    return number


def as_bool(value: Any, name: str, error: type[LMSCMError] = InferenceError, owner: str = "") -> bool:
    """``value`` if it is ``True`` or ``False`` (a NumPy bool too); never ``bool(value)``, for
    which ``"no"``, ``"false"`` and ``[0]`` are true.

    :raises error: naming ``name`` (after ``owner``, a class name), for anything else.
    """
    if isinstance(value, bool):
        return value
    import numpy as np  # (as in is_integer)

    if isinstance(value, np.bool_):  # np.True_
        return bool(value)
    prefix = f"{owner}: " if owner else ""
    raise error(f"{prefix}`{name}` must be True or False, got {value!r:.80}.")


def as_lm(value: Any, name: str = "lm", owner: str = "", error: type[LMSCMError] = MechanismError) -> Any:
    """``value`` if it is an :class:`~pyro_lmscm.lm.HFLanguageModel`, checked where it is
    passed rather than at its first use (an ``AttributeError`` deep inside).

    :raises error: naming ``name`` (after ``owner``), with a hint for a bare ``transformers``
        model, which ``HFLanguageModel(model, tokenizer)`` wraps.
    """
    from .lm import HFLanguageModel

    if isinstance(value, HFLanguageModel):
        return value
    prefix = f"{owner}: " if owner else ""
    hint = " (wrap it: HFLanguageModel(model, tokenizer))" if hasattr(value, "forward") else ""
    raise error(f"{prefix}`{name}` must be an HFLanguageModel{hint}, got {type(value).__name__}.")


def as_path(value: Any, what: str, error: type[LMSCMError]) -> Path:
    """``value`` (a ``str`` or an ``os.PathLike``) as a :class:`~pathlib.Path`.

    :param what: how the message names the argument, e.g. ``"corpus file"``.
    :raises error: naming ``what``, for anything else (``None``, a number, a list).
    """
    if isinstance(value, (str, os.PathLike)):
        return Path(value)
    raise error(f"{what} must be a path (a str or pathlib.Path), got {type(value).__name__} {value!r:.80}.")


def as_token_id(value: Any, vocab_size: int, what: str, error: type[LMSCMError]) -> int:
    """One token id in ``[0, vocab_size)``, from an integer or a one-element integer tensor.

    :raises error: naming ``what``, for anything else.
    """
    if not is_integer(value):
        raise error(f"{what}: expected one token id in [0, {vocab_size}), got {value!r:.80}.")
    token = int(value.item() if hasattr(value, "item") else value)
    if not 0 <= token < vocab_size:
        raise error(f"{what}: expected one token id in [0, {vocab_size}), got {token}.")
    return token


def as_entries(
    value: Any, name: str, owner: str, entry: str = "string", error: type[LMSCMError] = InferenceError
) -> list[Any]:
    """``value``, one entry per ``entry``, as a list: a sequence (not a ``str`` or ``bytes``,
    whose letters are no entries), or a tensor of at least two dims, one entry per row
    (prompts ``(S, L)``, logits ``(S, n, V)``).

    :raises error: naming ``owner`` and ``name``, for anything else (``None``, a number, one
        ``(L,)`` tensor, a string).
    """
    if isinstance(value, torch.Tensor) and value.dim() >= 2:
        return list(value)
    if isinstance(value, (str, bytes, torch.Tensor)) or not isinstance(value, Sequence):
        kind = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
        raise error(f"{owner}: `{name}` must be a sequence with one entry per {entry}, got {kind}.")
    return list(value)


def as_seed(seed: Any, error: type[LMSCMError] = InferenceError) -> int | None:
    """``None``, or a seed for ``torch.manual_seed`` in ``[0, 2**64)``."""
    if seed is None:
        return None
    return as_int(seed, "seed", minimum=0, maximum=MAX_SEED, error=error)


#: The most values (mappings, lists and scalars, repeats counted) a data file may stand for.
#: A YAML alias repeats a node without copying it, so a file of a few lines can stand for
#: billions of values (each settings hash would write them all out) or hold itself.
MAX_DATA_VALUES = 1_000_000


def unique_keys(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    """A JSON object's pairs as a dict, refusing a key given twice (``json`` keeps the last):
    the ``object_pairs_hook`` of every JSON file the package reads as data.

    :raises ValueError: naming the key.
    """
    out: dict[Any, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"the key {key!r} is given twice in one object")
        out[key] = value
    return out


@functools.lru_cache(maxsize=None)
def _yaml_loader() -> Any:
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the
    last); the keys a merge (``<<: *anchor``) brings may still be overridden."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            if isinstance(node, yaml.MappingNode):
                seen: set[Any] = set()
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue
                    key = self.construct_object(key_node, deep=True)
                    try:
                        repeated = key in seen
                    except TypeError:  # an unhashable key: refused by PyYAML itself
                        continue
                    if repeated:
                        raise yaml.constructor.ConstructorError(
                            "while constructing a mapping", node.start_mark,
                            f"the key {key!r} is given twice", key_node.start_mark,
                        )
                    seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def _within_size(data: Any, limit: int) -> bool:
    """Whether ``data`` holds at most ``limit`` values, counting a shared one each time it
    appears (a structure that holds itself never ends, and is over any limit)."""
    stack, count = [data], 0
    while stack:
        item = stack.pop()
        count += 1
        if count > limit:
            return False
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(item)
    return True


def load_data_file(path: Path, what: str, error: type[LMSCMError]) -> Any:
    """The parsed content of a JSON file (``.json``) or a YAML file (any other suffix), read
    safely (no YAML tags run code); every failure is an ``error`` naming ``what`` and the file.
    A key given twice in one mapping is refused (the parsers would keep the last silently),
    and so is content of more than :data:`MAX_DATA_VALUES` values once YAML aliases are
    expanded, or that holds itself.

    :param what: how the message names the file, e.g. ``"study config"``.
    """
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as failure:
        raise error(
            f"{what} {str(path)!r} is not UTF-8 text (byte {failure.start}: {failure.reason}); save it as UTF-8."
        ) from None
    except OSError as failure:
        raise error(f"{what} {str(path)!r} cannot be read: {failure.strerror or failure}.") from None
    kind = "JSON" if path.suffix == ".json" else "YAML"
    try:
        data = (json.loads(text, object_pairs_hook=unique_keys) if kind == "JSON"
                else yaml.load(text, Loader=_yaml_loader()))  # noqa: S506 - a SafeLoader
    except (ValueError, RecursionError, yaml.YAMLError) as failure:
        raise error(f"{what} {str(path)!r} is not valid {kind}: {failure}") from None
    if not _within_size(data, MAX_DATA_VALUES):
        raise error(
            f"{what} {str(path)!r} stands for more than {MAX_DATA_VALUES:,} values once its YAML aliases "
            "(*name) are expanded, or holds itself; write the values out."
        )
    return data
