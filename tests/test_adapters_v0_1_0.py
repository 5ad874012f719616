"""Adapters saved by pgp_peft 0.1.0 load with the current code and give the logits 0.1.0 recorded.

The adapters, the fixed input and the logits are in tests/fixtures/adapters_v0_1_0 (written by its
make_adapters.py with 0.1.0); the backbones are rebuilt from that script's name-ordered seeded fill.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pgp_peft import PGPModel

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "adapters_v0_1_0"
sys.path.insert(0, str(FIXTURES))

import make_adapters  # noqa: E402

ADAPTERS = ["l2p", "dualprompt", "l2p_reference", "clip"]


@pytest.fixture(scope="module")
def expected() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURES / "expected_logits.safetensors"))


def load_adapter(name: str, tmp_path: Path, folder: Path | None = None) -> PGPModel:
    """The 0.1.0 fixture `name` (or an adapter of that kind saved in `folder`) on its tiny backbone."""
    folder = folder or FIXTURES / name
    if name == "clip":
        clip, tokenizer = make_adapters.tiny_clip(tmp_path)
        return PGPModel.from_pretrained(folder, base_model=clip, tokenizer=tokenizer)
    return PGPModel.from_pretrained(folder, base_model=make_adapters.tiny_vit())


@pytest.mark.parametrize("name", ADAPTERS)
def test_v0_1_0_adapter_gives_the_recorded_logits(name, expected, tmp_path):
    model = load_adapter(name, tmp_path)
    assert not model.training
    assert model.config.method == json.loads((FIXTURES / name / "config.json").read_text())["method"]
    assert model.num_tasks_seen == 2 and sum(model.memory.ranks().values()) > 0
    with torch.no_grad():
        logits = model(expected["pixel_values"]).logits
    torch.testing.assert_close(logits, expected[f"{name}.logits"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ADAPTERS)
def test_v0_1_0_adapter_saves_back_with_the_same_tensor_names(name, tmp_path):
    """Saved tensor names are the adapter format: a reloaded 0.1.0 adapter writes the same names and values,
    except that a memory basis is now written as its r kept columns (D, r) instead of 0.1.0's zero-padded
    (D, D); it loads back to the same model."""
    model = load_adapter(name, tmp_path / "tokenizer")
    model.save_pretrained(tmp_path / "resaved")
    original = load_file(str(FIXTURES / name / "model.safetensors"))
    resaved = load_file(str(tmp_path / "resaved" / "model.safetensors"))
    assert sorted(resaved) == sorted(original)
    for key in original:
        if key.startswith("memory.basis__"):
            rank = int(original[key.replace("basis__", "rank__")])
            assert resaved[key].shape == (original[key].shape[0], rank)
            assert torch.equal(resaved[key], original[key][:, :rank])
            assert not original[key][:, rank:].any()  # 0.1.0's padding held nothing
        else:
            assert torch.equal(resaved[key], original[key]), key
    reloaded = load_adapter(name, tmp_path / "tokenizer2", folder=tmp_path / "resaved")
    for name_, buffer in model.memory.state_dict().items():
        assert torch.equal(reloaded.memory.state_dict()[name_], buffer), name_
