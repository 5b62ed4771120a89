"""Loader: project open_clip configs, checkpoint round trips, hub names, presets."""
import numpy as np
import pytest
import torch
from PIL import Image

from matcher.presets import PRESETS, resolve_preset
from matcher.registry import load_encoder
from matcher.models.openclip import OpenClipEncoder, save_open_clip_checkpoint, validate_pretrained

TINY = "open_clip:matcher-tiny-vit"


def test_tiny_open_clip_config_encodes_unit_vectors():
    encoder = load_encoder(TINY)
    images = [Image.new("RGB", (90, 70), (200, 30, 30)), Image.new("RGB", (50, 50), (10, 10, 240))]
    img, txt = encoder.encode_images(images), encoder.encode_texts(["a red square", "a blue square", "x"])
    assert img.shape == (2, 32) and txt.shape == (3, 32)
    assert np.allclose(np.linalg.norm(img, axis=1), 1, atol=1e-5)
    assert np.allclose(np.linalg.norm(txt, axis=1), 1, atol=1e-5)


def test_open_clip_checkpoint_round_trip(tmp_path):
    original = OpenClipEncoder("matcher-tiny-vit", seed=1)
    path = tmp_path / "tiny.pt"
    save_open_clip_checkpoint(original, path)
    restored = load_encoder(f"open_clip:matcher-tiny-vit@{path}")  # different seed: weights must come from file
    other = OpenClipEncoder("matcher-tiny-vit", seed=2)
    texts = ["a dog on grass", "two people"]
    assert np.allclose(original.encode_texts(texts), restored.encode_texts(texts), atol=1e-6)
    assert not np.allclose(original.encode_texts(texts), other.encode_texts(texts), atol=1e-3)
    for a, b in zip(original.module.state_dict().values(), restored.module.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("role_spec", sorted({s for roles in PRESETS.values() for s in roles.values() if s.startswith("open_clip:")}))
def test_preset_hub_names_are_valid_open_clip_pretrained_tags(role_spec):
    model, _, tag = role_spec[len("open_clip:"):].partition("@")
    validate_pretrained(model, tag)  # raises if open_clip does not know the pair


def test_bad_names_fail_fast_with_choices(tmp_path):
    with pytest.raises(ValueError, match="choose one of: .*dfn2b"):
        validate_pretrained("ViT-L-14", "dfn2x")
    with pytest.raises(ValueError, match="unknown open_clip model"):
        load_encoder("open_clip:ViT-Nope@openai")
    with pytest.raises(FileNotFoundError):
        load_encoder(f"open_clip:matcher-tiny-vit@{tmp_path / 'missing.pt'}")
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        load_encoder("nope")
    with pytest.raises(ValueError, match="unknown preset"):
        resolve_preset("fast")
