"""Bad input: the CLI exits with status 2 and one line on stderr naming the file (and parameter),
leaves no output (no OUT, no hidden partial directory or lock) and never changes its inputs.

Every corrupt file is written by hand (8-byte little-endian header length + JSON + data) or cut
from a file written by `safetensors.torch.save_file`; no mocks.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import pickle
import shlex
import shutil
import struct
import subprocess
import sys
import traceback
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import blockmerge
from blockmerge import BlockmergeError, api
from blockmerge.cli import main

# ----------------------------------------------------------------------------------------------- helpers


def good_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(8, 4, generator=g), "b": torch.randn(4, generator=g),
            "ids": torch.arange(4, dtype=torch.int64)}


def tree(root: Path) -> dict[str, str]:
    """Every file (sha256 of its bytes) and directory under root, hidden ones included."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = "dir"
        for f in filenames:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(Path(p).read_bytes()).hexdigest()
    return out


def terminal_lines(text: str) -> list[str]:
    """The non-blank lines a terminal would show for `text` (a carriage return rewinds the line)."""
    lines = []
    for line in text.split("\n"):
        buf: list[str] = []
        col = 0
        for ch in line:
            if ch == "\r":
                col = 0
                continue
            if col < len(buf):
                buf[col] = ch
            else:
                buf.append(ch)
            col += 1
        shown = "".join(buf).rstrip()
        if shown.strip():
            lines.append(shown)
    return lines


class Outcome:
    """What one CLI run left: exit code, stdout, stderr (finalizer errors included) and any traceback."""

    def __init__(self, exit_code: int, stdout: str, stderr: str, traceback_text: str):
        self.exit_code, self.stdout, self.stderr, self.traceback = exit_code, stdout, stderr, traceback_text


def cli(*args) -> Outcome:
    """Invoke the CLI in-process, as a real process would behave.

    CliRunner keeps the exception that ended the command (and through its traceback, every object the
    failed run built) alive in its result; a real process drops it at exit, where an error raised by a
    finalizer (`__del__`) is printed on stderr as 'Exception ignored in ...'. So: drop the result,
    collect, and append what finalizers report to stderr. Warnings, which pytest would swallow, are
    appended too: a real process prints them on stderr.
    """
    reported: list[str] = []

    def hook(unraisable) -> None:
        reported.append(f"Exception ignored in: {unraisable.object!r}\n" + "".join(
            traceback.format_exception(unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback)))

    saved = sys.unraisablehook
    sys.unraisablehook = hook
    try:
        with warnings.catch_warnings(record=True) as caught:
            # Python's default warning filters (pytest installs its own): what a user's terminal shows
            warnings.resetwarnings()
            warnings.simplefilter("default")
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.filterwarnings("ignore", category=category)
            result = CliRunner().invoke(main, [str(a) for a in args])
            tb = ""
            if result.exception is not None and not isinstance(result.exception, SystemExit):
                tb = "".join(traceback.format_exception(*result.exc_info))
            outcome = Outcome(result.exit_code, result.stdout, result.stderr, tb)
            del result
            gc.collect()
    finally:
        sys.unraisablehook = saved
    shown = [warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line) for w in caught]
    outcome.stderr += "".join(shown) + "".join(reported)
    return outcome


def describe(result: Outcome) -> str:
    return f"exit code {result.exit_code}\nstderr: {result.stderr!r}\nstdout: {result.stdout!r}\n{result.traceback}"


def assert_one_error_line(exit_code: int, stderr: str, needles: tuple[str, ...], context: str) -> str:
    assert exit_code == 2, context
    lines = terminal_lines(stderr)
    assert len(lines) == 1, f"expected exactly one line on stderr, got {lines!r}\n{context}"
    line = lines[0]
    assert line.startswith("blockmerge: error: "), context
    assert "Traceback" not in stderr, context
    for needle in needles:
        assert needle in line, f"{needle!r} not named in {line!r}"
    return line


def no_leftovers(out: Path) -> None:
    # os.path.lexists, not Path.exists: it answers False (instead of raising) for a name too long to exist
    assert not os.path.lexists(out.parent / f".{out.name}.blockmerge-partial"), "partial directory left behind"
    assert not os.path.lexists(out.parent / f".{out.name}.blockmerge-lock"), "lock file left behind"


class Env:
    """Inputs under tmp/in, outputs under tmp/out; checks that a refused command changes neither."""

    def __init__(self, tmp_path: Path):
        self.tmp = tmp_path
        self.inp = tmp_path / "in"
        self.inp.mkdir()
        self.outdir = tmp_path / "out"
        self.outdir.mkdir()
        self.out = self.outdir / "merged.safetensors"
        self.a = self.save("a.safetensors", good_tensors(1))
        self.b = self.save("b.safetensors", good_tensors(2))
        self.base = self.save("base.safetensors", good_tensors(0))

    def save(self, name: str, tensors: dict[str, torch.Tensor]) -> Path:
        path = self.inp / name
        save_file(tensors, path)
        return path

    def merge_args(self, *models: Path, method: str = "average", base: Path | None = None,
                   sets: tuple[str, ...] = (), out: Path | None = None, extra: tuple = ()) -> list:
        args = ["merge", "--method", method]
        if base is not None:
            args += ["--base", base]
        for m in models:
            args += ["--model", m]
        for s in sets:
            args += ["--set", s]
        return [*args, "--out", out or self.out, "--block-size", "64B", *extra]

    def refused(self, args: list, *needles: str, out: Path | None = None) -> str:
        """Run the CLI; it must fail cleanly, leaving the inputs and the output directory as they were."""
        out = out or self.out
        existed = os.path.lexists(out)
        before_in, before_out = tree(self.inp), tree(self.outdir)
        result = cli(*args)
        line = assert_one_error_line(result.exit_code, result.stderr, needles, describe(result))
        assert tree(self.inp) == before_in, "an input file was changed"
        assert tree(self.outdir) == before_out, "the output directory was changed"
        assert os.path.lexists(out) == existed
        no_leftovers(out)
        return line

    def refused_merge(self, bad: Path, *needles: str, **kwargs) -> str:
        return self.refused(self.merge_args(self.a, bad, **kwargs), *needles)


@pytest.fixture(scope="module", autouse=True)
def _cheap_collections():
    """The many gc.collect() calls below skip the objects that exist before the tests (torch and co.)."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.fixture
def env(tmp_path):
    yield Env(tmp_path)
    gc.collect()  # finalize what this test's failed runs left, while still attributed to this test


def safetensors_parts(tensors: dict[str, torch.Tensor]) -> tuple[dict, bytes]:
    """A header dict (names in order, consecutive offsets) and the data section, built by hand."""
    codes = {torch.float32: "F32", torch.int64: "I64", torch.float16: "F16"}
    header, data, cursor = {}, b"", 0
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": codes[t.dtype], "shape": list(t.shape), "data_offsets": [cursor, cursor + len(raw)]}
        data += raw
        cursor += len(raw)
    return header, data


def write_raw(path: Path, header: dict | str | bytes, data: bytes, length: int | None = None) -> Path:
    if isinstance(header, dict):
        header = json.dumps(header)
    if isinstance(header, str):
        header = header.encode()
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + data)
    return path


def header_of(path: Path) -> tuple[int, dict]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return n, json.loads(data[8:8 + n])


def test_hand_written_file_is_valid(env):
    """The hand-built layout the corrupt cases start from is a valid safetensors file, merged fine."""
    tensors = good_tensors(3)
    header, data = safetensors_parts(tensors)
    path = write_raw(env.inp / "raw.safetensors", header, data)
    loaded = load_file(path)
    assert all(torch.equal(loaded[n], tensors[n]) for n in tensors)
    result = cli(*env.merge_args(env.a, path))
    assert result.exit_code == 0, describe(result)
    assert env.out.is_file()


# ----------------------------------------------------------------------------------------------- corrupt safetensors


def test_truncated_in_data_section(env):
    bad = env.save("cut.safetensors", good_tensors(4))
    _, header = header_of(bad)
    header.pop("__metadata__", None)
    last = max(header, key=lambda n: header[n]["data_offsets"][1])
    bad.write_bytes(bad.read_bytes()[:-10])
    env.refused_merge(bad, bad.name, f"'{last}'")


def test_truncated_in_header(env):
    bad = env.save("cut.safetensors", good_tensors(4))
    n, _ = header_of(bad)
    bad.write_bytes(bad.read_bytes()[:8 + n // 2])
    env.refused_merge(bad, bad.name)


def test_shorter_than_header_length_field(env):
    bad = env.inp / "tiny.safetensors"
    bad.write_bytes(b"\x05\x00\x00")
    env.refused_merge(bad, bad.name)


@pytest.mark.parametrize("where", ["structural-quote", "non-utf8-name", "brace"])
def test_bit_flipped_in_header_json(env, where):
    bad = env.save("flip.safetensors", good_tensors(5))
    data = bytearray(bad.read_bytes())
    n, _ = header_of(bad)
    header = bytes(data[8:8 + n])
    if where == "structural-quote":
        pos, bit = 8 + header.index(b'"'), 0x01  # '"' -> '#'
    elif where == "non-utf8-name":
        pos, bit = 8 + header.index(b'"w"') + 1, 0x80  # 'w' -> an invalid UTF-8 byte
    else:
        pos, bit = 8, 0x04  # '{' -> '\x7f'
    data[pos] ^= bit
    bad.write_bytes(bytes(data))
    with pytest.raises(Exception):  # noqa: B017 - the flip really makes the header unreadable
        load_file(bad)
    env.refused_merge(bad, bad.name)


@pytest.mark.parametrize("lie", ["span-too-short", "span-too-long", "overlap", "past-end", "begin-after-end"])
def test_header_data_offsets_lie(env, lie):
    header, data = safetensors_parts(good_tensors(6))  # b [0,16], ids [16,48], w [48,176]
    if lie == "span-too-short":
        header["w"]["data_offsets"] = [48, 172]
    elif lie == "span-too-long":
        header["w"]["data_offsets"] = [44, 176]
    elif lie == "overlap":
        header["w"]["data_offsets"] = [40, 168]
    elif lie == "past-end":
        header["w"]["data_offsets"] = [64, 192]
    else:
        header["w"]["data_offsets"] = [176, 48]
    bad = write_raw(env.inp / "lie.safetensors", header, data)
    env.refused_merge(bad, bad.name, "'w'")


@pytest.mark.parametrize("field,value", [("shape", [True, 4]), ("shape", [8, -4]), ("shape", [8.0, 4]),
                                         ("shape", "8x4"), ("dtype", "F8_E4M3"), ("dtype", ["F32"]),
                                         ("data_offsets", [48]), ("data_offsets", [48.0, 176.0]),
                                         ("data_offsets", [-8, 120])])
def test_header_with_ill_typed_fields(env, field, value):
    header, data = safetensors_parts(good_tensors(6))
    header["w"][field] = value
    if value == [True, 4]:
        header["w"]["data_offsets"] = [48, 64]  # the 16 bytes a shape of [1, 4] would need
    bad = write_raw(env.inp / "typed.safetensors", header, data)
    env.refused(env.merge_args(bad), bad.name, "'w'")  # the only model: no other file to disagree with


def test_absurd_header_length(env):
    header, data = safetensors_parts(good_tensors(7))
    bad = write_raw(env.inp / "huge.safetensors", header, data, length=2**60)
    env.refused_merge(bad, bad.name)


def test_duplicate_tensor_names(env):
    tensors = good_tensors(8)
    header, data = safetensors_parts(tensors)
    entries = [f'"{name}":{json.dumps(info)}' for name, info in header.items()]
    entries.append(f'"w":{json.dumps(header["w"])}')  # the same name again, same span
    bad = write_raw(env.inp / "dup.safetensors", "{" + ",".join(entries) + "}", data)
    env.refused_merge(bad, bad.name, "'w'")


def test_empty_tensor_name(env):
    header, data = safetensors_parts(good_tensors(9))
    header[""] = header.pop("b")
    bad = write_raw(env.inp / "noname.safetensors", header, data)
    env.refused_merge(bad, bad.name)


def test_missing_file(env):
    env.refused_merge(env.inp / "nope.safetensors", "nope.safetensors")


def test_input_name_too_long(env):
    bad = env.inp / ("a" * 300 + ".safetensors")
    env.refused_merge(bad, "a" * 100)
    env.refused(["inspect", bad], "a" * 100)


def test_output_name_too_long(env):
    out = env.outdir / ("o" * 300 + ".safetensors")
    env.refused(env.merge_args(env.a, env.b, out=out), "o" * 100, out=out)


def test_unreadable_file(env):
    """chmod 000 stops a normal user; root runs the merge without its permission-override capabilities."""
    secret = env.save("secret.safetensors", good_tensors(10))
    other = env.save("other.safetensors", good_tensors(11))
    secret.chmod(0)
    out = env.out
    drop = ["setpriv", "--bounding-set=-dac_override,-dac_read_search",
            "--inh-caps=-dac_override,-dac_read_search", "--"] if os.geteuid() == 0 else []
    try:
        result = subprocess.run([*drop, sys.executable, "-m", "blockmerge", "merge", "-q", "--method", "average",
                                 "--model", str(secret), "--model", str(other), "--out", str(out)],
                                capture_output=True, text=True)
    finally:
        secret.chmod(0o644)
    line = assert_one_error_line(result.returncode, result.stderr, ("secret.safetensors", "ermission denied"),
                                 "unreadable file")
    assert line.startswith("blockmerge: error:")
    no_leftovers(out)


# ----------------------------------------------------------------------------------------------- models that disagree


def test_model_missing_a_tensor(env):
    t = good_tensors(11)
    del t["b"]
    bad = env.save("short.safetensors", t)
    env.refused_merge(bad, bad.name, "'b'")


def test_model_with_an_extra_tensor(env):
    bad = env.save("long.safetensors", {**good_tensors(11), "extra.weight": torch.zeros(2)})
    env.refused_merge(bad, bad.name, "'extra.weight'")


def test_model_with_mismatched_shape(env):
    t = good_tensors(12)
    t["w"] = t["w"].reshape(4, 8).contiguous()
    bad = env.save("shape.safetensors", t)
    env.refused_merge(bad, bad.name, "'w'")


def test_model_with_mismatched_dtype(env):
    t = good_tensors(13)
    t["w"] = t["w"].half()
    bad = env.save("dtype.safetensors", t)
    env.refused_merge(bad, bad.name, "'w'")


def test_base_with_mismatched_shape(env):
    t = good_tensors(14)
    t["b"] = torch.zeros(5)
    bad = env.save("badbase.safetensors", t)
    env.refused(env.merge_args(env.a, env.b, method="ties", base=bad), bad.name, "'b'")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_values(env, value):
    t = good_tensors(15)
    t["w"][5, 2] = value
    bad = env.save("nonfinite.safetensors", t)
    env.refused_merge(bad, bad.name, "'w'")


def test_non_finite_in_base(env):
    t = good_tensors(16)
    t["b"][1] = float("nan")
    bad = env.save("nanbase.safetensors", t)
    env.refused(env.merge_args(env.a, env.b, method="task_arithmetic", base=bad), bad.name, "'b'")


JSON = st.recursive(st.none() | st.booleans() | st.integers(-(2**65), 2**65) | st.floats(allow_nan=False)
                    | st.text(max_size=4), lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=8)
ENTRY = st.fixed_dictionaries({
    "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "BOOL", "U8", "F8_E4M3", "f32", ""]) | JSON,
    "shape": st.lists(st.integers(-1, 6) | st.booleans(), max_size=3) | JSON,
    "data_offsets": st.lists(st.integers(-8, 120), max_size=3) | JSON,
})
HEADERS = st.dictionaries(st.sampled_from(["w", "b", "", "__metadata__", "x.y"]) | st.text(max_size=3),
                          ENTRY | JSON, max_size=4)


@settings(max_examples=120, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=HEADERS, data=st.binary(max_size=120))
def test_arbitrary_headers_give_a_checkpoint_or_a_one_line_error(tmp_path, header, data):
    """Whatever the header holds, blockmerge reads the file or refuses it with BlockmergeError, no other
    exception (the data is read too, so what the header check lets through must be readable)."""
    path = write_raw(tmp_path / "fuzz.safetensors", header, data)
    try:
        merged = blockmerge.merge("average", [path], compute_dtype="float64")
    except BlockmergeError as err:
        assert "\n" not in str(err) and path.name in str(err), str(err)
    else:
        with open(path, "rb") as f:
            f.seek(8 + struct.unpack("<Q", f.read(8))[0])
            data_len = len(f.read())
        for name, t in merged.items():
            info = header[name]
            begin, end = info["data_offsets"]
            assert list(t.shape) == list(info["shape"]) and 0 <= begin <= end <= data_len
    finally:
        gc.collect()


# ----------------------------------------------------------------------------------------------- shards


def write_sharded(root: Path, tensors: dict[str, torch.Tensor], weight_map: dict[str, str]) -> Path:
    root.mkdir()
    for shard in sorted(set(weight_map.values())):
        save_file({n: tensors[n] for n, s in weight_map.items() if s == shard}, root / shard)
    index = root / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


def test_index_pointing_at_a_missing_shard(env):
    t = good_tensors(17)
    first, second = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    index = write_sharded(env.inp / "sharded", t, {"w": first, "b": first, "ids": second})
    (index.parent / second).unlink()
    env.refused_merge(index, second)
    env.refused_merge(index.parent, second)


def test_shard_holding_a_tensor_the_index_does_not_list(env):
    t = good_tensors(18)
    shard = "model-00001-of-00001.safetensors"
    index = write_sharded(env.inp / "sharded", {**t, "stowaway": torch.ones(3)}, dict.fromkeys([*t, "stowaway"],
                                                                                               shard))
    index.write_text(json.dumps({"metadata": {}, "weight_map": dict.fromkeys(t, shard)}))
    env.refused_merge(index, shard, "'stowaway'")


def test_index_with_a_shard_outside_its_directory(env):
    t = good_tensors(19)
    save_file(t, env.inp / "elsewhere.safetensors")
    index = write_sharded(env.inp / "sharded", t, dict.fromkeys(t, "model.safetensors"))
    index.write_text(json.dumps({"weight_map": dict.fromkeys(t, "../elsewhere.safetensors")}))
    env.refused_merge(index, index.name)


# ----------------------------------------------------------------------------------------------- pickles that run code


class RunsCode:
    """Unpickling this runs a shell command (creates the marker file)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


def write_evil(path: Path, marker: Path, how: str) -> Path:
    payload = {"w": torch.zeros(8, 4), "b": torch.zeros(4), "ids": torch.arange(4), "evil": RunsCode(marker)}
    if how == "torch.save":
        torch.save(payload, path)
    elif how == "torch.save-legacy":
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    return path


@pytest.mark.parametrize("how", ["torch.save", "torch.save-legacy", "pickle.dump"])
def test_pickle_that_would_run_code_is_refused(env, how):
    # the payload is live: loading it without restrictions really runs the command
    probe_marker = env.tmp / "probe-marker"
    probe = write_evil(env.tmp / "probe.bin", probe_marker, how)
    if how == "pickle.dump":
        with open(probe, "rb") as f:
            pickle.load(f)
    else:
        torch.load(probe, weights_only=False)
    assert probe_marker.exists()

    marker = env.tmp / "pwned"
    bad = write_evil(env.inp / "evil.bin", marker, how)
    env.refused_merge(bad, bad.name)
    assert not marker.exists(), "loading the checkpoint ran code"
    env.refused(["import", bad, env.outdir / "store"], bad.name, out=env.outdir / "store")
    env.refused(["inspect", bad], bad.name)
    assert not marker.exists(), "loading the checkpoint ran code"


def test_pytorch_file_that_is_not_a_state_dict(env):
    bad = env.inp / "list.pt"
    torch.save([torch.zeros(2)], bad)
    env.refused_merge(bad, bad.name)


def test_truncated_pytorch_file(env):
    bad = env.inp / "cut.bin"
    torch.save(good_tensors(20), bad)
    bad.write_bytes(bad.read_bytes()[:200])
    env.refused_merge(bad, bad.name)


# ----------------------------------------------------------------------------------------------- methods and options


def test_unknown_method(env):
    env.refused(env.merge_args(env.a, env.b, method="nosuchmethod"), "nosuchmethod")


def test_unknown_hyperparameter(env):
    env.refused(env.merge_args(env.a, env.b, method="ties", base=env.base, sets=("densty=0.2",)), "densty")


def test_ill_typed_hyperparameter(env):
    env.refused(env.merge_args(env.a, env.b, method="ties", base=env.base, sets=("density=abc",)), "density")


@pytest.mark.parametrize("value", ["1.5", "0", "-0.1", "nan"])
def test_density_out_of_range(env, value):
    env.refused(env.merge_args(env.a, env.b, method="ties", base=env.base, sets=(f"density={value}",)), "density")


def test_task_arithmetic_without_base(env):
    env.refused(env.merge_args(env.a, env.b, method="task_arithmetic"), "base")


def test_unknown_codec(env):
    store = env.outdir / "store"
    env.refused(["import", env.a, store, "--codec", "lz5"], "lz5", out=store)
    env.refused(env.merge_args(env.a, env.b, out=store, extra=("--codec", "lz5")), "lz5", out=store)


@pytest.mark.parametrize("option,value", [("--block-size", "lots"), ("--block-size", "0"),
                                          ("--max-shard-size", "-5MB"), ("--compute-dtype", "float16")])
def test_bad_size_and_dtype_options(env, option, value):
    env.refused(env.merge_args(env.a, env.b, extra=(option, value)), value)


def test_unknown_output_dtype(env):
    env.refused(env.merge_args(env.a, env.b, extra=("--dtype", "float7")), "float7")


# ----------------------------------------------------------------------------------------------- existing outputs


@pytest.mark.parametrize("kind", ["file", "store"])
def test_existing_output_is_kept_without_overwrite_and_replaced_with_it(env, kind):
    out = env.outdir / ("merged.safetensors" if kind == "file" else "merged-store")
    if kind == "file":
        out.write_bytes(b"precious bytes, not a checkpoint")
    else:
        out.mkdir()
        (out / "precious.txt").write_text("keep me")
    env.refused(env.merge_args(env.a, env.b, out=out), out.name, out=out)
    env.refused([*env.merge_args(env.a, env.b, out=out), "--overwrite"], out.name, "not a blockmerge output", out=out)
    assert out.exists()

    if kind == "file":
        out.unlink()
    else:
        shutil.rmtree(out)
    api.convert(env.b, out)  # a previous blockmerge output of the same kind
    env.refused(env.merge_args(env.a, env.b, out=out), out.name, "already exists", out=out)
    result = cli(*env.merge_args(env.a, env.b, out=out), "--overwrite")
    assert result.exit_code == 0, describe(result)
    no_leftovers(out)
    assert sorted(p.name for p in env.outdir.iterdir()) == [out.name]
    expected = blockmerge.merge("average", [env.a, env.b])
    if kind == "file":
        got = load_file(out)
    else:
        api.convert(out, env.tmp / "check.safetensors")
        got = load_file(env.tmp / "check.safetensors")
    assert sorted(got) == sorted(expected)
    assert all(torch.equal(got[n], expected[n]) for n in expected)


# ----------------------------------------------------------------------------------------------- corrupt stores


def make_store(env: Env, name: str = "store", codec: str = "none") -> Path:
    store = env.inp / name
    api.convert(env.b, store, codec=codec)
    return store


def manifest_path(store: Path) -> Path:
    return store / "blockmerge.json"


def test_store_with_corrupt_manifest_json(env):
    store = make_store(env)
    text = manifest_path(store).read_text()
    manifest_path(store).write_text(text[: len(text) // 2])
    env.refused_merge(store, store.name)
    env.refused(["export", store, env.outdir / "x.safetensors"], store.name, out=env.outdir / "x.safetensors")


def test_store_manifest_recording_two_digests_for_one_tensor(env):
    """A tensor's checksum is one digest (blake3, or sha256 in older stores): an entry with both is corrupt."""
    store = make_store(env)
    manifest = json.loads(manifest_path(store).read_text())
    entry = next(e for e in manifest["tensors"] if e["name"] == "w")
    entry["sha256"] = entry["blake3"]
    manifest_path(store).write_text(json.dumps(manifest))
    env.refused_merge(store, store.name)


@pytest.mark.parametrize("path", ["../../x", "arrays/../../x", "arrays/000000/../../../x", "ABSOLUTE"])
def test_store_manifest_path_escaping_the_store(env, path):
    store = make_store(env)
    manifest = json.loads(manifest_path(store).read_text())
    entry = next(e for e in manifest["tensors"] if e["name"] == "w")
    # a valid array of the right shape really exists where the path points, so only a refusal stops it
    # being read (and the merge succeeding)
    target = env.tmp / "elsewhere" / "x" if path == "ABSOLUTE" else (store / path)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(store / entry["path"], target)
    entry["path"] = str(target) if path == "ABSOLUTE" else path
    manifest_path(store).write_text(json.dumps(manifest))
    env.refused_merge(store, store.name)


@pytest.mark.parametrize("codec", ["none", "zstd"])
def test_store_array_modified_after_writing(env, codec):
    store = make_store(env, codec=codec)
    manifest = json.loads(manifest_path(store).read_text())
    array = store / next(e["path"] for e in manifest["tensors"] if e["name"] == "w")
    chunks = sorted(p for p in (array / "c").rglob("*") if p.is_file())
    assert chunks, "no chunk files found"
    data = bytearray(chunks[0].read_bytes())
    if codec == "none":
        data[0] ^= 0x5A  # lowest mantissa byte of w[0, 0]: still a finite float, only the checksum can tell
    else:
        data[len(data) // 2] ^= 0xFF
    chunks[0].write_bytes(bytes(data))
    env.refused_merge(store, store.name, "'w'")
    exported = env.outdir / "exported.safetensors"
    env.refused(["export", store, exported], store.name, "'w'", out=exported)


def test_store_with_a_missing_array(env):
    store = make_store(env)
    manifest = json.loads(manifest_path(store).read_text())
    array = store / next(e["path"] for e in manifest["tensors"] if e["name"] == "w")
    for p in sorted(array.rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    env.refused_merge(store, store.name, "'w'")


# ----------------------------------------------------------------------------------------------- other commands


def test_import_of_a_truncated_file_leaves_no_store(env):
    bad = env.save("cut.safetensors", good_tensors(21))
    bad.write_bytes(bad.read_bytes()[:-3])
    store = env.outdir / "store"
    env.refused(["import", bad, store], bad.name, out=store)


def test_inspect_of_a_corrupt_file(env):
    header, data = safetensors_parts(good_tensors(22))
    bad = write_raw(env.inp / "huge.safetensors", header, data, length=2**60)
    env.refused(["inspect", bad], bad.name)
    env.refused(["inspect", bad, "--json"], bad.name)


@pytest.mark.parametrize("case", ["nan-in-data-pass", "overlapping-header"])
def test_real_process_prints_one_line_and_exits_2(env, case):
    """The CLI in its own process: exit status 2 and one line on stderr, nothing more."""
    t = good_tensors(23)
    if case == "nan-in-data-pass":
        t["w"][7, 3] = float("nan")
        bad = env.save("bad.safetensors", t)
    else:
        header, data = safetensors_parts(t)
        header["w"]["data_offsets"] = [40, 168]
        bad = write_raw(env.inp / "bad.safetensors", header, data)
    before = tree(env.inp)
    proc = subprocess.run([sys.executable, "-c", "from blockmerge.cli import main; main()",
                           *map(str, env.merge_args(env.a, bad))], capture_output=True, timeout=120)
    stderr = proc.stderr.decode()  # bytes: text mode would turn a progress bar's carriage returns into newlines
    assert_one_error_line(proc.returncode, stderr, (bad.name,), stderr)
    assert tree(env.inp) == before
    assert list(env.outdir.iterdir()) == []


# ----------------------------------------------------------------------------------------------- Python API


def test_refused_file_does_not_close_someone_elses_descriptor(env):
    """A file refused while opening must close its descriptor once: closing it again later (when the
    half-built reader is collected) would close whatever file reused that descriptor number."""
    header, data = safetensors_parts(good_tensors(28))
    header["w"]["data_offsets"] = [40, 168]
    bad = write_raw(env.inp / "overlap.safetensors", header, data)
    caught = None
    try:
        api.inspect(bad)
    except BlockmergeError as err:
        caught = err  # keeps the traceback, and with it the half-built reader, alive
    assert caught is not None
    fd = os.open(env.a, os.O_RDONLY)  # most likely reuses the descriptor number the reader closed
    hook_calls = []
    saved = sys.unraisablehook
    sys.unraisablehook = hook_calls.append
    try:
        del caught
        gc.collect()
    finally:
        sys.unraisablehook = saved
    try:
        os.fstat(fd)
        still_open = True
    except OSError:
        still_open = False
    if still_open:
        os.close(fd)
    assert still_open, "an unrelated open file was closed by a refused reader's finalizer"
    assert not hook_calls, [f"{h.exc_type.__name__}: {h.exc_value}" for h in hook_calls]



def assert_api_error(err: pytest.ExceptionInfo, *needles: str) -> None:
    message = str(err.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


def test_api_truncated_file(env):
    bad = env.save("cut.safetensors", good_tensors(24))
    bad.write_bytes(bad.read_bytes()[:-10])
    with pytest.raises(BlockmergeError) as err:
        blockmerge.merge("average", [env.a, bad], out=env.out)
    assert_api_error(err, bad.name)
    assert list(env.outdir.iterdir()) == []
    with pytest.raises(BlockmergeError) as err:
        api.convert(bad, env.outdir / "store")
    assert_api_error(err, bad.name)
    assert list(env.outdir.iterdir()) == []


def test_api_non_finite_in_memory_model(env):
    bad = good_tensors(25)
    bad["w"][0, 0] = float("inf")
    with pytest.raises(BlockmergeError) as err:
        blockmerge.merge("average", [good_tensors(1), bad], out=env.out)
    assert_api_error(err, "models[1]", "'w'")
    assert list(env.outdir.iterdir()) == []
    with pytest.raises(BlockmergeError) as err:
        blockmerge.merge("average", [good_tensors(1), bad])
    assert_api_error(err, "models[1]", "'w'")


def test_api_mismatched_shapes(env):
    t = good_tensors(26)
    t["b"] = torch.zeros(2, 2)
    bad = env.save("shape.safetensors", t)
    with pytest.raises(BlockmergeError) as err:
        blockmerge.merge("ties", [env.a, bad], base=env.base, out=env.out)
    assert_api_error(err, bad.name, "'b'")
    assert list(env.outdir.iterdir()) == []


def test_api_hyperparameters(env):
    with pytest.raises(BlockmergeError) as err:
        blockmerge.merge("ties", [env.a, env.b], base=env.base, densty=0.2)
    assert_api_error(err, "densty")
    with pytest.raises(BlockmergeError) as err:
        blockmerge.merge("ties", [env.a, env.b], base=env.base, density=2.0)
    assert_api_error(err, "density")
    with pytest.raises(BlockmergeError) as err:
        blockmerge.merge("task_arithmetic", [env.a, env.b])
    assert_api_error(err, "base")
    with pytest.raises(BlockmergeError) as err:
        blockmerge.merge("nosuchmethod", [env.a, env.b])
    assert_api_error(err, "nosuchmethod")


def test_api_duplicate_names_and_escaping_store(env):
    header, data = safetensors_parts(good_tensors(27))
    text = "{" + ",".join([*(f'"{n}":{json.dumps(i)}' for n, i in header.items()), f'"b":{json.dumps(header["b"])}'])
    bad = write_raw(env.inp / "dup.safetensors", text + "}", data)
    with pytest.raises(BlockmergeError) as err:
        api.inspect(bad)
    assert_api_error(err, bad.name, "'b'")

    store = make_store(env)
    manifest = json.loads(manifest_path(store).read_text())
    manifest["tensors"][0]["path"] = "../../x"
    manifest_path(store).write_text(json.dumps(manifest))
    with pytest.raises(BlockmergeError) as err:
        api.convert(store, env.outdir / "x.safetensors")
    assert_api_error(err, store.name)
    assert list(env.outdir.iterdir()) == []


def test_api_store_checksum_mismatch(env):
    store = make_store(env)
    manifest = json.loads(manifest_path(store).read_text())
    array = store / next(e["path"] for e in manifest["tensors"] if e["name"] == "b")
    chunk = next(p for p in (array / "c").rglob("*") if p.is_file())
    data = bytearray(chunk.read_bytes())
    data[0] ^= 0x01
    chunk.write_bytes(bytes(data))
    with pytest.raises(BlockmergeError) as err:
        blockmerge.merge("average", [env.a, store], out=env.outdir / "m")
    assert_api_error(err, store.name, "'b'")
    assert list(env.outdir.iterdir()) == []
