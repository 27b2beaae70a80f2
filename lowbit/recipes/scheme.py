"""Fixed scheme strings: "W4A16-g128", "W3A16-g64-asym", "W2-row" -> one method config for every layer.

    W<bits>[A16][-g<group>|-row][-sym|-asym]      (defaults: group 128, symmetric)

`W` is the weight bit width, `A16` says activations stay in 16/32-bit float (the only kind so far),
`g<group>` the group size (`row`: one group per row), `sym`/`asym` the grid. `fields` gives those
three for any method's config; `parse` makes the RTN config. `MethodConfig.scheme` ("W4-g128-sym")
parses back.
"""

import re

from ..errors import LowbitError
from ..methods import RTN

_SCHEME = re.compile(r"W(?P<bits>\d+)(?:A(?P<act>\d+))?(?:-(?:g(?P<group>\d+)|(?P<row>row)))?"
                     r"(?:-(?P<grid>sym|asym))?")


def fields(scheme: str) -> dict:
    """{"bits", "group_size", "sym"} of a scheme string."""
    m = _SCHEME.fullmatch(scheme.strip())
    if m is None:
        raise LowbitError(f"scheme '{scheme}' is not of the form W<bits>[A16][-g<group>|-row][-sym|-asym] "
                          "(e.g. W4A16-g128, W3A16-g64-asym)")
    if m["act"] not in (None, "16"):
        raise LowbitError(f"scheme '{scheme}': activation quantization (A{m['act']}) is not supported yet; "
                          "use A16 (float activations)")
    group = -1 if m["row"] else int(m["group"] or 128)
    return {"bits": int(m["bits"]), "group_size": group, "sym": m["grid"] != "asym"}


def parse(scheme: str) -> RTN:
    return RTN(**fields(scheme))
