"""Tensor transforms of the embedded benchmark, checked against hand-built images."""

from __future__ import annotations

import torch

from ratatouille.data.transforms import RandomShift, StrongAugment, affine


def _ramp(height: int = 6, width: int = 5) -> torch.Tensor:
    return torch.arange(height * width, dtype=torch.float32).view(1, height, width).repeat(2, 1, 1)


def test_affine_integer_translation_moves_pixels_and_repeats_the_edge() -> None:
    image = _ramp()
    moved = affine(image, translate=(1.0, 0.0))  # content moves one pixel right
    expected = torch.cat([image[:, :, :1], image[:, :, :-1]], dim=2)
    assert torch.allclose(moved, expected, atol=1e-4)


def test_affine_flip_and_quarter_turn_match_tensor_ops() -> None:
    image = torch.rand(3, 7, 7)
    assert torch.allclose(affine(image, flip=True), image.flip(-1), atol=1e-5)
    # Positive angles turn the content clockwise on screen (rows grow downwards).
    assert torch.allclose(
        affine(image, angle_deg=90.0), torch.rot90(image, -1, dims=(1, 2)), atol=1e-5
    )


def test_affine_takes_one_translation_per_image_of_a_batch() -> None:
    batch = torch.stack([_ramp(), _ramp() + 100])
    moved = affine(batch, translate=torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    assert torch.allclose(moved[0], affine(batch[0], translate=(1.0, 0.0)), atol=1e-5)
    assert torch.allclose(moved[1], batch[1], atol=1e-5)


def test_random_shift_is_a_crop_of_the_edge_padded_image() -> None:
    image = _ramp()
    padded = torch.nn.functional.pad(image[None], (2, 2, 2, 2), mode="replicate")[0]
    crops = [padded[:, dy : dy + 6, dx : dx + 5] for dy in range(5) for dx in range(5)]
    seen = set()
    for seed in range(40):
        torch.manual_seed(seed)
        shifted = RandomShift(2)(image)
        matches = [k for k, crop in enumerate(crops) if torch.equal(shifted, crop)]
        assert len(matches) == 1
        seen.add(matches[0])
    assert len(seen) > 10  # the offsets really vary
    assert torch.equal(RandomShift(0)(image), image)


def test_strong_augment_is_reproducible_under_torch_seed_and_keeps_shape() -> None:
    image = torch.rand(3, 16, 16)
    torch.manual_seed(5)
    first = StrongAugment()(image)
    torch.manual_seed(5)
    again = StrongAugment()(image)
    torch.manual_seed(6)
    other = StrongAugment()(image)
    assert first.shape == image.shape
    assert torch.equal(first, again) and not torch.equal(first, other)
