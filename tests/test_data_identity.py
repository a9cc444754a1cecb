"""The identity of the data a run read: the same items give the same digest, any change to the
file list, the labels or the pixels gives another one."""

from __future__ import annotations

import shutil
from pathlib import Path

from PIL import Image

from ratatouille.data import get_dataset
from ratatouille.data.identity import input_record

PACS_DOMAINS = ["art_painting", "cartoon", "photo", "sketch"]


def _write_pacs(root: Path) -> Path:
    for d, domain in enumerate(PACS_DOMAINS):
        for cls in ("dog", "horse"):
            (root / "PACS" / domain / cls).mkdir(parents=True)
            for k in range(2):
                image = Image.new("RGB", (8, 8), (40 * d, 10 * k, 90))
                image.save(root / "PACS" / domain / cls / f"img{k}.png")
    return root


def _pacs_record(root: Path, domains=(0, 1, 2)) -> dict:
    return input_record(get_dataset("PACS", root, image_size=8), list(domains), 0, 0.2)


def test_a_record_names_the_dataset_domains_split_and_item_count():
    digits = get_dataset("digits", seed=0)
    record = input_record(digits, [0, 3], split_seed=2, holdout_fraction=0.2)
    assert record["name"] == "digits"
    assert record["domains"] == [digits.domains[0], digits.domains[3]]
    assert (record["split_seed"], record["holdout_fraction"]) == (2, 0.2)
    assert record["items"] == digits.domain_size(0) + digits.domain_size(3)
    assert len(record["sha256"]) == 64 and record["source_type"] == "code"


def test_the_embedded_digest_follows_the_pixels_not_the_augmentation():
    record = input_record(get_dataset("digits", seed=0), [0, 1], 0, 0.2)
    augment_off = input_record(get_dataset("digits", seed=0, augment=False), [0, 1], 0, 0.2)
    assert augment_off["sha256"] == record["sha256"]  # the same stored images
    other_seed = input_record(get_dataset("digits", seed=1), [0, 1], 0, 0.2)
    assert other_seed["sha256"] != record["sha256"]  # seed 1 deals other images
    assert (
        input_record(get_dataset("digits", seed=0), [0, 2], 0, 0.2)["sha256"] != (record["sha256"])
    )


def test_a_folder_digest_is_its_file_list_wherever_the_folder_lives(tmp_path):
    first = _write_pacs(tmp_path / "a")
    record = _pacs_record(first)
    assert record["items"] == 3 * 2 * 2 and record["source_type"] == "local"
    assert record["source"] == str(first / "PACS")
    moved = tmp_path / "b"
    shutil.copytree(first, moved)
    assert _pacs_record(moved)["sha256"] == record["sha256"]
    # a file renamed, a file relabelled (moved to another class folder): other items
    photo = moved / "PACS" / "photo"
    (photo / "dog" / "img0.png").rename(photo / "dog" / "img9.png")
    renamed = _pacs_record(moved)["sha256"]
    assert renamed != record["sha256"]
    (photo / "dog" / "img9.png").rename(photo / "horse" / "img9.png")
    assert _pacs_record(moved)["sha256"] not in (record["sha256"], renamed)
    # a domain left out of the record (the held-out one) does not enter its digest
    before = _pacs_record(moved)["sha256"]
    (moved / "PACS" / "sketch" / "dog" / "img0.png").unlink()
    assert _pacs_record(moved)["sha256"] == before
    assert (
        _pacs_record(moved, domains=(3,))["sha256"] != _pacs_record(first, domains=(3,))["sha256"]
    )
