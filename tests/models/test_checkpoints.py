"""Checkpoint readers and writers: formats, memory maps, corrupt files, hostile pickles."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from models import (
    CheckpointError,
    EmbeddingBag,
    UnsafeCheckpointError,
    list_tensors,
    read_checkpoint,
    write_npy,
    write_safetensors,
)

GOLDEN = Path(__file__).parent.parent / "golden" / "checkpoints"
with np.load(GOLDEN / "expected.npz") as _archive:
    EXPECTED = {name: _archive[name] for name in _archive.files}


def _is_memory_mapped(array: np.ndarray) -> bool:
    base: Any = array
    while base is not None:
        if isinstance(base, (np.memmap,)):
            return True
        base = getattr(base, "base", None)
    return False


@pytest.fixture
def table() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((12, 4)).astype(np.float32)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_torch_save_files_read_without_torch(name: str) -> None:
    array = read_checkpoint(GOLDEN / name)
    np.testing.assert_array_equal(array, EXPECTED[name])
    assert array.flags["C_CONTIGUOUS"]


def test_torch_state_dict_is_memory_mapped() -> None:
    assert _is_memory_mapped(read_checkpoint(GOLDEN / "state_dict.pt"))


def test_nested_torch_names_are_dotted() -> None:
    names = list_tensors(GOLDEN / "nested.pth")
    assert set(names) == {"model.emb.weight", "bias"}
    np.testing.assert_array_equal(read_checkpoint(GOLDEN / "nested.pth", "model.emb.weight"),
                                  EXPECTED["nested.pth"])


def test_safetensors_round_trip_is_memory_mapped(tmp_path: Path, table: np.ndarray) -> None:
    path = tmp_path / "t.safetensors"
    write_safetensors(path, {"weight": table, "ids": np.arange(3)}, {"source": "test"})
    array = read_checkpoint(path, "weight")
    np.testing.assert_array_equal(array, table)
    assert _is_memory_mapped(array)
    assert not array.flags["WRITEABLE"]


def test_safetensors_interoperates_with_reference_library(tmp_path: Path,
                                                          table: np.ndarray) -> None:
    from safetensors.numpy import load_file, save_file

    ours = tmp_path / "ours.safetensors"
    write_safetensors(ours, {"weight": table, "f64": table.astype(np.float64)})
    loaded = load_file(str(ours))
    np.testing.assert_array_equal(loaded["weight"], table)
    np.testing.assert_array_equal(loaded["f64"], table.astype(np.float64))
    theirs = tmp_path / "theirs.safetensors"
    save_file({"a": table.astype(np.float16), "b": np.arange(4, dtype=np.int32)}, str(theirs))
    np.testing.assert_array_equal(read_checkpoint(theirs), table.astype(np.float16)
                                  .astype(np.float32))


def test_single_table_needs_no_name_and_several_list_names(tmp_path: Path,
                                                           table: np.ndarray) -> None:
    one = tmp_path / "one.safetensors"
    write_safetensors(one, {"emb": table, "bias": np.zeros(4, np.float32)})
    np.testing.assert_array_equal(read_checkpoint(one), table)
    two = tmp_path / "two.safetensors"
    write_safetensors(two, {"a": table, "b": table})
    with pytest.raises(CheckpointError, match=r"two.safetensors: holds several 2-D float "
                                              r"tensors; pass tensor=NAME. Available: a "):
        read_checkpoint(two)
    with pytest.raises(CheckpointError, match=r"no tensor named 'c'; available: a \(float32 "
                                              r"\[12, 4\]\), b"):
        read_checkpoint(two, "c")


def test_npy_is_memory_mapped_and_npz_reads_by_key(tmp_path: Path, table: np.ndarray) -> None:
    write_npy(tmp_path / "t.npy", table)
    array = read_checkpoint(tmp_path / "t.npy")
    np.testing.assert_array_equal(array, table)
    assert _is_memory_mapped(array)
    np.savez(tmp_path / "t.npz", table=table, other=table * 2)
    np.testing.assert_array_equal(read_checkpoint(tmp_path / "t.npz", "other"), table * 2)
    with pytest.raises(CheckpointError, match="several 2-D float tensors"):
        read_checkpoint(tmp_path / "t.npz")


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"w": np.zeros(5, np.float32)}, r"tensor 'w' is float32 \[5\]"),
        ({"w": np.zeros((5, 2), np.int64)}, r"tensor 'w' is int64 \[5, 2\]"),
        ({"w": np.zeros(5, np.float32), "v": np.zeros(2, np.int8)},
         r"holds no 2-D float tensor"),
    ],
)
def test_non_tables_are_refused(tmp_path: Path, arrays: dict[str, np.ndarray],
                                message: str) -> None:
    path = tmp_path / "x.safetensors"
    write_safetensors(path, arrays)
    with pytest.raises(CheckpointError, match=message):
        read_checkpoint(path)
    with pytest.raises(CheckpointError, match=r"tensor 'w' is .* an embedding table must be a "
                                              r"2-D float tensor"):
        read_checkpoint(path, "w")


def test_missing_file_and_unknown_format_are_named(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"nope.safetensors: checkpoint not found"):
        read_checkpoint(tmp_path / "nope.safetensors")
    (tmp_path / "t.h5").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"t.h5: unknown checkpoint format '.h5'"):
        read_checkpoint(tmp_path / "t.h5")


def _truncate(path: Path, keep: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:keep])


@pytest.mark.parametrize("keep", [0, 5, 30, -8])
def test_truncated_safetensors_is_named(tmp_path: Path, table: np.ndarray, keep: int) -> None:
    path = tmp_path / "t.safetensors"
    write_safetensors(path, {"weight": table})
    _truncate(path, keep if keep >= 0 else path.stat().st_size + keep)
    with pytest.raises(CheckpointError, match=r"t.safetensors: "):
        read_checkpoint(path)


def test_safetensors_with_lying_offsets_is_refused(tmp_path: Path) -> None:
    header = b'{"w":{"dtype":"F32","shape":[1000000,1000],"data_offsets":[0,16]}}'
    path = tmp_path / "lie.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(16))
    with pytest.raises(CheckpointError, match=r"lie.safetensors: tensor 'w' .* do not fit"):
        read_checkpoint(path)


@pytest.mark.parametrize("name", ["state_dict.pt", "compressed.pt"])
@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.9])
def test_truncated_torch_file_is_named(tmp_path: Path, name: str, fraction: float) -> None:
    path = tmp_path / name
    data = (GOLDEN / name).read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(CheckpointError, match=name):
        read_checkpoint(path)


def test_truncated_npy_and_garbage_npz_are_named(tmp_path: Path, table: np.ndarray) -> None:
    write_npy(tmp_path / "t.npy", table)
    _truncate(tmp_path / "t.npy", 100)
    with pytest.raises(CheckpointError, match=r"t.npy: corrupt or truncated"):
        read_checkpoint(tmp_path / "t.npy")
    (tmp_path / "t.npz").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(CheckpointError, match=r"t.npz: corrupt or truncated"):
        read_checkpoint(tmp_path / "t.npz")


# --- hostile pickles: nothing in the file may run --------------------------------------


def _torch_zip(path: Path, pickled: bytes, extra: dict[str, bytes] | None = None) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", pickled)
        archive.writestr("archive/version", b"3\n")
        for name, data in (extra or {}).items():
            archive.writestr(name, data)


class _SystemCall:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


class _EvalCall:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (eval, (f"open({str(self.marker)!r}, 'w').close()",))


class _NestedGlobal:
    """getattr(__import__('os'), 'system')(...) as nested REDUCEs."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (__import__("builtins").exec,
                (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("payload", [_SystemCall, _EvalCall, _NestedGlobal])
@pytest.mark.parametrize("protocol", [2, 4])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path: Path, payload: type,
                                                    protocol: int) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    _torch_zip(path, pickle.dumps({"weight": payload(marker)}, protocol=protocol))
    with pytest.raises(UnsafeCheckpointError, match=r"evil.pt: refusing to load global "
                                                    r"(posix|os|builtins|__builtin__)\.\w+"):
        read_checkpoint(path)
    assert not marker.exists()


def test_legacy_plain_pickle_is_refused_unread(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "legacy.pt"
    path.write_bytes(pickle.dumps(_SystemCall(marker)))
    with pytest.raises(CheckpointError, match="not a torch.save zip archive"):
        read_checkpoint(path)
    assert not marker.exists()


def test_zip_with_path_traversal_names_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "traversal.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("../../etc/data.pkl", pickle.dumps({}))
    with pytest.raises(CheckpointError, match=r"expected one <root>/data.pkl"):
        read_checkpoint(path)
    assert not (tmp_path.parent.parent / "etc" / "data.pkl").exists()


def test_storage_key_escaping_the_archive_is_refused(tmp_path: Path) -> None:
    # A real state dict whose storage key is rewritten to "../0".
    with zipfile.ZipFile(GOLDEN / "state_dict.pt") as source:
        names = source.namelist()
        root = next(n for n in names if n.endswith("/data.pkl")).split("/")[0]
        pickled = source.read(f"{root}/data.pkl")
        storage = source.read(f"{root}/data/0")
    hacked = pickled.replace(b"X\x01\x00\x00\x000", b"X\x04\x00\x00\x00../0")
    assert hacked != pickled
    path = tmp_path / "escape.pt"
    _torch_zip(path, hacked, {"archive/data/0": storage})
    with pytest.raises(CheckpointError, match=r"storage '\.\./0' is missing from the archive"):
        read_checkpoint(path)


def test_from_checkpoint_builds_a_working_bag(tmp_path: Path, table: np.ndarray) -> None:
    path = tmp_path / "t.safetensors"
    write_safetensors(path, {"weight": table})
    bag = EmbeddingBag.from_checkpoint(path, mode="sum", padding_idx=0)
    np.testing.assert_allclose(bag([0, 1, 2], [0]), [table[1] + table[2]], rtol=1e-6)


HOSTILE = GOLDEN / "hostile"


def test_a_stride0_view_claiming_a_huge_table_is_refused_naming_the_file() -> None:
    with pytest.raises(CheckpointError, match=r"expanded\.pt: tensor of shape "
                                              r"\[1000000000000, 128\] with strides \[0, 1\] "
                                              r"repeats its storage of 128 elements"):
        read_checkpoint(HOSTILE / "expanded.pt")


def test_shared_references_are_walked_once_in_bounded_time() -> None:
    import time

    started = time.perf_counter()
    table = read_checkpoint(HOSTILE / "shared.pt")
    assert time.perf_counter() - started < 5
    np.testing.assert_array_equal(table, np.ones((3, 2), np.float32))


def test_safetensors_shapes_past_64_bits_are_named(tmp_path: Path) -> None:
    import json
    import struct

    header = json.dumps({"w": {"dtype": "F32", "shape": [2**70, 1],
                               "data_offsets": [0, 4]}}).encode()
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    with pytest.raises(CheckpointError, match=r"huge\.safetensors: tensor 'w' \(F32 "
                                              r"\[1180591620717411303424, 1\]\) has data "
                                              r"offsets \[0, 4\] that do not fit"):
        read_checkpoint(path)


def test_npz_members_claiming_more_than_they_hold_are_refused_before_allocating(
        tmp_path: Path) -> None:
    import io
    import zipfile

    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f4", "fortran_order": False,
                                                   "shape": (10**12, 128)})
    path = tmp_path / "claims.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("w.npy", buffer.getvalue() + b"\0" * 64)
    with pytest.raises(CheckpointError, match=r"claims\.npz: array 'w' declares shape "
                                              r"\[1000000000000, 128\] \(512,000,000,000,000 "
                                              r"bytes\) but its member holds"):
        read_checkpoint(path)


def test_npz_decompression_bombs_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "bomb.npz"
    np.savez_compressed(path, w=np.zeros((4200, 1024), np.float32))  # 17 MB -> ~17 KB
    with pytest.raises(CheckpointError, match=r"bomb\.npz: array 'w' inflates .* compressed "
                                              r"bytes to 17,203,328 \(over 64x\)"):
        read_checkpoint(path)
    real = tmp_path / "real.npz"
    np.savez_compressed(real, w=np.random.default_rng(0).standard_normal(
        (4200, 1024)).astype(np.float32))
    assert read_checkpoint(real).shape == (4200, 1024)


def test_npy_errors_say_what_is_wrong_without_numpy_advice(tmp_path: Path) -> None:
    path = tmp_path / "t.npy"
    path.write_bytes(b"random bytes, not an array")
    with pytest.raises(CheckpointError, match="not a .npy file") as info:
        read_checkpoint(path)
    assert "allow_pickle" not in str(info.value)
    np.save(path, np.zeros((4, 2), np.int32))
    with pytest.raises(CheckpointError, match=r"the array is int32 \[4, 2\]; an embedding "
                                              r"table must be a 2-D float tensor"):
        read_checkpoint(path)
