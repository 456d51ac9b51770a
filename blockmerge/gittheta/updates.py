"""git-theta's incremental update types applied to the previous value of a parameter, as its checkout does.

A parameter stored as an update holds only the change from its value at the commit its metadata names
(`last_commit`): `low-rank` R @ C (a vector: the difference itself), `sparse` a one-row CSR matrix of the
flattened difference, `ia3` a factor broadcast over the previous value. The arithmetic is git-theta 0.2.0's
(numpy, in the stored arrays' dtypes), so a value read here has the bits git-theta's checkout writes; the result
is kept in the parameter's own dtype (IA³'s float64 factor would otherwise widen it).
"""

from __future__ import annotations

import numpy as np

from ..errors import BlockmergeError

INCREMENTAL = ("low-rank", "sparse", "ia3")


def apply_update(update_type: str, parts: dict[str, np.ndarray], previous: np.ndarray, label: str,
                 name: str) -> np.ndarray:
    """The new value of a parameter from its stored update and its previous value."""
    try:
        if update_type == "low-rank":
            new = parts["R"] @ parts["C"] + previous if "R" in parts else parts["parameter"] + previous
        elif update_type == "sparse":
            flat = np.zeros(int(np.prod(parts["shape"])), dtype=parts["data"].dtype)
            row = slice(int(parts["indptr"][0]), int(parts["indptr"][1]))
            np.add.at(flat, parts["indices"][row], parts["data"][row])
            new = flat.reshape(tuple(int(d) for d in parts["shape"])) + previous
        elif update_type == "ia3":
            new = previous * parts["ia3"]
        else:
            raise BlockmergeError(f"git-theta update type {update_type!r} is not supported (dense, "
                                  f"{', '.join(INCREMENTAL)} are)", path=label, param=name)
    except (KeyError, ValueError, IndexError) as err:
        raise BlockmergeError(f"git-theta {update_type} update does not apply to the previous value "
                              f"({type(err).__name__}: {err})", path=label, param=name) from None
    if new.shape != previous.shape:
        raise BlockmergeError(f"git-theta {update_type} update gives shape {list(new.shape)}, the previous value "
                              f"has {list(previous.shape)}", path=label, param=name)
    return new.astype(previous.dtype, copy=False)
