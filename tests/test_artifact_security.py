"""Model artifacts and weights files made by an attacker: refused, and nothing in them is executed.

The content hash of an artifact detects accidents (truncation, bit rot, a hand edit), not an
attacker: anyone can recompute it. So a crafted file with a *valid* hash must still be refused when
its metadata is nonsense, and no file may make a loader run code (pickle) or allocate without bound.
The loader's own truncated / tampered / other-version cases are in ``test_artifact.py``; here are
the hostile ones, and the model registry (the way artifacts enter a running deployment) refusing
all of them without storing anything.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis
import torch
from registry_helpers import tiny_artifact
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from dfm_stream import keys
from dfm_stream.artifact import _META_KEY, ArtifactInfo, _content_hash, load_artifact, read_info
from dfm_stream.errors import ArtifactError, RegistryError, WeightsError
from dfm_stream.model import DFMModel
from dfm_stream.model.backbone import read_weights_file
from dfm_stream.registry import ModelRegistry


class _Payload:
    """Unpickling this creates ``marker`` (a harmless stand-in for running arbitrary code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def _evil_torch_file(path: Path, marker: Path) -> Path:
    """A torch (zip + pickle) file whose unpickling would create ``marker``."""
    torch.save({"conv1.weight": torch.zeros(1), "x": _Payload(marker)}, path)
    return path


def _payload_is_live(path: Path, marker: Path) -> bool:
    """Control: unpickle the file the unsafe way, in a child process, and see the marker appear.

    This proves the payload used by the tests really executes code when a loader trusts pickle;
    without it, a test that finds "no marker" could be passing only because the payload is inert.
    """
    code = "import sys, torch; torch.load(sys.argv[1], weights_only=False)"
    subprocess.run([sys.executable, "-c", code, str(path)], check=False, capture_output=True, timeout=120)
    live = marker.exists()
    marker.unlink(missing_ok=True)
    return live


def _header(data: bytes) -> tuple[dict[str, Any], bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _with_header(header: dict[str, Any], body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


def _forge(changes: dict[str, Any]) -> bytes:
    """A valid tiny artifact whose metadata gets ``changes``, with the content hash recomputed.

    This is what an attacker can do: the hash is a checksum, not a signature.
    """
    data = tiny_artifact()
    header, body = _header(data)
    meta = json.loads(header["__metadata__"][_META_KEY])
    meta.update(changes)
    tensors = st_load(data)
    known = {f.name for f in dataclasses.fields(ArtifactInfo)} - {"content_hash"}
    info = ArtifactInfo(**{k: v for k, v in meta.items() if k in known})
    meta["content_hash"] = _content_hash(tensors, info)
    header["__metadata__"] = {_META_KEY: json.dumps(meta)}
    return _with_header(header, body)


def test_forged_hash_control_loads_when_metadata_is_sane() -> None:
    """Control for the forgery tests below: a re-hashed but sane change is accepted."""
    fitted = load_artifact(_forge({"threshold": 3.5}))
    assert fitted.info.threshold == 3.5


def test_torch_pickle_renamed_as_artifact_is_refused_without_running_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = _evil_torch_file(tmp_path / "model.dfm", marker)
    assert _payload_is_live(evil, marker), "the control payload must really execute when unpickled"
    with pytest.raises(ArtifactError, match=r"truncated|not a dfm-stream artifact"):
        load_artifact(evil)
    with pytest.raises(ArtifactError):
        read_info(evil)
    assert not marker.exists()


def test_cli_refuses_a_pickle_artifact_with_exit_code_2(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = _evil_torch_file(tmp_path / "model.dfm", marker)
    args = ["score", "--model", str(evil), "--images", str(tmp_path), "--out", str(tmp_path / "o.jsonl")]
    proc = subprocess.run(
        [sys.executable, "-m", "dfm_stream.cli", *args, "--device", "cpu"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "error:" in proc.stderr and str(evil) in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not marker.exists()


def test_pickle_payload_as_metadata_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    blob = pickle.dumps(_Payload(marker)).decode("latin-1")
    data = st_save({"x": torch.zeros(2)}, metadata={_META_KEY: blob})
    with pytest.raises(ArtifactError, match="not a dfm-stream artifact"):
        load_artifact(data)
    assert not marker.exists()


def test_extra_metadata_entries_are_never_interpreted(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    header, body = _header(tiny_artifact())
    header["__metadata__"]["__reduce__"] = pickle.dumps(_Payload(marker)).decode("latin-1")
    header["__metadata__"]["torch"] = "exec(open('/etc/passwd').read())"
    fitted = load_artifact(_with_header(header, body))
    assert fitted.model.fitted
    assert not marker.exists()


def test_unknown_metadata_field_is_refused_even_with_a_valid_hash() -> None:
    with pytest.raises(ArtifactError, match="unknown metadata fields"):
        load_artifact(_forge({"__class__": "os.system"}))


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({"format_version": "1"}, id="version-as-string"),
        pytest.param({"image_size": [100_000, 100_000]}, id="image-size-memory-bomb"),
        pytest.param({"image_size": "x"}, id="image-size-str"),
        pytest.param({"threshold": "0"}, id="threshold-str"),
        pytest.param({"threshold": float("nan")}, id="threshold-nan"),
        pytest.param({"pooling_kernel_size": "x"}, id="pooling-str"),
        pytest.param({"backbone": ["resnet18"]}, id="backbone-list"),
        pytest.param({"n_comps": None}, id="n-comps-null"),
        pytest.param({"mean": ["a", "b", "c"]}, id="mean-strings"),
    ],
)
def test_forged_metadata_with_valid_hash_is_refused(changes: dict[str, Any]) -> None:
    forged = _forge(changes)  # outside pytest.raises: forging itself must work
    with pytest.raises(ArtifactError):
        load_artifact(forged)


@pytest.mark.parametrize("where", ["header", "metadata"])
def test_deeply_nested_json_header_is_refused(where: str) -> None:
    bomb = "[" * 100_000 + "]" * 100_000
    if where == "header":
        raw = bomb.encode()
        data = struct.pack("<Q", len(raw)) + raw
    else:
        data = _with_header({"__metadata__": {_META_KEY: bomb}}, b"")
    with pytest.raises(ArtifactError):
        load_artifact(data)


def test_header_that_claims_huge_tensors_is_refused_before_allocating() -> None:
    header = {
        "__metadata__": _header(tiny_artifact())[0]["__metadata__"],
        "w": {"dtype": "F32", "shape": [1_000_000, 1_000_000], "data_offsets": [0, 4 * 10**12]},
    }
    with pytest.raises(ArtifactError, match=r"truncated|corrupt"):
        load_artifact(_with_header(header, b"\0" * 64))


def test_header_length_beyond_the_file_is_refused() -> None:
    data = struct.pack("<Q", 2**63) + b"{}"
    with pytest.raises(ArtifactError, match="truncated"):
        load_artifact(data)


def test_weights_file_with_pickled_code_is_refused_and_not_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = _evil_torch_file(tmp_path / "resnet18.pth", marker)
    assert _payload_is_live(evil, marker)
    with pytest.raises(WeightsError, match="cannot read weights file"):
        read_weights_file(evil)
    with pytest.raises(WeightsError):
        DFMModel("resnet18", "layer1", weights=evil)
    assert not marker.exists()


def test_raw_pickle_weights_file_is_refused_and_not_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "weights.bin"
    evil.write_bytes(pickle.dumps({"conv1.weight": _Payload(marker)}, protocol=2))
    with pytest.raises(WeightsError):
        read_weights_file(evil)
    assert not marker.exists()


def test_artifact_info_round_trip_is_strict_about_fields() -> None:
    info = read_info(tiny_artifact())
    data = info.to_json_dict()
    assert ArtifactInfo.from_json_dict(data) == info
    with pytest.raises(ArtifactError, match="unknown metadata fields"):
        ArtifactInfo.from_json_dict({**data, "evil": 1})
    assert dataclasses.asdict(info)["format_version"] == 1


def _tampered() -> bytes:
    data = bytearray(tiny_artifact())
    data[-10] ^= 0xFF
    return bytes(data)


def _other_version() -> bytes:
    header, body = _header(tiny_artifact())
    meta = json.loads(header["__metadata__"][_META_KEY])
    meta["format_version"] = 2
    header["__metadata__"] = {_META_KEY: json.dumps(meta)}
    return _with_header(header, body)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda tmp: tiny_artifact()[: len(tiny_artifact()) // 2], id="truncated"),
        pytest.param(lambda tmp: _tampered(), id="tampered"),
        pytest.param(lambda tmp: _other_version(), id="other-version"),
        pytest.param(
            lambda tmp: _evil_torch_file(tmp / "evil.pth", tmp / "pwned").read_bytes(), id="torch-pickle"
        ),
    ],
)
def test_registry_refuses_bad_artifacts_and_stores_nothing(
    make: Any, tmp_path: Path, redis_client: redis.Redis
) -> None:
    registry = ModelRegistry(redis_client)
    with pytest.raises(RegistryError, match="refused to push model 'evil'"):
        registry.push("evil", make(tmp_path), source="evil.dfm")
    assert not (tmp_path / "pwned").exists()
    assert redis_client.keys("*") == [], "a refused push must not leave anything in Redis"
    registry.push("good", tiny_artifact())  # control: the same registry accepts a good one
    assert redis_client.sismember(keys.models_key(), "good")
