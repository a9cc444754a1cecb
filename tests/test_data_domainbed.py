"""DomainBed ImageFolder layouts, transforms and the missing-data error, on tiny PNG trees."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from ratatouille.data import (
    DATASET_NAMES,
    DOMAINBED_DATASETS,
    DataError,
    DatasetNotFoundError,
    domainbed_eval_transform,
    domainbed_train_transform,
    get_dataset,
)

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def _colour(domain: int, cls: int, k: int) -> tuple[int, int, int]:
    """A solid colour that encodes where an image was written."""
    return (20 + 40 * domain, 20 + 30 * cls, 20 + 50 * k)


def _write_tree(
    root: Path,
    folder: str,
    domains: list[str],
    classes: list[str],
    per_class: int = 2,
    skip: tuple[str, str] | None = None,
) -> None:
    for d, domain in enumerate(domains):
        for c, cls in enumerate(classes):
            if skip == (domain, cls):
                continue
            target = root / folder / domain / cls
            target.mkdir(parents=True)
            for k in range(per_class):
                Image.new("RGB", (13 + k, 9), _colour(d, c, k)).save(target / f"img{k}.png")


def _decode(image: torch.Tensor) -> tuple[int, int, int]:
    """The solid colour of an eval-transformed image, back in 0..255."""
    rgb = (image * STD + MEAN).mean(dim=(1, 2)) * 255
    return tuple(round(v) for v in rgb.tolist())


def test_pacs_tree_loads_sorted_domains_and_labels_items_by_class_folder(tmp_path: Path) -> None:
    domains = ["art_painting", "cartoon", "photo", "sketch"]
    classes = ["dog", "elephant", "giraffe"]
    _write_tree(tmp_path, "PACS", domains, classes)
    pacs = get_dataset("PACS", tmp_path, image_size=8)

    assert pacs.domains == domains
    assert pacs.classes == classes
    assert pacs.num_classes == 3 and len(pacs) == 4
    assert pacs.input_shape == (3, 8, 8)
    for d in range(4):
        assert pacs.domain_size(d) == 6
        items = pacs.domain(d, train=False)
        seen = set()
        for i in range(len(items)):
            image, label = items[i]
            assert image.shape == (3, 8, 8)
            colour = _decode(image)
            c = (colour[1] - 20) // 30
            assert colour[0] == 20 + 40 * d and label == c
            seen.add((label, colour[2]))
        assert seen == {(c, 20 + 50 * k) for c in range(3) for k in range(2)}


def test_office_home_real_world_folder_with_a_space_is_a_domain(tmp_path: Path) -> None:
    domains = ["Art", "Clipart", "Product", "Real World"]
    _write_tree(tmp_path, "office_home", domains, ["Alarm_Clock", "Backpack"], per_class=1)
    office = get_dataset("OfficeHome", str(tmp_path), image_size=6)
    assert office.domains == domains
    assert office.classes == ["Alarm_Clock", "Backpack"]
    image, label = office.domain(3, train=False)[1]
    assert _decode(image)[0] == 20 + 40 * 3 and label == 1


def test_class_missing_from_one_domain_keeps_labels_of_the_others(tmp_path: Path) -> None:
    domains = ["Caltech101", "LabelMe", "SUN09", "VOC2007"]
    classes = ["bird", "car", "chair", "dog", "person"]
    _write_tree(tmp_path, "VLCS", domains, classes, per_class=1, skip=("LabelMe", "bird"))
    vlcs = get_dataset("VLCS", tmp_path, image_size=4)
    assert vlcs.classes == classes
    assert vlcs.domain_size(1) == 4
    labels = sorted(label for _, label in vlcs.domain(1, train=False))
    assert labels == [1, 2, 3, 4]  # "car".."person" keep their indices without "bird"


def test_every_domainbed_dataset_declares_the_download_script_folders() -> None:
    expected = {
        "PACS": ("PACS", ("art_painting", "cartoon", "photo", "sketch")),
        "VLCS": ("VLCS", ("Caltech101", "LabelMe", "SUN09", "VOC2007")),
        "OfficeHome": ("office_home", ("Art", "Clipart", "Product", "Real World")),
        "TerraIncognita": (
            "terra_incognita",
            ("location_100", "location_38", "location_43", "location_46"),
        ),
        "DomainNet": (
            "domain_net",
            ("clipart", "infograph", "painting", "quickdraw", "real", "sketch"),
        ),
    }
    assert {n: (c.FOLDER, c.ENVIRONMENTS) for n, c in DOMAINBED_DATASETS.items()} == expected
    for _, envs in expected.values():
        assert list(envs) == sorted(envs)
    assert set(expected) <= set(DATASET_NAMES)


def test_missing_root_error_names_the_expected_path_and_how_to_get_data(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        get_dataset("TerraIncognita", tmp_path)
    message = str(info.value)
    assert str(tmp_path / "terra_incognita") in message
    assert "domainbed.scripts.download" in message and "'digits'" in message
    assert isinstance(info.value, ValueError) and isinstance(info.value, FileNotFoundError)

    with pytest.raises(DatasetNotFoundError, match="needs a data root"):
        get_dataset("PACS", None)


def test_missing_single_domain_folder_is_named(tmp_path: Path) -> None:
    _write_tree(tmp_path, "PACS", ["art_painting", "cartoon", "photo"], ["dog"], per_class=1)
    with pytest.raises(DatasetNotFoundError, match=r"\['sketch'\]"):
        get_dataset("PACS", tmp_path)


def test_unknown_dataset_name_suggests_the_right_case() -> None:
    with pytest.raises(DataError, match="did you mean 'PACS'"):
        get_dataset("pacs")


def test_eval_transform_resizes_normalises_and_is_deterministic() -> None:
    image = Image.new("RGB", (31, 17), (255, 0, 128))
    out = domainbed_eval_transform(10)(image)
    assert out.shape == (3, 10, 10)
    expected = (torch.tensor([255, 0, 128]) / 255.0 - MEAN.flatten()) / STD.flatten()
    assert torch.allclose(out, expected.view(3, 1, 1).expand(3, 10, 10), atol=1e-5)
    assert torch.equal(out, domainbed_eval_transform(10)(image))


def test_train_transform_crops_to_size_and_is_random_under_torch_rng() -> None:
    image = Image.effect_noise((40, 30), 60).convert("RGB")
    transform = domainbed_train_transform(12)
    torch.manual_seed(3)
    first = transform(image)
    torch.manual_seed(3)
    again = transform(image)
    torch.manual_seed(4)
    other = transform(image)
    assert first.shape == (3, 12, 12)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_train_flag_augments_only_when_dataset_built_with_augment(tmp_path: Path) -> None:
    _write_tree(
        tmp_path, "PACS", ["art_painting", "cartoon", "photo", "sketch"], ["dog"], per_class=1
    )
    plain = get_dataset("PACS", tmp_path, image_size=8, augment=False)
    assert torch.equal(plain.domain(0, train=True)[0][0], plain.domain(0, train=False)[0][0])

    augmented = get_dataset("PACS", tmp_path, image_size=8)
    train_items = augmented.domain(0, train=True)
    assert train_items.transform is not augmented.domain(0, train=False).transform
    assert "RandomResizedCrop" in repr(train_items.transform)
