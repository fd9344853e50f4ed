"""``ctreasoner sweep-mask-weight``: the blends it scores are the masks the pipeline shows at that weight."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fixtures_lvlm import script
from fixtures_model import disc_sample, tiny_model_config

from CTReasonerLib.errors import CTReasonerError
from CTReasonerLib.eval.mask_weight_sweep import dice, render_sweep, sweep_pixel_mask_weight
from CTReasonerLib.organs import get_organ

ANSWERS = ("The liver is a bright round region. [SEG]", "Zooming in. [CLOSER]")


@pytest.fixture(scope="module")
def pixel_pipeline():
    from CTReasonerLib.model.ctreasoner import CTReasonerModel
    from CTReasonerLib.model.inference import CTReasonerPipeline
    from CTReasonerLib.model.pixel_presence import PixelPresenceConfig

    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = tiny_model_config()
    config.pixel_presence = PixelPresenceConfig(image_size=32, features=(4, 4, 8, 8, 8, 4), top_k=3)
    return CTReasonerPipeline(CTReasonerModel.build_tiny(config).eval(), max_new_tokens=6)


@pytest.fixture(scope="module")
def pixel_model_dir(pixel_pipeline, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pixel-model")
    pixel_pipeline.model.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def tiny_dataset_dir(tmp_path_factory):
    from CTReasonerLib.cli import main

    root = tmp_path_factory.mktemp("sweep-data") / "dataset"
    assert main(["curate", "--phantoms", "1", "--phantom-shape", "96", "96", "12", "--seed", "5",
                 "--splits", "1", "0", "0", "--workers", "1", "--out", str(root), "--no-progress"]) == 0
    return root


def test_each_weight_scores_the_mask_the_pipeline_shows_at_that_weight(pixel_pipeline, monkeypatch):
    sample = disc_sample("seg", size=80)
    weights = [0.0, 0.3, 0.6]
    monkeypatch.setattr(pixel_pipeline.config, "pixel_mask_weight", 0.2)      # set aside during the sweep
    monkeypatch.setattr(pixel_pipeline.config.closer_look, "keep", "better")
    script(pixel_pipeline, monkeypatch, *ANSWERS)
    result = sweep_pixel_mask_weight(pixel_pipeline, [sample, disc_sample("det")], weights, progress=False)
    assert (pixel_pipeline.config.pixel_mask_weight, pixel_pipeline.config.closer_look.keep) == (0.2, "better")
    assert result["records"] == 1 and result["organs"] == 1   # detection records are not scored
    monkeypatch.setattr(pixel_pipeline.config.closer_look, "keep", "last")
    for weight, row in zip(weights, result["table"]["last"]):
        monkeypatch.setattr(pixel_pipeline.config, "pixel_mask_weight", weight or None)
        script(pixel_pipeline, monkeypatch, *ANSWERS)
        shown = pixel_pipeline.chat(sample.image_hu, sample.turns[0]["query"], closer_look=True)
        assert shown.closer_look.ran
        assert row["mean_dice"] == pytest.approx(dice(shown.masks[-1].mask, sample.mask), abs=1e-3)
    assert len({round(r["mean_dice"], 4) for r in result["table"]["last"]}) > 1   # the weights make a difference here
    assert {r["weight"] for r in result["table"]["better"]} == set(weights)
    best = result["best"]
    assert best["mean_dice"] == max(r["mean_dice"] for rule in result["table"].values() for r in rule)
    assert result["per_organ"]["last"][sample.organ] == pytest.approx([row["mean_dice"] for row in result["table"]["last"]])
    table = render_sweep(result)
    assert "| 0.3 |" in table and f"pixel_mask_weight {best['pixel_mask_weight']:g}" in table
    organ_row = f"| {get_organ(sample.organ).name} | " + " | ".join(
        f"{value:.3f}" for value in result["per_organ"][best["closer_look_keep"]][sample.organ]) + " |"
    assert organ_row in table


def test_sweep_refuses_what_it_cannot_score(pixel_pipeline):
    with pytest.raises(CTReasonerError, match=r"weights must lie in \[0, 1\)"):
        sweep_pixel_mask_weight(pixel_pipeline, [disc_sample("seg")], [0.2, 1.0], progress=False)
    with pytest.raises(CTReasonerError, match=r"no segmentation records"):
        sweep_pixel_mask_weight(pixel_pipeline, [disc_sample("det")], progress=False)
    from CTReasonerLib.model.ctreasoner import CTReasonerModel
    from CTReasonerLib.model.inference import CTReasonerPipeline

    without = CTReasonerPipeline(CTReasonerModel.build_tiny(tiny_model_config()).eval(), max_new_tokens=6)
    with pytest.raises(CTReasonerError, match=r"no pixel network"):
        sweep_pixel_mask_weight(without, [disc_sample("seg")], progress=False)
    with pytest.raises(CTReasonerError, match=r"no pixel network"):
        without.pixel_organ_logits(disc_sample("seg").image_hu, "liver")


def test_pixel_organ_logits_names_an_unknown_organ(pixel_pipeline):
    logits = pixel_pipeline.pixel_organ_logits(disc_sample("seg", size=80).image_hu[:, :60], "Liver")
    assert logits.shape == (80, 60) and logits.dtype == np.float32 and np.isfinite(logits).all()
    with pytest.raises(CTReasonerError, match=r"unknown organ 'heart'"):
        pixel_pipeline.pixel_organ_logits(disc_sample("seg").image_hu, "heart")


def test_cli_writes_the_table(tmp_path, tiny_dataset_dir, pixel_model_dir, capsys):
    from CTReasonerLib.cli import main

    out = tmp_path / "sweep"
    assert main(["sweep-mask-weight", str(pixel_model_dir), str(tiny_dataset_dir), "--split", "all", "--limit", "6",
                 "--weights", "0", "0.5", "--out", str(out), "--device", "cpu", "--no-progress"]) == 0
    assert "Pixel mask weight sweep" in (out / "mask_weight_sweep.md").read_text()
    assert "Best: pixel_mask_weight" in capsys.readouterr().out
    assert main(["sweep-mask-weight", str(pixel_model_dir), str(tiny_dataset_dir), "--weights", "1.5",
                 "--out", str(out), "--device", "cpu"]) != 0
