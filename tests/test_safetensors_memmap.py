"""The latent shards' reader (aligntok.data.latents.memmap_safetensors) at the edges of a valid file: a header that
fills the file, a zero-size tensor, a tensor ending exactly at the file's end, read-only maps; and a clear
LatentCacheError, naming what is wrong, for every way a header can lie about the file."""
import json
import struct

import numpy as np
import pytest

from aligntok.data.latents import LatentCacheError, memmap_safetensors


def write(path, header: dict, data: bytes = b"", length: int | None = None):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def test_valid_edges_load(tmp_path):
    # a header that fills the file exactly (no tensors): n == size - 8 is allowed
    assert memmap_safetensors(write(tmp_path / "empty.safetensors", {"__metadata__": {"k": "v"}})) == {}
    data = np.arange(6, dtype="<f4").tobytes()
    header = {"z": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
              "none": {"dtype": "I64", "shape": [0, 4], "data_offsets": [24, 24]}}
    out = memmap_safetensors(write(tmp_path / "a.safetensors", header, data))  # "z" ends exactly at the file's end
    assert out["z"].tolist() == [[0, 1, 2], [3, 4, 5]] and out["z"].dtype == np.float32
    assert not out["z"].flags.writeable  # a map of the cache, never a way to change it
    assert out["none"].shape == (0, 4) and out["none"].dtype == np.int64


@pytest.mark.parametrize("raw, message", [
    (b"\x01\x02\x03", "header length -1 does not fit a 3-byte file"),  # shorter than the 8-byte length
    (struct.pack("<Q", 0) + b"{}", "header length 0 does not fit"),
    (struct.pack("<Q", 3) + b"{}", "header length 3 does not fit a 10-byte file"),  # claims a byte past the end
    (struct.pack("<Q", 2**64 - 1) + b"{}", f"header length {2**64 - 1} does not fit"),  # unsigned, not -1
    (struct.pack("<Q", 1) + b"{", "unreadable header (JSONDecodeError)"),  # n = 1 is a length, just not JSON
])
def test_header_length_that_does_not_fit(tmp_path, raw, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(raw)
    with pytest.raises(LatentCacheError, match=f"{path}: " + message.replace("(", r"\(").replace(")", r"\)")):
        memmap_safetensors(path)


@pytest.mark.parametrize("entry", [
    {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]},   # offsets in the file, 4 bytes short of the shape
    {"dtype": "F32", "shape": [2, 3], "data_offsets": [4, 28]},   # the right length, 4 bytes past the end
    {"dtype": "F32", "shape": [1], "data_offsets": [8, 4]},       # end before begin
])
def test_tensor_offsets_that_do_not_match(tmp_path, entry):
    path = write(tmp_path / "bad.safetensors", {"z": entry}, np.zeros(6, "<f4").tobytes())
    with pytest.raises(LatentCacheError, match="tensor 'z' offsets"):
        memmap_safetensors(path)
