"""The checks of policy settings, written once for both readers of a bad value.

Each policy's settings are one dataclass beside the policy (`FastVSettings`, `ToMeSettings`, ...) holding its
defaults; its `__post_init__` checks every field with the functions below, so the policy's constructor and the
start-up check of a config (`dyvte.configs`) refuse the same values. A bad value raises `SettingError`: a Python
caller reads it naming the method (`ToMe: r = 0.7 is outside [0, 0.5]: ...`), and a config check words it by the
key the user typed (`tome.r=0.7: must be in [0.0, 0.5]`, from `name`, `value` and `expected`).
"""

import itertools
from numbers import Integral, Real

SHARE = "it is a share of each sample's visual tokens, and no method can keep more visual tokens than the image has"


class SettingError(ValueError):
    """A policy setting that cannot work. `str()`: the message for a Python caller, naming the method; `name` (the
    setting), `value` and `expected` (what it may be) say it in a config's words."""

    def __init__(self, message: str, name: str, value, expected: str):
        super().__init__(message)
        self.name, self.value, self.expected = name, value, expected


def _is_integer(value) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _interval(low: float, high: float, low_open: bool, config: bool) -> str:
    """`[0, 1]` for a Python caller, `[0.0, 1.0]` in a config's words (as the config checks always wrote it)."""
    low, high = (float(low), float(high)) if config else (f"{low:g}", f"{high:g}")
    return f"{'(' if low_open else '['}{low}, {high}]"


def check_share(method: str, name: str, value, low_open: bool = False, high: float = 1.0, why: str = SHARE,
                optional: bool = False) -> None:
    """`value` is a share in [0, `high`] (`(0, high]` with `low_open`; None too with `optional`)."""
    if value is None and optional:
        return
    if not _is_number(value):
        raise SettingError(f"{method}: {name} must be a number, got {value!r}.", name, value,
                           "must be a number" + (" (or null)" if optional else ""))
    if not (0.0 < value if low_open else 0.0 <= value) or value > high:
        raise SettingError(f"{method}: {name} = {value} is outside {_interval(0, high, low_open, False)}: {why}.",
                           name, value, f"must be in {_interval(0, high, low_open, True)}")


def check_shares(method: str, name: str, values, why: str = SHARE) -> None:
    """`values` is a non-empty list of shares in [0, 1], one per pruning layer."""
    expected = "must be a non-empty list of shares in [0, 1], one per pruning layer"
    if not isinstance(values, (list, tuple)) or not values:
        raise SettingError(f"{method}: {name} must be a non-empty list of shares, got {values!r}.", name, values,
                           expected)
    for value in values:
        try:
            check_share(method, name, value, why=why)
        except SettingError as error:
            raise SettingError(str(error), name, values, expected) from None


def check_number(method: str, name: str, value, low: float, high: float = float("inf"), low_open: bool = False,
                 optional: bool = False, why: str = "") -> None:
    """`value` is a number in [low, high] (`(low, high]` with `low_open`; None too with `optional`)."""
    if value is None and optional:
        return
    because = f" ({why})" if why else ""
    if not _is_number(value):
        raise SettingError(f"{method}: {name} must be a number, got {value!r}{because}.", name, value,
                           "must be a number" + (" (or null)" if optional else ""))
    if not (low < value if low_open else low <= value) or value > high:
        bound = (f"must be {'>' if low_open else '>='} {low:g}" if high == float("inf")
                 else f"must be in {_interval(low, high, low_open, False)}")
        raise SettingError(f"{method}: {name} {bound}, got {value}{because}.", name, value,
                           f"must be in {_interval(low, high, low_open, True)}")


def check_integer(method: str, name: str, value, minimum: int, maximum: int | None = None, optional: bool = False,
                  why: str = "") -> None:
    """`value` is an integer >= `minimum` (and <= `maximum`; None too with `optional`)."""
    if value is None and optional:
        return
    bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
    expected = f"must be an integer {bound}" + (" (or null)" if optional else "")
    if not _is_integer(value):
        raise SettingError(f"{method}: {name} must be an integer, got {value!r}.", name, value, expected)
    if value < minimum or (maximum is not None and value > maximum):
        because = f" ({why})" if why else ""
        raise SettingError(f"{method}: {name} must be {bound}, got {value}{because}.", name, value, expected)


def check_layers(method: str, name: str, layers, minimum: int, expected: str) -> None:
    """`layers` is None (the method's own default layers) or an increasing list of integer layers >= `minimum`;
    `expected` is the rule in a config's words."""
    if layers is None:
        return
    integers = isinstance(layers, (list, tuple)) and all(_is_integer(layer) for layer in layers)
    if not integers or not layers or layers[0] < minimum or not all(a < b for a, b in itertools.pairwise(layers)):
        raise SettingError(f"{method}: {name} {layers} must be increasing layers >= {minimum}.", name, layers,
                           expected)


def check_choice(method: str, name: str, value, choices: tuple) -> None:
    """`value` is one of `choices`."""
    if value not in choices:
        listed = ", ".join("null" if choice is None else str(choice) for choice in choices)
        raise SettingError(f"{method}: {name} must be one of {listed}; got {value!r}.", name, value,
                           f"must be one of {listed}")


def check_flag(method: str, name: str, value) -> None:
    """`value` is True or False."""
    if not isinstance(value, bool):
        raise SettingError(f"{method}: {name} must be True or False; got {value!r}.", name, value,
                           "must be one of True, False")
