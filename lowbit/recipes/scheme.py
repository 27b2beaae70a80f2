"""Fixed scheme strings: "W4A16-g128", "W3A16-g64-asym", "W4A8-tender" -> one method config for every layer.

    W<bits>[A<act>[-<act method>]][-g<group>|-row][-sym|-asym][-G<groups>][-c<chunk>|-static]

`W` is the weight bit width, `g<group>` the group size (`row`: one group per row; default 128),
`sym`/`asym` the grid (default sym). `A16` (or no A) keeps activations in float; `A8`/`A4` quantizes
them at run time by the act method (default tender; formats/activation.py lists the others), with
Tender's `G` groups (default 8) and TMax per `c` rows (default 1: per row; `static`: the calibrated TMax).
`fields` gives those for any method's config; `parse` makes the RTN config. `MethodConfig.scheme`
("W4-g128-sym", "W4A8-tender-g128-sym-G8-c1") parses back.
"""

import re

from ..errors import LowbitError
from ..formats.activation import METHODS as ACT_METHODS
from ..methods import RTN

_SCHEME = re.compile(r"W(?P<bits>\d+)(?:A(?P<act>\d+)(?:-(?P<method>" + "|".join(map(re.escape, ACT_METHODS)) + r"))?)?"
                     r"(?:-(?:g(?P<group>\d+)|(?P<row>row)))?(?:-(?P<grid>sym|asym))?"
                     r"(?:-G(?P<groups>\d+))?(?:-(?:c(?P<chunk>\d+)|(?P<static>static)))?")
FORM = "W<bits>[A<act>[-<act method>]][-g<group>|-row][-sym|-asym][-G<groups>][-c<chunk>|-static]"


def fields(scheme: str) -> dict:
    """{"bits", "group_size", "sym"} of a scheme string, and the act_* fields when it quantizes activations."""
    m = _SCHEME.fullmatch(scheme.strip())
    if m is None:
        raise LowbitError(f"scheme '{scheme}' is not of the form {FORM} (e.g. W4A16-g128, W3A16-g64-asym, W4A8-tender)")
    group = -1 if m["row"] else int(m["group"] or 128)
    out = {"bits": int(m["bits"]), "group_size": group, "sym": m["grid"] != "asym"}
    act = int(m["act"] or 16)
    if act == 16:
        if m["method"] or m["groups"] or m["chunk"] or m["static"]:
            raise LowbitError(f"scheme '{scheme}': A16 keeps activations in float, so it takes no activation method, G or chunk")
        return out
    acts = {"act_bits": act, "act_method": m["method"] or "tender"}
    if (m["groups"] or m["chunk"] or m["static"]) and acts["act_method"] != "tender":
        raise LowbitError(f"scheme '{scheme}': G and the chunk are Tender's settings, not {acts['act_method']}'s")
    if m["groups"]:
        acts["act_groups"] = int(m["groups"])
    if m["chunk"] or m["static"]:
        acts["act_chunk"] = 0 if m["static"] else int(m["chunk"])
    return {**out, **acts}


def parse(scheme: str) -> RTN:
    return RTN(**fields(scheme))
