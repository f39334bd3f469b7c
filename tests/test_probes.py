"""Tests of the probe sets: ConceptShapes, the Dataset/folder adapters and hashing."""

import io
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tb_conceptevo.probes import (
    ConceptShapes,
    ConceptVocabulary,
    DatasetProbe,
    ImageFolderProbe,
    ProbeSet,
    content_hash,
)
from tb_conceptevo.probes.concept_shapes import _PALETTE

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shapes():
    return ConceptShapes(n=300, size=64, seed=0)


# ------------------------------------------------------------------ ConceptShapes
def test_same_seed_same_bytes_other_seed_other_images(shapes):
    again = ConceptShapes(n=300, size=64, seed=0)
    assert np.array_equal(shapes.raw_images(range(300)), again.raw_images(range(300)))
    other = ConceptShapes(n=300, size=64, seed=1)
    differing = (other.raw_images(range(300)) != shapes.raw_images(range(300))).any(axis=(1, 2, 3))
    assert differing.all()


def test_image_depends_only_on_seed_index_and_size(shapes):
    bigger = ConceptShapes(n=1000, seed=0)
    assert np.array_equal(bigger.raw_images(range(300)), shapes.raw_images(range(300)))
    assert np.array_equal(bigger.shape_ids[:300], shapes.shape_ids)
    # any subset, any order, with or without the cache: the same bytes
    uncached = ConceptShapes(n=1000, seed=0, cache=False)
    order = [299, 5, 17, 5, 0]
    assert np.array_equal(uncached.raw_images(order), shapes.raw_images(range(300))[order])
    assert np.array_equal(uncached.shape_masks(order), shapes.shape_masks(order))


def test_getitem_returns_float_image_and_shape_label(shapes):
    image, label = shapes[7]
    assert image.dtype == torch.float32 and image.shape == (3, 64, 64)
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert torch.equal((image * 255).round().byte().permute(1, 2, 0), torch.from_numpy(shapes.raw_images([7])[0]))
    assert label == shapes.shape_ids[7]
    assert shapes.class_names == list(ConceptShapes.SHAPES)
    assert shapes[-1][1] == shapes.labels[-1]
    batch = shapes.images([3, 7])
    assert torch.equal(batch[1], image)
    normalised = ConceptShapes(n=10, transform=lambda x: x * 2 - 1)
    assert normalised[7][0].min() < 0 and torch.allclose(normalised[7][0], image * 2 - 1)
    assert torch.allclose(normalised.images([7])[0], image * 2 - 1)


def test_vocabulary_and_factors_cover_everything(shapes):
    vocabulary = shapes.vocabulary
    assert isinstance(vocabulary, ConceptVocabulary)
    assert len(vocabulary) == 26 and len(set(vocabulary.names)) == 26
    for category, members in (("shape", 6), ("colour", 7), ("texture", 6), ("position", 5), ("size", 2)):
        assert vocabulary.categories.count(category) == members
    assert vocabulary.categories[vocabulary.index("striped")] == "texture"
    assert vocabulary.categories[vocabulary.index("orange")] == "colour"
    big = ConceptShapes(n=2000, seed=3)
    for ids, count in ((big.shape_ids, 6), (big.colour_ids, 7), (big.texture_ids, 6)):
        frequencies = np.bincount(ids, minlength=count) / len(ids)
        assert frequencies.min() > 0.6 / count  # roughly balanced, every value present


def test_masks_agree_with_the_pixels(shapes):
    indices = torch.arange(0, 300, 3)
    masks = shapes.masks(indices)
    vocabulary = shapes.vocabulary
    assert masks.dtype == torch.bool and masks.shape == (100, 26, 64, 64)
    images = shapes.raw_images(indices).astype(np.int32)
    shape_mask = shapes.shape_masks(indices)
    palette = np.array(list(_PALETTE.values()), np.float64)
    palette_directions = palette / np.linalg.norm(palette, axis=1, keepdims=True)
    for row, i in enumerate(indices.tolist()):
        shape_concept = vocabulary.index(shapes.SHAPES[shapes.shape_ids[i]])
        colour_concept = vocabulary.index(shapes.COLOURS[shapes.colour_ids[i]])
        texture_concept = vocabulary.index(shapes.TEXTURES[shapes.texture_ids[i]])
        on_shape = masks[row, shape_concept].numpy()
        assert on_shape.sum() > 30
        assert np.array_equal(masks[row, colour_concept].numpy(), on_shape)
        assert np.array_equal(masks[row, texture_concept].numpy(), ~on_shape)
        assert masks[row].any(dim=(1, 2)).sum() >= 3  # shape + colour + texture (+ position/size)
        # shape pixels all carry the image's shape colour, whose hue is the named colour
        shape_pixels = images[row][on_shape]
        assert (shape_pixels == shapes.shape_colours[i]).all()
        direction = shapes.shape_colours[i] / np.linalg.norm(shapes.shape_colours[i])
        assert np.argmax(palette_directions @ direction) == shapes.colour_ids[i]
        # background pixels are greyish and far from the shape colour
        background = images[row][~on_shape]
        assert np.abs(background - shapes.shape_colours[i].astype(np.int32)).sum(axis=1).min() > 60
        assert background.max() <= 160
        assert np.array_equal(shape_mask[row], on_shape)


def test_shape_geometry_and_textures_are_what_they_claim():
    probe = ConceptShapes(n=600, size=64, seed=5)
    masks = probe.shape_masks(range(600))
    images = probe.raw_images(range(600))
    radius_px = probe.radii * 64
    area = masks.sum(axis=(1, 2))
    centre_y = np.clip((probe.centres[:, 1] * 64).astype(int), 0, 63)
    centre_x = np.clip((probe.centres[:, 0] * 64).astype(int), 0, 63)
    centre_on = masks[np.arange(600), centre_y, centre_x]
    circles = probe.shape_ids == probe.SHAPES.index("circle")
    expected = np.pi * (0.85 * radius_px[circles]) ** 2
    assert np.allclose(area[circles], expected, rtol=0.12)
    rings = probe.shape_ids == probe.SHAPES.index("ring")
    assert not centre_on[rings].any() and centre_on[~rings].all()  # only rings have a hole
    squares = probe.shape_ids == probe.SHAPES.index("square")
    assert np.allclose(area[squares], (1.44 * radius_px[squares]) ** 2, rtol=0.12)
    # plain backgrounds have one colour, every other texture at least two
    background_colours = np.array(
        [len(np.unique(images[i][~masks[i]], axis=0)) for i in range(0, 600, 7)]
    )
    plain = probe.texture_ids[::7] == probe.TEXTURES.index("plain")
    assert (background_colours[plain] == 1).all() and (background_colours[~plain] >= 2).all()


def test_concept_presence_matches_masks_and_annotations(shapes):
    indices = torch.arange(40)
    presence = shapes.concept_presence(indices)
    assert presence.dtype == torch.float32 and presence.shape == (40, 26)
    assert torch.equal(presence.bool(), shapes.masks(indices).any(dim=(2, 3)))
    names = shapes.vocabulary.names
    annotation = shapes.annotations(4)
    assert set(annotation["concepts"]) == {names[c] for c in torch.nonzero(presence[4]).flatten().tolist()}
    assert annotation["shape"] == shapes.SHAPES[shapes.shape_ids[4]]
    cx, cy = annotation["centre"]
    assert ("left" in annotation["concepts"]) == (cx < 1 / 3)
    assert ("bottom" in annotation["concepts"]) == (cy > 2 / 3)


def test_label_options_and_label_noise():
    clean = ConceptShapes(n=2000, seed=2)
    noisy = ConceptShapes(n=2000, seed=2, label_noise=0.3)
    assert np.array_equal(clean.raw_images(range(50)), noisy.raw_images(range(50)))
    changed = (clean.labels != noisy.labels).mean()
    assert 0.2 < changed < 0.3  # 30% redrawn, 5 in 6 of those change
    assert np.array_equal(ConceptShapes(n=50, seed=2, label="colour").labels, clean.colour_ids[:50])
    assert ConceptShapes(n=5, label="texture").class_names == list(ConceptShapes.TEXTURES)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n": 0}, "n must be an int >= 1"),
        ({"size": 4}, "size must be an int >= 16"),
        ({"seed": -1}, "seed must be an int >= 0"),
        ({"label": "angle"}, "label must be one of"),
        ({"label_noise": 1.5}, "label_noise must be in"),
    ],
)
def test_concept_shapes_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ConceptShapes(**kwargs)


def test_out_of_range_indices_raise(shapes):
    with pytest.raises(IndexError, match=r"in \[0, 300\)"):
        shapes.raw_images([0, 300])
    with pytest.raises(TypeError):
        shapes.masks([0.5])


def test_other_sizes_rescale_the_same_scene():
    small, large = ConceptShapes(n=20, size=32), ConceptShapes(n=20, size=128)
    assert small.raw_images([0]).shape == (1, 32, 32, 3)
    ratio = large.shape_masks(range(20)).sum(axis=(1, 2)) / small.shape_masks(range(20)).sum(axis=(1, 2))
    assert np.allclose(ratio, 16, rtol=0.25)


# ------------------------------------------------------------------ hashing
def test_hash_is_stable_across_processes(shapes):
    script = textwrap.dedent(
        """
        from tb_conceptevo.probes import ConceptShapes
        print(ConceptShapes(n=300, size=64, seed=0).hash)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO_ROOT, check=True,
        env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin", "PYTHONHASHSEED": "123"},
    )
    assert result.stdout.strip() == shapes.hash
    assert len(shapes.hash) == 64 and int(shapes.hash, 16) >= 0


def test_hash_changes_with_any_pixel_order_or_count(shapes):
    images = shapes.raw_images(range(20))
    reference = content_hash(images)
    assert reference == content_hash(images.copy()) == ConceptShapes(n=20).hash
    changed = images.copy()
    changed[13, 40, 2, 1] ^= 1
    assert content_hash(changed) != reference
    assert content_hash(images[[1, 0] + list(range(2, 20))]) != reference
    assert content_hash(images[:19]) != reference
    # float content is hashed differently from the same values in uint8
    as_float = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    assert content_hash(as_float) != reference
    assert ConceptShapes(n=20, seed=1).hash != reference
    assert ConceptShapes(n=20, size=32).hash != reference


def test_hash_is_cached_and_chunking_does_not_matter():
    probe = ConceptShapes(n=50)
    first = content_hash(probe, chunk_size=7)
    assert probe._content_hash_cache == first
    assert content_hash(ConceptShapes(n=50), chunk_size=256) == first


def test_generic_probeset_hash_uses_float_images():
    class Tiny(ProbeSet):
        def __init__(self, images):
            self.images = images

        def __len__(self):
            return len(self.images)

        def __getitem__(self, index):
            return self.images[index], -1

        @property
        def hash(self):
            return content_hash(self)

    images = torch.rand(5, 3, 8, 8)
    assert Tiny(images).hash == content_hash(images)
    assert Tiny(images.flip(0)).hash != Tiny(images).hash


# ------------------------------------------------------------------ adapters
def test_dataset_probe_on_fake_data():
    torchvision = pytest.importorskip("torchvision")
    fake = torchvision.datasets.FakeData(12, image_size=(3, 24, 20), num_classes=3, random_offset=7)
    probe = DatasetProbe(fake, n=10)
    assert len(probe) == 10 and probe.image_size == (24, 20)
    image, label = probe[4]
    assert image.shape == (3, 24, 20) and image.dtype == torch.float32
    assert label == int(fake[4][1])
    raw = probe.raw_images([4, 0])
    assert raw.dtype == np.uint8 and np.array_equal(raw[0], np.asarray(fake[4][0]))
    assert probe.labels.tolist() == [int(fake[i][1]) for i in range(10)]
    assert probe.hash == content_hash(np.stack([np.asarray(fake[i][0]) for i in range(10)]))
    assert probe.hash == DatasetProbe(fake, n=10).hash


def test_dataset_probe_on_tensor_dataset_and_transform():
    images = torch.rand(6, 3, 16, 16)
    data = torch.utils.data.TensorDataset(images, torch.tensor([0, 1, 2, 0, 1, 2]))
    probe = DatasetProbe(data, transform=lambda x: x - 0.5, class_names=["a", "b", "c"])
    assert torch.allclose(probe[2][0], images[2] - 0.5) and probe[2][1] == 2
    assert probe.labels.tolist() == [0, 1, 2, 0, 1, 2] and probe.class_names == ["a", "b", "c"]
    assert probe.hash == content_hash(images)  # float sources hash their float32 bytes
    assert np.array_equal(probe.raw_images([1])[0], np.round(images[1].permute(1, 2, 0).numpy() * 255))
    # bare images, grayscale, channels-last uint8, dict items
    bare = DatasetProbe([torch.rand(1, 8, 8) for _ in range(3)])
    assert bare[0][0].shape == (3, 8, 8) and bare[0][1] == -1 and bare.labels is None
    hwc = DatasetProbe([np.full((8, 8, 3), 255, np.uint8)])
    assert hwc[0][0].shape == (3, 8, 8) and hwc[0][0].min() == 1.0
    dicts = DatasetProbe([{"img": torch.rand(3, 8, 8), "label": 4}])
    assert dicts[0][1] == 4


def test_dataset_probe_errors_are_clear():
    with pytest.raises(ValueError, match="dataset is empty"):
        DatasetProbe(torch.utils.data.TensorDataset(torch.zeros(0, 3, 8, 8)))
    mixed = [torch.rand(3, 8, 8), torch.rand(3, 8, 8), torch.rand(3, 9, 8)]
    probe = DatasetProbe(mixed)
    with pytest.raises(ValueError, match=r"image 2 has size \(9, 8\) but image 0 has \(8, 8\)"):
        probe.hash
    with pytest.raises(ValueError, match="n=5 exceeds the dataset length 3"):
        DatasetProbe(mixed, n=5)
    with pytest.raises(TypeError, match="probe item 0: expected a PIL image"):
        DatasetProbe(["not an image"])
    with pytest.raises(KeyError, match="image_key="):
        DatasetProbe([{"pixels": torch.rand(3, 8, 8)}])
    with pytest.warns(UserWarning, match="outside \\[0, 1\\]"):
        DatasetProbe([torch.randn(3, 8, 8) * 5])[0]


def _write_png(path: Path, colour, size):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_image_folder_probe_with_classes(tmp_path):
    _write_png(tmp_path / "dogs" / "b.png", (0, 0, 255), (40, 30))
    _write_png(tmp_path / "cats" / "z.PNG", (255, 0, 0), (30, 50))
    _write_png(tmp_path / "cats" / "deep" / "a.png", (0, 255, 0), (32, 32))
    (tmp_path / "cats" / "notes.txt").write_text("not an image")
    _write_png(tmp_path / ".hidden" / "x.png", (1, 2, 3), (8, 8))
    probe = ImageFolderProbe(tmp_path, size=16)
    assert probe.files == ["cats/deep/a.png", "cats/z.PNG", "dogs/b.png"]
    assert probe.class_names == ["cats", "dogs"] and probe.labels.tolist() == [0, 0, 1]
    raw = probe.raw_images([0, 1, 2])
    assert raw.shape == (3, 16, 16, 3)
    assert (raw[0] == (0, 255, 0)).all() and (raw[1] == (255, 0, 0)).all() and (raw[2] == (0, 0, 255)).all()
    image, label = probe[2]
    assert image.shape == (3, 16, 16) and label == 1
    assert probe.hash == content_hash(raw)
    # a second instance (fresh decode) hashes the same; another order does not
    assert ImageFolderProbe(tmp_path, size=16, cache=False).hash == probe.hash
    assert ImageFolderProbe(tmp_path, size=16, n=2).hash != probe.hash


def test_image_folder_probe_flat_folder_and_crop(tmp_path):
    image = np.zeros((20, 40, 3), np.uint8)
    image[:, :10] = 255  # the left quarter is cropped away by the centre crop
    Image.fromarray(image).save(tmp_path / "wide.png")
    _write_png(tmp_path / "sub" / "other.jpg", (9, 9, 9), (20, 20))
    probe = ImageFolderProbe(tmp_path, size=20)
    assert probe.class_names is None and probe.labels is None and probe[0][1] == -1
    assert probe.files == ["sub/other.jpg", "wide.png"]
    assert probe.raw_images([1])[0].max() < 20
    assert ImageFolderProbe(tmp_path, size=20, recursive=False).files == ["wide.png"]


def test_image_folder_probe_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="no image files"):
        ImageFolderProbe(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderProbe(tmp_path / "missing")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    (tmp_path / "empty.jpg").write_bytes(b"")
    _write_png(tmp_path / "fine.png", (1, 2, 3), (8, 8))
    with pytest.raises(ValueError, match=r"(?s)2 of 3 files .*not readable.*broken\.png.*empty\.jpg") as error:
        ImageFolderProbe(tmp_path)
    assert "fine.png" not in str(error.value)
    # a file whose header is fine but whose pixels are cut off is named when decoded
    (tmp_path / "broken.png").unlink()
    (tmp_path / "empty.jpg").unlink()
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (5, 6, 7)).save(buffer, format="PNG")
    (tmp_path / "cut.png").write_bytes(buffer.getvalue()[:60])
    probe = ImageFolderProbe(tmp_path)
    with pytest.raises(ValueError, match="cannot read image .*cut.png"):
        probe[0]


def test_image_modes_are_converted_as_a_viewer_shows_them(tmp_path):
    """16-bit scaled (not white), palette, transparency on the stated background, CMYK."""
    gray16 = (np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 257).astype(np.uint16)  # 0..65535 steps of 257
    Image.fromarray(gray16).save(tmp_path / "a_gray16.png")
    assert Image.open(tmp_path / "a_gray16.png").mode.startswith("I")
    palette = Image.new("P", (16, 16), 0)
    palette.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    palette.paste(1, (0, 0, 8, 16))
    palette.save(tmp_path / "b_palette.png")
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, :8, 3] = 255  # left half opaque red, right half transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "c_alpha.png")
    transparent_palette = palette.copy()
    transparent_palette.info["transparency"] = 0
    transparent_palette.save(tmp_path / "d_palette_transparent.png", transparency=0)
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "e_cmyk.tif")  # pure red in CMYK
    Image.fromarray(np.full((16, 16), 77, np.uint8), "L").convert("LA").save(tmp_path / "f_la.png")

    probe = ImageFolderProbe(tmp_path, size=16)
    assert probe.files == ["a_gray16.png", "b_palette.png", "c_alpha.png", "d_palette_transparent.png",
                           "e_cmyk.tif", "f_la.png"]
    raw = probe.raw_images(range(6)).astype(np.int64)
    expected_gray = (gray16.astype(np.int64) * 255 + 32767) // 65535
    assert np.array_equal(expected_gray, np.arange(256).reshape(16, 16))
    assert all(np.array_equal(raw[0][..., c], expected_gray) for c in range(3))  # 16 bit: mean 127.5, not 255
    assert (raw[1][:, :8] == (200, 100, 50)).all() and (raw[1][:, 8:] == (10, 20, 30)).all()
    assert (raw[2][:, :8] == (200, 0, 0)).all() and (raw[2][:, 8:] == 255).all()  # white background
    assert (raw[3][:, :8] == (200, 100, 50)).all() and (raw[3][:, 8:] == 255).all()
    assert (raw[4] == (255, 0, 0)).all()
    assert (raw[5] == 77).all()
    black = ImageFolderProbe(tmp_path, size=16, background=(0, 0, 0)).raw_images([2]).astype(np.int64)[0]
    assert (black[:, :8] == (200, 0, 0)).all() and (black[:, 8:] == 0).all()
    with pytest.raises(ValueError, match="background must be"):
        ImageFolderProbe(tmp_path, background=(0, 0, 256))


def test_grayscale_model_input_and_16_bit_arrays():
    gray = torch.arange(64, dtype=torch.uint8).reshape(1, 8, 8)
    probe = DatasetProbe([gray, gray.flip(-1)], channels=1)
    image, _ = probe[0]
    assert image.shape == (1, 8, 8) and torch.equal(image, gray.float() / 255)
    assert probe.raw_images([0]).shape == (1, 8, 8, 3)  # thumbnails stay RGB
    assert probe.hash == DatasetProbe([gray, gray.flip(-1)]).hash  # same images, same hash
    colour = DatasetProbe([np.full((5, 5, 3), (255, 0, 0), np.uint8)], channels=1)[0][0]
    assert torch.allclose(colour, torch.full((1, 5, 5), 0.299))
    wide = np.full((4, 4), 65535, np.uint16)
    assert torch.equal(DatasetProbe([wide])[0][0], torch.ones(3, 4, 4))
    with pytest.raises(ValueError, match="channels must be 1"):
        DatasetProbe([gray], channels=2)


def test_probe_grid_png_is_written(tmp_path):
    """Keeps the visual check reproducible: a grid of 64 images."""
    probe = ConceptShapes(n=64)
    grid = probe.raw_images(range(64)).reshape(8, 8, 64, 64, 3).transpose(0, 2, 1, 3, 4).reshape(512, 512, 3)
    path = tmp_path / "grid.png"
    Image.fromarray(grid).save(path)
    assert np.array_equal(np.asarray(Image.open(path)), grid)


def test_mask_codes_are_the_packed_masks():
    probe = ConceptShapes(n=30, size=24, seed=4)
    indices = torch.arange(30)
    masks = probe.masks(indices).long()
    packed = (masks << torch.arange(masks.shape[1])[None, :, None, None]).sum(dim=1)
    assert torch.equal(probe.mask_codes(indices), packed)
