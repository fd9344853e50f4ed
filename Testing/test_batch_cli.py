"""``ctreasoner batch``: inputs from folders and manifests, resumability, failure isolation, summary, torchrun shards."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import numpy as np

from fixtures_headless import NeighbourRecordingPipeline, tiny_model_dir, write_phantom  # noqa: F401

from CTReasonerLib.cli import main
from CTReasonerLib.errors import ConfigError
from CTReasonerLib.headless.batch import DONE_MARKER, BatchItem, BatchRequest, read_inputs, run_items, shard
from CTReasonerLib.headless.volume_chat import ChatTurn

QUERY = "segment the liver"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def batch_inputs(tmp_path_factory):
    """Three phantom CTs (with their label files beside them) and one corrupt .nrrd."""
    folder = tmp_path_factory.mktemp("batch_inputs")
    for seed in (1, 2, 3):
        write_phantom(folder, seed=seed)
    (folder / "broken.nrrd").write_bytes(b"NRRD0004\ntype: what\n\nnot a volume")
    return folder


def _summary(out: Path):
    with open(out / "summary.csv", newline="") as stream:
        return {row["name"]: row for row in csv.DictReader(stream)}


def test_inputs_from_folders_and_manifests(tmp_path):
    (tmp_path / "a_ct.nii.gz").write_bytes(b"")
    (tmp_path / "b_ct.nrrd").write_bytes(b"")
    (tmp_path / "b_ct.seg.nrrd").write_bytes(b"")           # a segmentation is not an input
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "series").mkdir()
    (tmp_path / "series" / "1.dcm").write_bytes(b"")
    names = [item.name for item in read_inputs(str(tmp_path))]
    assert names == ["a_ct", "b_ct", "series"]
    assert [item.name for item in read_inputs(str(tmp_path), "*_ct.nrrd")] == ["b_ct"]

    (tmp_path / "list.txt").write_text("# cases\na_ct.nii.gz\n\n/abs/x/case.nrrd\nother/case.nrrd\n")
    items = read_inputs(str(tmp_path / "list.txt"))
    assert [i.name for i in items] == ["a_ct", "case", "case_2"]
    assert items[0].source == str(tmp_path / "a_ct.nii.gz") and items[1].source == "/abs/x/case.nrrd"
    (tmp_path / "list.csv").write_text("id,path,name\n1,b_ct.nrrd,first\n2,a_ct.nii.gz,\n")
    assert [(i.name, Path(i.source).name) for i in read_inputs(str(tmp_path / "list.csv"))] == \
        [("first", "b_ct.nrrd"), ("a_ct", "a_ct.nii.gz")]
    (tmp_path / "list.json").write_text(json.dumps(["b_ct.nrrd", {"path": "a_ct.nii.gz", "name": "A"}]))
    assert [i.name for i in read_inputs(str(tmp_path / "list.json"))] == ["b_ct", "A"]

    (tmp_path / "bad.json").write_text(json.dumps({"cases": []}))
    with pytest.raises(ConfigError, match="cannot read the manifest"):
        read_inputs(str(tmp_path / "bad.json"))
    with pytest.raises(ConfigError, match="no such folder"):
        read_inputs(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="no CT inputs"):
        read_inputs(str(tmp_path), "*.mha")


def test_shards_are_disjoint_and_cover_every_item():
    items = list(range(7))
    shards = [shard(items, rank, 3) for rank in range(3)]
    assert shards == [[0, 3, 6], [1, 4], [2, 5]]


def test_batch_isolates_failures_writes_summary_and_resumes(batch_inputs, tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "out"
    manifest = tmp_path / "cases.txt"       # the CTs and the corrupt file, not the label maps
    manifest.write_text("\n".join([*(str(p) for p in sorted(batch_inputs.glob("phantom_?.nrrd"))),
                                   str(batch_inputs / "broken.nrrd")]))
    argv = ["batch", str(manifest), "--query", QUERY, "--out", str(out), "--model", str(tiny_model_dir),
            "--device", "cpu", "--no-progress"]
    assert main(argv) == 1                              # a failure is reported in the exit code ...
    first = capsys.readouterr().out
    assert "3 done, 0 skipped (finished earlier), 1 failed" in first
    rows = _summary(out)
    assert {name: row["status"] for name, row in rows.items()} == {
        "phantom_1": "done", "phantom_2": "done", "phantom_3": "done", "broken": "failed"}
    assert "broken.nrrd" in rows["broken"]["error"] and rows["phantom_1"]["slices"] == "1"
    failures = (out / "failures.log").read_text().splitlines()
    assert len(failures) == 1 and "broken" in failures[0]
    assert (out / "broken" / "error.txt").exists() and not (out / "broken" / DONE_MARKER).exists()
    for name in ("phantom_1", "phantom_2", "phantom_3"):   # ... but the others were written completely
        assert (out / name / DONE_MARKER).exists() and (out / name / f"{name}.seg.nrrd").exists()
    assert "| phantom_2 | done |" in (out / "summary.md").read_text()

    stamp = (out / "phantom_1" / "transcript.json").stat().st_mtime_ns
    (out / "phantom_2" / "phantom_2_overlay.png").unlink()        # an incomplete item is redone
    assert main(argv) == 1
    assert "1 done, 2 skipped (finished earlier), 1 failed" in capsys.readouterr().out
    rows = _summary(out)
    assert rows["phantom_1"]["status"] == "skipped" and rows["phantom_2"]["status"] == "done"
    assert (out / "phantom_1" / "transcript.json").stat().st_mtime_ns == stamp
    assert (out / "phantom_2" / "phantom_2_overlay.png").exists()
    assert len((out / "failures.log").read_text().splitlines()) == 2

    argv[argv.index(QUERY)] = "segment the spleen"                 # another question is not "finished"
    main(argv)
    assert "3 done, 0 skipped" in capsys.readouterr().out


@pytest.mark.parametrize("reads_neighbours", [True, False])
def test_batch_sends_each_slice_its_neighbours_from_the_volume_when_the_model_reads_them(tmp_path, reads_neighbours):
    ct_path, ct, labels = write_phantom(tmp_path / "in", seed=4)
    # twice the slice spacing: the neighbours are 2 slices off, so a k +- 1 (or unclamped) pick fails
    distance = 2.0 * float(ct.spacing[2]) if reads_neighbours else None
    pipeline = NeighbourRecordingPipeline(ct, labels, distance)
    request = BatchRequest(turns=[ChatTurn(QUERY), ChatTurn("segment the spleen")], slices="0,1,5,9")
    records = run_items([BatchItem(source=str(ct_path), name="case")], lambda: pipeline, request, tmp_path / "out",
                        progress=False)
    assert [r.status for r in records] == ["done"]
    last = ct.array.shape[0] - 1
    assert [k for k, _ in pipeline.received] == [0, 0, 1, 1, 5, 5, 9, 9]       # every turn of every slice
    for k, neighbours in pipeline.received:
        if not reads_neighbours:
            assert neighbours is NeighbourRecordingPipeline.NOT_GIVEN       # a model without them gets nothing
            continue
        assert neighbours.shape == (2,) + ct.array.shape[1:]
        assert np.array_equal(neighbours[0], ct.array[max(k - 2, 0)]), k        # below, clamped at slice 0
        assert np.array_equal(neighbours[1], ct.array[min(k + 2, last)]), k     # above, clamped at the last


def test_batch_refuses_missing_model_once_and_empty_query(batch_inputs, tmp_path, capsys):
    code = main(["batch", str(batch_inputs), "--query", QUERY, "--out", str(tmp_path / "o"),
                 "--model", str(tmp_path / "none")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("does not exist") == 1 and not (tmp_path / "o").exists()
    assert main(["batch", str(batch_inputs), "--query", " ", "--out", str(tmp_path / "o")]) == 2
    assert "query is empty" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_ranks_share_the_volumes_and_rank0_writes_one_summary(batch_inputs, tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "CTReasonerLib.cli", "batch", str(batch_inputs), "--pattern", "phantom_?.nrrd",
               "--query", QUERY, "--out", str(out), "--model", str(tiny_model_dir), "--device", "cpu", "--no-progress"]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    rows = _summary(out)
    assert sorted(rows) == ["phantom_1", "phantom_2", "phantom_3"]
    assert all(row["status"] == "done" for row in rows.values())
    assert {name: row["rank"] for name, row in rows.items()} == {"phantom_1": "0", "phantom_2": "1", "phantom_3": "0"}
    slices = {json.loads((out / name / "transcript.json").read_text())["slices"][0]["k"] for name in rows}
    assert slices == {5}                                            # default slice: the middle of 10
    assert completed.stdout.count("3 volume(s)") == 1               # only rank 0 reports
    assert all((out / name / DONE_MARKER).exists() for name in rows)
