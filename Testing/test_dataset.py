"""CuratedDataset reader: round trip against the curated sources, filters, and errors for bad folders."""
from __future__ import annotations

import json

import numpy as np
import pytest

from CTReasonerLib.data.curate.config import CurationConfig
from CTReasonerLib.data.curate.pipeline import curate_dataset
from CTReasonerLib.data.curate.sources import VolumeSource
from CTReasonerLib.data.dataset import CuratedDataset, load_dataset_info, load_splits
from CTReasonerLib.errors import ConfigError, InputFileError
from fixtures_curate import make_synthetic_pair


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("curated") / "ds"
    pairs = {f"case{i}": make_synthetic_pair(shape=(20, 64, 72), spacing=(1.8, 2.2, 5.0), seed=i) for i in range(3)}
    curate_dataset([VolumeSource(s, ct, labels) for s, (ct, labels) in pairs.items()], root, CurationConfig(),
                   workers=1, progress=False)
    return root, pairs


def test_reader_round_trip_matches_the_source_volumes(dataset_root):
    root, pairs = dataset_root
    splits = load_splits(root)
    total = 0
    for split in ("train", "val", "test"):
        dataset = CuratedDataset(root, split, include_flagged=True, include_rejected=True)
        assert set(dataset.subjects) <= set(splits[split])
        total += len(dataset)
        for sample in dataset[::7]:
            ct, labels = pairs[sample.subject]
            expected = np.clip(np.rint(ct.array[sample.slice_index]), -1024, 3071).astype(np.int16)
            assert sample.image_hu.dtype == np.int16 and sample.image_hu.shape == (64, 72)
            np.testing.assert_array_equal(sample.image_hu, expected)
            np.testing.assert_array_equal(sample.mask, labels[sample.slice_index] == sample.label)
            np.testing.assert_allclose(sample.spacing, [2.2, 1.8])          # (row = sj, column = si)
            np.testing.assert_allclose(sample.ijk_to_ras, ct.ijk_to_ras)
            assert sample.boxes.dtype == np.float32 and sample.boxes.shape[1:] == (4,)
            if sample.present:
                x0, y0, x1, y1 = sample.boxes[0].astype(int)
                assert sample.mask[y0:y1, x0:x1].any()
                x, y = sample.center
                assert sample.mask[int(round(y)), int(round(x))]
            else:
                assert not sample.mask.any() and sample.boxes.shape == (0, 4) and sample.center is None
    assert total == load_dataset_info(root)["counts"]["records"]


def test_task_and_review_filters(dataset_root):
    root, _ = dataset_root
    seg = CuratedDataset(root, "train", tasks=("seg",))
    assert len(seg) and all(s.task == "seg" for s in seg)
    everything = CuratedDataset(root, "train", include_rejected=True)
    assert len(everything) >= len(seg)
    # mark one record rejected by hand: excluded by default, included on request
    path = root / "records" / "train.jsonl"
    original = path.read_text()
    try:
        lines = original.splitlines()
        record = json.loads(lines[0])
        record["review"] = {"state": "rejected", "reasons": ["schema: planted"]}
        path.write_text("\n".join([json.dumps(record)] + lines[1:]) + "\n")
        assert record["id"] not in {s.id for s in CuratedDataset(root, "train")}
        assert record["id"] in {s.id for s in CuratedDataset(root, "train", include_rejected=True)}
        assert len(CuratedDataset(root, "train", include_flagged=False)) == len(everything) - 1
    finally:
        path.write_text(original)
    with pytest.raises(ConfigError, match="unknown task"):
        CuratedDataset(root, "train", tasks=("classify",))
    with pytest.raises(ConfigError, match="unknown split"):
        CuratedDataset(root, "dev")


def test_bad_folders_raise_clear_errors(dataset_root, tmp_path):
    root, _ = dataset_root
    with pytest.raises(InputFileError, match="does not exist"):
        CuratedDataset(tmp_path / "missing")
    with pytest.raises(InputFileError, match="no dataset.json"):
        CuratedDataset(tmp_path)
    info = json.loads((root / "dataset.json").read_text())
    for change, message in (({"version": 99}, "version 99 is not supported"), ({"format": "coco"}, "not a CTReasoner")):
        copy = tmp_path / f"copy{len(message)}"
        copy.mkdir()
        (copy / "dataset.json").write_text(json.dumps(dict(info, **change)))
        with pytest.raises(InputFileError, match=message):
            load_dataset_info(copy)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "dataset.json").write_text("{not json")
    with pytest.raises(InputFileError, match="not valid JSON"):
        load_dataset_info(tmp_path / "broken")


def test_missing_slice_file_is_reported(dataset_root, tmp_path):
    import shutil

    root, _ = dataset_root
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    sample = CuratedDataset(copy, "train")[0]
    (copy / "slices" / f"{sample.subject}.npz").unlink()
    with pytest.raises(InputFileError, match="missing from the dataset"):
        CuratedDataset(copy, "train")[0].image_hu


def test_pickled_samples_leave_the_pixel_cache_behind(dataset_root):
    import pickle

    root, _ = dataset_root
    dataset = CuratedDataset(root, "train")
    sample = dataset[0]
    image = sample.image_hu.copy()
    payload = pickle.dumps(sample)
    assert len(payload) < image.nbytes        # the subject's arrays are not in it
    restored = pickle.loads(payload)
    np.testing.assert_array_equal(restored.image_hu, image)
