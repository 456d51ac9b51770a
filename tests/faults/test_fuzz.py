"""Fuzzing the readers and treating tensor names as data.

(a) The safetensors reader on arbitrary bytes and on mutated valid files (bytes flipped, inserted, deleted,
    overwritten, cut; header fields replaced): it reads exactly what `safetensors.torch.load_file` reads, or
    it raises BlockmergeError (one line) — never another exception, never a hang. Where blockmerge accepts a
    file `load_file` refuses (blockmerge allows gaps between tensors and trailing bytes), what it reads must be
    the bytes the header points at.
(b) The store manifest reader on mutated manifests: BlockmergeError, or entries whose array paths are all
    exactly `arrays/NNNNNN` (six ASCII digits, nothing before or after).
(c) Tensor names as data: models whose tensor names look like paths (`../../x`, `/abs/path`, `a/../../b`),
    unicode, control characters, very long names, merged into every output format: outputs land only inside
    OUT (filesystem snapshot) and read back with the same names and values through blockmerge and safetensors.

tests/test_bad_input.py fuzzes hand-built headers through the API; these go through the reader on raw bytes.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from faultkit import (
    Scenario,
    changed,
    count,
    fault_figures,  # noqa: F401  (session fixture: prints the figures)
    outside,
    snapshot,
    write_family,
)
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save, save_file

import blockmerge
from blockmerge import BlockmergeError
from blockmerge.engine.safetensors_io import SafetensorsFile
from blockmerge.engine.store import read_manifest

FUZZ = settings(max_examples=200, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])


class Hang(BaseException):
    """Raised by the alarm in `no_hang` (a BaseException, so no `except Exception` in blockmerge hides it)."""


@contextlib.contextmanager
def no_hang(seconds: float = 10) -> Iterator[None]:
    def alarm(signum, frame):
        raise Hang(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


# ------------------------------------------------------------------------------------------------ (a) safetensors


def seed_files() -> list[bytes]:
    """Valid files written by safetensors itself: several dtypes, a scalar, an empty tensor, metadata."""
    g = torch.Generator().manual_seed(0)
    sets = [
        {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g), "ids": torch.arange(5)},
        {"h": torch.randn(2, 2, 2, generator=g).half(), "bf": torch.randn(3, generator=g).bfloat16(),
         "flag": torch.tensor([True, False, True]), "s": torch.tensor(1.5, dtype=torch.float64)},
        {"u8": torch.arange(7, dtype=torch.uint8), "empty": torch.zeros(0, 4), "i8": torch.arange(-3, 3).to(torch.int8),
         "i16": torch.arange(4, dtype=torch.int16), "i32": torch.arange(2, dtype=torch.int32)},
        {"e1": torch.zeros(0), "e2": torch.zeros(0, 3), "e3": torch.zeros(2, 0, dtype=torch.int64),
         "one": torch.ones(1), "u": torch.ones(1, dtype=torch.uint8)},
    ]
    out = []
    for i, tensors in enumerate(sets):
        out.append(save(tensors, metadata={"format": "pt", "seed": str(i)} if i != 1 else None))
    return out


SEEDS = seed_files()  # the last one holds zero-size and one-element tensors


def header_end(data: bytes) -> int:
    return 8 + struct.unpack("<Q", data[:8])[0] if len(data) >= 8 else 0


@st.composite
def mutated(draw) -> bytes:
    """A valid file with 1-4 mutations, aimed at the length field and the header half of the time."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        end = max(1, min(len(data), header_end(bytes(data)) or len(data)))
        pos = draw(st.integers(0, max(0, len(data) - 1)) | st.integers(0, end - 1) | st.integers(0, 7))
        pos = min(pos, max(0, len(data) - 1))
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "cut", "digit", "length"]))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[pos] = draw(st.sampled_from(b'{}[]",:0123456789-eE.\\ \x00\xff') | st.integers(0, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 8))]
        elif op == "cut":
            del data[pos:]
        elif op == "digit" and data:  # change a number of the header (shape, offsets) where there is one
            digits = [i for i in range(8, min(end, len(data))) if chr(data[i]).isdigit()]
            if digits:
                i = draw(st.sampled_from(digits))
                data[i:i + 1] = str(draw(st.integers(0, 2**64) | st.integers(0, 99))).encode()
        elif op == "length" and len(data) >= 8:
            data[:8] = struct.pack("<Q", draw(st.integers(0, len(data) + 16) | st.integers(0, 2**64 - 1)))
    return bytes(data)


DEEP = "\u0000deep"  # replaced, after encoding, by an array nested DEPTH deep
DEPTH = 50_000
SHAPE_LIKE = st.lists(st.sampled_from([0, 1, 2, 3, 2**31, 2**32, 2**62, 2**63 - 1, 2**63, 2**64, 2**70])
                      | st.integers(0, 2**64), max_size=8) | st.lists(st.just(1), min_size=60, max_size=100)
HEADER_VALUE = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=6)
                | st.just(DEEP) | SHAPE_LIKE | st.lists(st.integers(-2, 2**64), min_size=2, max_size=2)
                | st.sampled_from(["F32", "F16", "BF16", "I64", "BOOL", "U8", "F8_E4M3", "C64"]))


def encode(doc: object) -> bytes:
    return json.dumps(doc).replace(json.dumps(DEEP), "[" * DEPTH + "]" * DEPTH).encode()


@st.composite
def field_replaced(draw) -> bytes:
    """A valid file whose header has one field of one tensor (or the metadata) replaced by another value:
    shapes with huge, zero or many dimensions, offsets, dtypes, deep nesting. A third of the time the shape of
    a zero-size or one-element tensor is replaced, which passes the size check whatever else it holds."""
    data = draw(st.sampled_from(SEEDS))
    end = header_end(data)
    header = json.loads(data[8:end])
    small = [n for n, info in header.items() if n != "__metadata__"
             and info["data_offsets"][1] - info["data_offsets"][0] <= 1]
    if small and draw(st.integers(0, 2)) == 0:
        name = draw(st.sampled_from(small))
        span = header[name]["data_offsets"][1] - header[name]["data_offsets"][0]
        header[name]["shape"] = draw(st.lists(st.just(1), min_size=1, max_size=100) if span else SHAPE_LIKE.map(
            lambda dims: [0, *dims]))
    else:
        name = draw(st.sampled_from(sorted(header)))
        value = draw(HEADER_VALUE)
        if name == "__metadata__":
            header[name] = {"k": value} if draw(st.booleans()) else value
        else:
            header[name][draw(st.sampled_from(["dtype", "shape", "shape", "data_offsets"]))] = value
    text = encode(header)
    return struct.pack("<Q", len(text)) + text + data[end:]


def check_reader(path: Path) -> str:
    """blockmerge's reader against safetensors' on one file; returns the outcome."""
    try:
        expected = load_file(path)
    except Exception:  # noqa: BLE001 - safetensors' refusals come as several exception types
        expected = None
    got: dict[str, torch.Tensor] = {}
    with no_hang():
        try:
            f = SafetensorsFile(path)
            try:
                for name, (spec, _) in f.entries.items():
                    got[name] = f.read(name, 0, spec.rows)
            finally:
                f.close()
        except BlockmergeError as err:
            assert "\n" not in str(err) and path.name in str(err), str(err)
            return "refused"
    if expected is not None:
        assert sorted(got) == sorted(expected)
        for name, t in expected.items():
            assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
            assert raw(got[name]) == raw(t), f"{name}: blockmerge read other bytes than safetensors"
        return "same"
    data = path.read_bytes()
    end = header_end(data)
    header = json.loads(data[8:end])
    for name, t in got.items():
        begin, stop = header[name]["data_offsets"]
        assert list(t.shape) == header[name]["shape"]
        assert raw(t) == data[end + begin:end + stop], f"{name}: not the bytes its header points at"
    return "accepted (safetensors refuses)"


@FUZZ
@given(data=st.binary(max_size=400))
@example(data=b"")
@example(data=struct.pack("<Q", 2) + b"{}")
@example(data=struct.pack("<Q", 2**64 - 1) + b"{}")
def test_reader_on_arbitrary_bytes(tmp_path, data):
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(data)
    count("malformed safetensors files (hypothesis)")
    check_reader(path)


@FUZZ
@given(data=mutated())
def test_reader_on_mutated_valid_files(tmp_path, data):
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(data)
    count("malformed safetensors files (hypothesis)")
    check_reader(path)


@FUZZ
@given(data=field_replaced())
def test_reader_on_valid_files_with_a_header_field_replaced(tmp_path, data):
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(data)
    count("malformed safetensors files (hypothesis)")
    check_reader(path)


def with_header(header: bytes | dict, data: bytes = b"") -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


ADVERSARIAL_HEADERS = {
    "deeply-nested-json": with_header(b"[" * 100_000 + b"]" * 100_000),
    "deeply-nested-metadata": with_header(b'{"__metadata__": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"),
    "zero-size-with-a-2**64-dimension": with_header({"w": {"dtype": "F32", "shape": [0, 2**64],
                                                           "data_offsets": [0, 0]}}),
    "zero-size-with-2**62-elements-per-row": with_header({"w": {"dtype": "F32", "shape": [0, 2**62, 4],
                                                                "data_offsets": [0, 0]}}),
    "100-dimensions": with_header({"w": {"dtype": "F32", "shape": [1] * 100, "data_offsets": [0, 4]}},
                                  b"\0\0\x80\x3f"),
    "65-dimensions": with_header({"w": {"dtype": "U8", "shape": [1] * 65, "data_offsets": [0, 1]}}, b"\x07"),
    "nan-in-shape": with_header(b'{"w": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 0]}}'),
    "huge-float-offsets": with_header(b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 1e999]}}'),
    "name-with-nul": with_header({"a\u0000b": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}, b"\x01"),
    "lone-surrogate-name": with_header(b'{"\\ud800": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}',
                                       b"\x01"),
}


@pytest.mark.parametrize("case", list(ADVERSARIAL_HEADERS))
def test_reader_on_adversarial_headers(tmp_path, case):
    """Headers a random mutation rarely builds: nesting beyond Python's recursion limit, dimensions beyond
    int64 or beyond numpy's 64, non-finite numbers. Read, or refused with BlockmergeError."""
    path = tmp_path / "adversarial.safetensors"
    path.write_bytes(ADVERSARIAL_HEADERS[case])
    count("adversarial safetensors headers")
    check_reader(path)


# ------------------------------------------------------------------------------------------------ (b) manifests

ARRAY_PATH = re.compile(r"arrays/[0-9]{6}")


@pytest.fixture(scope="module")
def valid_manifest(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("manifest")
    g = torch.Generator().manual_seed(1)
    blockmerge.merge("average", [{"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g),
                                  "ids": torch.arange(3)}], out=root / "s.store")
    return (root / "s.store" / "blockmerge.json").read_text()


SCALAR = st.none() | st.booleans() | st.integers(-(2**65), 2**65) | st.floats() | st.text(max_size=8) | st.just(DEEP)
JSON_VALUE = st.recursive(SCALAR, lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)
BY_KEY = {  # values aimed at what the reader checks, by the key they replace
    "path": st.sampled_from(["arrays/000000", "arrays/000001\n", "\narrays/000001", "arrays/00000\uff11",
                             "arrays/0000001", "arrays/00000", "../arrays/000000", "/arrays/000000", "arrays/000000/..",
                             "arrays\\000000", "arrays//000000", " arrays/000000", "arrays/000000\x00", "files/x",
                             "blockmerge.json", "."]),
    "tensors": SCALAR | st.lists(SCALAR, max_size=3) | st.dictionaries(st.text(max_size=4), SCALAR, max_size=2),
    "shape": SHAPE_LIKE | st.lists(SCALAR, max_size=3),
    "dtype": st.sampled_from(["float32", "bfloat16", "bool", "int64", "uint8", "F32", "complex64", "", "float8"]),
    "kind": st.sampled_from(["param", "fisher", "gram_in", "trimmed", "Param", "", "params"]),
    **dict.fromkeys(("blake3", "sha256"), st.sampled_from(["0" * 64, "0" * 63, "0" * 65, "g" * 64, "A" * 64,
                                                           "0" * 64 + "\n"])),
    "name": st.sampled_from(["", "w", "b", "ids", "__metadata__"]) | st.text(max_size=4),
    "version": st.sampled_from([1, 1.0, True, "1", 2, 0, None]),
    "format": st.sampled_from(["blockmerge-store", "Blockmerge-store", "", None]),
}


def slots(doc: object) -> list[tuple[object, object]]:
    """Every (container, key) of a JSON document."""
    out = []
    if isinstance(doc, dict):
        for k, v in doc.items():
            out.append((doc, k))
            out.extend(slots(v))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out.append((doc, i))
            out.extend(slots(v))
    return out


@st.composite
def manifest_mutation(draw, text: str) -> str:
    """JSON-level changes (a value replaced or a key dropped: at the top level, in a tensor entry, or anywhere)
    or byte-level ones (bits flipped, bytes inserted or deleted)."""
    if draw(st.booleans()):
        doc = json.loads(text)
        for _ in range(draw(st.integers(1, 3))):
            region = draw(st.sampled_from(["top", "entry", "anywhere"]))
            if region == "top":
                candidates = [(doc, k) for k in doc] if isinstance(doc, dict) else []
            elif region == "entry":
                entries = doc.get("tensors") if isinstance(doc, dict) else None
                candidates = [(e, k) for e in entries if isinstance(e, dict) for k in e] \
                    if isinstance(entries, list) else []
            else:
                candidates = slots(doc)
            if not candidates:
                continue
            parent, key = draw(st.sampled_from(candidates))
            if isinstance(parent, dict) and draw(st.integers(0, 5)) == 0:
                del parent[key]
            elif key in BY_KEY and draw(st.booleans()):
                parent[key] = draw(BY_KEY[key])
            else:
                parent[key] = draw(JSON_VALUE)
        return encode(doc).decode()
    data = bytearray(text.encode())
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, len(data) - 1)) if data else 0
        op = draw(st.sampled_from(["flip", "insert", "delete"]))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=4) | st.sampled_from([b"\\n", b"0", b"/..", b"\n"]))
        else:
            del data[pos:pos + draw(st.integers(1, 6))]
    return data.decode("utf-8", errors="surrogateescape")


def check_manifest(root: Path, text: str) -> None:
    (root / "blockmerge.json").write_bytes(text.encode("utf-8", errors="surrogateescape"))
    with no_hang():
        try:
            entries, metadata = read_manifest(root)
        except BlockmergeError as err:
            assert "\n" not in str(err), str(err)
            return
    assert isinstance(metadata, dict)
    for e in entries:
        assert ARRAY_PATH.fullmatch(e.path), f"array path {e.path!r} accepted"
        assert isinstance(e.name, str) and e.name
    assert len({e.path for e in entries}) == len(entries)


@FUZZ
@given(data=st.data())
def test_manifest_reader_on_mutated_manifests(tmp_path, valid_manifest, data):
    text = data.draw(manifest_mutation(valid_manifest))
    count("malformed store manifests (hypothesis)")
    check_manifest(tmp_path, text)


def manifest_with(valid: str, change) -> str:
    doc = json.loads(valid)
    change(doc)
    return json.dumps(doc)


ADVERSARIAL_MANIFESTS = {
    "tensors-null": lambda m: m.__setitem__("tensors", None),
    "tensors-number": lambda m: m.__setitem__("tensors", 5),
    "tensors-true": lambda m: m.__setitem__("tensors", True),
    "path-with-a-trailing-newline": lambda m: m["tensors"][0].__setitem__("path", "arrays/000000\n"),
    "nested-beyond-the-recursion-limit": None,
}


@pytest.mark.parametrize("case", list(ADVERSARIAL_MANIFESTS))
def test_manifest_reader_on_adversarial_manifests(tmp_path, valid_manifest, case):
    change = ADVERSARIAL_MANIFESTS[case]
    if change is None:
        text = '{"format": "blockmerge-store", "version": 1, "tensors": ' + "[" * 100_000 + "]" * 100_000 + "}"
    else:
        text = manifest_with(valid_manifest, change)
    count("adversarial store manifests")
    check_manifest(tmp_path, text)


def test_manifest_whose_shape_lies_is_refused_quickly(tmp_path):
    """A manifest entry claiming 2**62 rows for an array of 4: the merge must refuse it (the array's own
    metadata disagrees), not plan 2**59 blocks. Run as a process with 1 GiB of address space to spare."""
    family_root = tmp_path / "inputs"
    family = write_family(family_root, {"w": (4, 2)}, num_models=1)
    store = family_root / "m.store"
    blockmerge.merge("average", [str(family.models[0])], out=store)
    manifest = json.loads((store / "blockmerge.json").read_text())
    next(e for e in manifest["tensors"] if e["name"] == "w")["shape"] = [2**62, 2]
    (store / "blockmerge.json").write_text(json.dumps(manifest))
    scenario = Scenario(tmp_path / "run", family, "out.safetensors")
    result = scenario.run(["merge", "-q", "--method", "average", "--model", str(store), "--out", str(scenario.out)],
                          timeout=120, memory=2**30)
    count("adversarial store manifests")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "m.store" in lines[0], result.stderr[-2000:]
    assert list(scenario.out_dir.iterdir()) == []


# ------------------------------------------------------------------------------------------------ (c) names

TRICKY = ["../../x", "/abs/path", "a/../../b", "..", ".", "./a", "a/./b", "a//b", "~", "~/x", "$HOME", "a\\..\\b",
          "C:\\x", "nul", "CON", "arrays/000000", "blockmerge.json", "model.safetensors", ".blockmerge-partial",
          "名前/テンソル", "ü", "\u202etxt.exe", "e\u0301", "🙂/🙂", "line\nbreak", "tab\there", "quote\"'",
          "x" * 255, "x" * 4096, "y" * 70_000, " ", "\u00a0", "\x7f"]
NAME = st.sampled_from(TRICKY) | st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                                         min_size=1, max_size=40)
NAMES = st.lists(NAME, min_size=1, max_size=4, unique=True).filter(lambda names: "__metadata__" not in names)


def check_names(root: Path, names: list[str], seed: int) -> None:
    inputs, out_dir = root / "inputs", root / "out"
    inputs.mkdir()
    out_dir.mkdir()
    g = torch.Generator().manual_seed(seed)
    shapes = [(3, 2), (4,), (), (2, 2, 2)]
    models = [{n: torch.randn(shapes[i % len(shapes)], generator=g) for i, n in enumerate(names)} for _ in range(2)]
    for i, m in enumerate(models):
        save_file(m, inputs / f"m{i}.safetensors")
    expected = blockmerge.merge("average", models)
    before = snapshot(root)
    outs = {"out.safetensors": {}, "out.store": {}, "out-hf": {"format": "hf", "max_shard_size": "1KiB"}}
    for name, options in outs.items():
        blockmerge.merge("average", [str(inputs / "m0.safetensors"), str(inputs / "m1.safetensors")],
                         out=out_dir / name, block_size=64, **options)
    leaked = outside(changed(before, snapshot(root)), out_dir)
    assert not leaked, f"written outside the output's directory: {leaked[:5]}"
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(outs), "only the outputs may appear"
    for name in outs:
        back = blockmerge.merge("average", [str(out_dir / name)])
        assert sorted(back) == sorted(expected), name
        assert all(raw(back[n]) == raw(expected[n]) for n in names), name
    single = load_file(out_dir / "out.safetensors")  # safetensors' own reader agrees
    shards: dict[str, torch.Tensor] = {}
    for shard in sorted((out_dir / "out-hf").glob("*.safetensors")):
        shards.update(load_file(shard))
    for read_back in (single, shards):
        assert sorted(read_back) == sorted(names)
        assert all(raw(read_back[n]) == raw(expected[n]) for n in names)


@settings(max_examples=60, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(names=NAMES, seed=st.integers(0, 2**16))
@example(names=["../../x", "/abs/path", "a/../../b", "y" * 70_000], seed=0)
def test_tensor_names_are_data_in_every_format(tmp_path_factory, names, seed):
    count("tensor-name merges (names as data)")
    check_names(tmp_path_factory.mktemp("names"), names, seed)


@pytest.mark.parametrize("out", ["out.safetensors", "out-hf"])
def test_a_tensor_named_like_the_safetensors_metadata_key(tmp_path, out):
    """`__metadata__` is a legal tensor name in memory, a .bin or a store, but the one key a safetensors header
    reserves: a safetensors output must refuse it up front (one line) or keep it readable, never write a
    header that no reader accepts."""
    models = [{"__metadata__": torch.ones(2), "w": torch.zeros(2)} for _ in range(2)]
    count("tensor-name merges (names as data)")
    options = {"format": "hf"} if out == "out-hf" else {}
    try:
        blockmerge.merge("average", models, out=tmp_path / out, **options)
    except BlockmergeError as err:
        assert "__metadata__" in str(err) and "\n" not in str(err)
        assert list(tmp_path.iterdir()) == []
        return
    try:
        back = blockmerge.merge("average", [str(tmp_path / out)])
    except BlockmergeError as err:
        pytest.fail(f"the merge succeeded and wrote an output nothing can read: {err}")
    assert sorted(back) == ["__metadata__", "w"]


@pytest.mark.parametrize("shape", ['""', "{}"])
def test_a_shape_that_is_not_a_list_is_refused_as_safetensors_refuses_it(tmp_path, shape):
    """Found by the field-replacing fuzzer: `"shape": ""` read as a scalar where safetensors refuses the file."""
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(with_header(f'{{"s": {{"dtype": "F64", "shape": {shape}, "data_offsets": [0, 8]}}}}'.encode(),
                                 b"\0" * 8))
    assert check_reader(path) == "refused"
