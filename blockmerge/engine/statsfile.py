"""Statistics written as one `.safetensors` file per kind: parameter names as keys, provenance in the header
(`sources.open_statistics_file` reads them).

Unlike a store (a directory), such a file can be tracked with `git theta track` next to its model, so a
merge names the statistics at the same revision as the model. The kind is recorded in the header
(`blockmerge_statistic`); a file without one is named after its kind (`fisher.safetensors`).
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import BlockmergeError
from .output import Output, check_output, parents_made
from .safetensors_io import SafetensorsWriter
from .sources import KIND_KEY
from .store import StoreReader


def write_statistics_file(store: Path, out: Path, *, overwrite: bool = False) -> Path:
    """Copy the one statistic kind of a store into a `.safetensors` file (atomically), its metadata in the header."""
    kinds = sorted(StoreReader(store).kinds() - {"param"})
    if len(kinds) != 1:
        raise BlockmergeError(f"a .safetensors statistics file holds one kind, this computation gave "
                              f"{', '.join(kinds) or 'none'} (write a store: --out DIR)", path=out)
    reader = StoreReader(store, kinds[0])
    header = {"format": "pt", KIND_KEY: kinds[0], "blockmerge": json.dumps(reader.metadata, sort_keys=True)}
    specs = {name: entry.spec for name, entry in reader.entries.items()}
    output = Output(out, {"statistics_file": uuid.uuid4().hex}, resume=False, overwrite=overwrite,
                    format="safetensors")
    try:
        writer = SafetensorsWriter(output.payload, specs, header)
        for name, spec in sorted(specs.items()):
            writer.write(name, 0, reader.read(name, 0, spec.rows))
        writer.close()
        output.commit()
    except BaseException:
        output.abort()
        raise
    return output.out


@contextmanager
def statistics_output(out: str, *, overwrite: bool = False, inputs: Iterable[str | os.PathLike] = ()
                      ) -> Iterator[str]:
    """Where a statistics computation writes its store: `out` itself, or for a `.safetensors` out a temporary
    store converted into that file when the computation succeeds. A `.safetensors` out is checked against
    `inputs` (and what is there) before the computation starts."""
    if not out.endswith(".safetensors"):
        yield out
        return
    target = check_output(out, format="safetensors", overwrite=overwrite, inputs=inputs)
    with parents_made(target.parent), tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.") as tmp:
        store = Path(tmp) / "statistics"
        yield str(store)
        write_statistics_file(store, target, overwrite=overwrite)
