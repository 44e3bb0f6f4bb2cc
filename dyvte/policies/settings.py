"""Checks of policy settings: each names the method, the setting, its value and what it may be."""


def check_share(method: str, name: str, value: float, low_open: bool = False) -> None:
    if not (0.0 < value if low_open else 0.0 <= value) or value > 1.0:
        bracket = "(" if low_open else "["
        raise ValueError(
            f"{method}: {name} = {value} is outside {bracket}0, 1]: it is a share of each sample's visual tokens, "
            "and no method can keep more visual tokens than the image has."
        )


def check_layer(method: str, layer: int, first: int = 1) -> None:
    if layer < first:
        raise ValueError(f"{method}: layer must be >= {first}, got {layer}.")
