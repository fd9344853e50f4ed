"""Training infrastructure: config loading, schedule, accumulation, clipping, checkpoints, exact resume, DeepSpeed config."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from CTReasonerLib.errors import ConfigError, InputFileError
from CTReasonerLib.train.checkpoint import (capture_rng_state, list_checkpoints, load_trainer_state,
                                            restore_rng_state)
from CTReasonerLib.train.config import load_train_config
from CTReasonerLib.train.distributed import (DistributedContext, load_deepspeed_config, require_deepspeed,
                                             resolve_deepspeed_config)
from CTReasonerLib.train.engine import TorchEngine, build_optimizer, build_scheduler, schedule_factor
from CTReasonerLib.train.metrics_log import read_metrics
from CTReasonerLib.train.trainer import GroupedDistributedSampler, Trainer

from fixtures_train import RegressionSamples, TwoHeadRegressor, regressor_config, weights_of

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _fresh_model(seed: int = 0, dropout: float = 0.1) -> TwoHeadRegressor:
    torch.manual_seed(seed)
    return TwoHeadRegressor(dropout=dropout)


# ------------------------------------------------------------------------------------------------ config
def test_config_yaml_overrides_and_type_checks(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: t\nseed: 3\ndata: {root: d, batch_size: 2}\noptim: {lr: 3e-4}\nrun: {epochs: 2}\n")
    config = load_train_config(str(path), ["optim.betas=[0.8, 0.9]", "run.max_steps=5", "model.config.loss.seg=2"])
    assert config.optim.lr == pytest.approx(3e-4)  # YAML 1.1 reads 3e-4 as a string; it must become a float
    assert config.optim.betas == (0.8, 0.9)
    assert config.run.max_steps == 5
    assert config.model.config == {"loss": {"seg": 2}}
    with pytest.raises(ConfigError, match="unknown config key.*optim.lrr"):
        load_train_config(str(path), ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="run.epochs must be int"):
        load_train_config(str(path), ["run.epochs=two"])
    with pytest.raises(ConfigError, match="optim.grad_accum_steps must be >= 1"):
        load_train_config(str(path), ["optim.grad_accum_steps=0"])
    with pytest.raises(InputFileError):
        load_train_config(str(tmp_path / "missing.yaml"))


def test_shipped_configs_load():
    tiny = load_train_config(str(REPO / "configs" / "tiny_cpu.yaml"))
    assert tiny.model.source == "tiny" and tiny.data.phantoms and tiny.run.max_minutes <= 85
    from CTReasonerLib.model.config import CTReasonerConfig

    tiny_model = CTReasonerConfig.from_dict(tiny.model.config)  # the inference settings the committed model has
    shipped = CTReasonerConfig.load(str(REPO / "Resources" / "Models" / "CTReasoner-Tiny"))
    assert tiny_model.detection.box_source == shipped.detection.box_source == "fused"
    # the recipe gates on the image head; the committed model's stage 9 fitted a pixel network to gate on
    assert (tiny_model.presence_from, tiny_model.presence_gate) == ("image", 0.15)
    # (stage 12 trained it on at 256 px; stage 16 reads it through the context decision, whose gate and rescue were
    # chosen on validation subjects)
    assert (shipped.presence_from, shipped.presence_gate) == ("pixels", 0.4) and shipped.pixel_presence.image_size == 256
    assert tiny_model.presence_rescue == 0.5 and shipped.presence_rescue == 0.45
    assert shipped.presence_context is not None and tiny_model.presence_context is None
    assert tiny_model.max_history_turns == shipped.max_history_turns == 2
    # the recipe keeps the round its IoU head rates higher; the committed model blends the pixel network's organ
    # map into its masks, and with that round 2 is the better choice (stage 10)
    assert tiny_model.closer_look.keep == "better" and tiny_model.pixel_mask_weight is None
    assert shipped.closer_look.keep == "last" and shipped.pixel_mask_weight == 0.6   # stage 14
    # stage 15: its pixel network reads the slices 3 mm either side
    assert shipped.pixel_presence.neighbours and shipped.pixel_presence.neighbour_distance_mm == 3.0
    finetune = load_train_config(str(REPO / "configs" / "tiny_cpu_finetune.yaml"))
    assert finetune.model.source == "pretrained" and finetune.data.records_per_slice > 1
    assert finetune.run.max_minutes <= 85
    gpu = load_train_config(str(REPO / "configs" / "tiny_gpu_finetune.yaml"))
    assert gpu.model.source == "pretrained" and gpu.run.precision == "auto"
    from CTReasonerLib.commands.train import training_overrides

    loss = training_overrides(CTReasonerConfig(), gpu.model.config).loss  # what the fine-tune applies
    assert loss.lm_decision_span == 12 and loss.seg_dense > 0 and loss.presence > 0
    paper = load_train_config(str(REPO / "configs" / "qwen2_5_vl_3b_sam_vit_h.yaml"))
    assert paper.optim.lr == pytest.approx(3e-4) and paper.optim.betas == (0.9, 0.95)
    assert paper.optim.weight_decay == 0 and paper.optim.grad_accum_steps == 10 and paper.run.epochs == 40
    assert paper.run.precision == "bf16"
    lora = paper.model.config["lvlm"]["lora"]
    assert (lora["r"], lora["alpha"], lora["dropout"]) == (8, 16, 0.05)
    assert paper.model.config["segmenter"]["image_size"] == 1024


def test_schedule_warmup_then_cosine():
    assert schedule_factor(0, 10, 2, "cosine", 0.0) == pytest.approx(0.5)
    assert schedule_factor(1, 10, 2, "cosine", 0.0) == pytest.approx(1.0)
    assert schedule_factor(2, 10, 2, "cosine", 0.0) == pytest.approx(1.0)
    assert schedule_factor(6, 10, 2, "cosine", 0.0) == pytest.approx(0.5)
    assert schedule_factor(10, 10, 2, "cosine", 0.1) == pytest.approx(0.1)
    assert schedule_factor(6, 10, 2, "linear", 0.0) == pytest.approx(0.5)
    assert schedule_factor(9, 10, 0, "constant", 0.0) == 1.0


# ----------------------------------------------------------------------------------------- loop mechanics
def test_accumulation_matches_a_larger_batch(tmp_path):
    """2 micro-batches of 2 accumulated == 1 batch of 4: the loss is scaled by the group length."""
    data = RegressionSamples(count=4)
    results = []
    for batch_size, accum in ((2, 2), (4, 1)):
        model = _fresh_model(dropout=0.0)
        config = regressor_config(str(tmp_path / f"b{batch_size}"), epochs=1, batch_size=batch_size,
                                  grad_accum_steps=accum)
        Trainer(model, config, data).train()
        results.append(weights_of(model))
    for key in results[0]:
        torch.testing.assert_close(results[0][key], results[1][key], rtol=1e-5, atol=1e-6)


def test_clipping_limits_the_gradient_norm():
    model = _fresh_model(dropout=0.0)
    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=1.0)
    scheduler = build_scheduler(optimizer, 10, 0, "constant", 0.0)
    engine = TorchEngine(model, optimizer, scheduler, device=torch.device("cpu"), context=DistributedContext(),
                         max_grad_norm=0.01, autocast_dtype=None)
    before = torch.cat([p.detach().flatten().clone() for p in model.trainable_parameters()])
    batch = TwoHeadRegressor.collate([RegressionSamples(4)[i] for i in range(4)])
    engine.micro_step(batch, loss_scale=1.0, sync_gradients=True)
    grad_norm = engine.optimizer_step()
    after = torch.cat([p.detach().flatten() for p in model.trainable_parameters()])
    assert grad_norm > 0.01  # reported before clipping
    assert float((after - before).norm()) == pytest.approx(0.01, rel=1e-4)  # SGD lr 1: the step is the clipped gradient
    assert all(p.grad is None for p in model.trainable_parameters())


def test_frozen_parameters_stay_frozen(tmp_path):
    model = _fresh_model()
    stem_before = model.stem.weight.detach().clone()
    trunk_before = model.trunk[0].weight.detach().clone()
    Trainer(model, regressor_config(str(tmp_path), epochs=1), RegressionSamples()).train()
    assert torch.equal(model.stem.weight, stem_before)
    assert not torch.equal(model.trunk[0].weight, trunk_before)


def test_metrics_log_and_stop_limits(tmp_path):
    config = regressor_config(str(tmp_path), epochs=5, max_steps=4)
    result = Trainer(_fresh_model(), config, RegressionSamples()).train()
    assert (result.steps, result.stopped_by) == (4, "max_steps")
    train = read_metrics(tmp_path / "metrics.jsonl", kind="train")
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert {"loss", "loss_seg", "loss_det", "lr", "grad_norm", "time_s", "samples_per_s", "epoch"} <= set(train[0])
    assert train[0]["lr"] < train[1]["lr"]  # two warmup steps, then cosine decay to the end
    assert train[3]["lr"] < train[1]["lr"]
    assert math.isclose(train[0]["loss"], train[0]["loss_seg"] + train[0]["loss_det"], rel_tol=1e-5)

    timed = regressor_config(str(tmp_path / "timed"), epochs=50, max_minutes=1e-9)
    result = Trainer(_fresh_model(), timed, RegressionSamples()).train()
    assert (result.steps, result.stopped_by) == (1, "max_minutes")
    assert (result.final_checkpoint / "trainer_state.pt").is_file()


def test_checkpoints_are_rotated_and_reload(tmp_path):
    config = regressor_config(str(tmp_path), epochs=3, checkpoint_every=2, keep_last=2)  # 3 steps per epoch
    model = _fresh_model()
    result = Trainer(model, config, RegressionSamples()).train()
    kept = [p.name for p in list_checkpoints(tmp_path / "checkpoints")]
    assert kept == ["step-00000006", "step-00000008"]
    assert not list(tmp_path.glob("**/*.tmp"))
    assert result.final_checkpoint == tmp_path / "final"
    reloaded = TwoHeadRegressor.from_pretrained(str(result.final_checkpoint))
    for key, value in weights_of(model).items():
        assert torch.equal(reloaded.state_dict()[key], value)
    state = load_trainer_state(str(result.final_checkpoint))
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (9, 3, 0)
    assert json.loads((result.final_checkpoint / "train_config.json").read_text())["seed"] == 7
    with pytest.raises(InputFileError, match="not a training checkpoint"):
        load_trainer_state(str(tmp_path))


@pytest.mark.parametrize("stop_at", [2, 3])
def test_resume_continues_identically(tmp_path, stop_at):
    """Straight run vs resume from a mid-run checkpoint into a fresh model: same weights, same losses.

    20 samples / batch 4 = 5 micro-batches per epoch, grouped 2+2+1 (3 steps): stop_at=2 resumes
    mid-epoch, stop_at=3 at an epoch boundary after a short group.
    """
    data = RegressionSamples(count=20)  # 5 batches -> groups of 2, 2, 1: the short last group is exercised
    config = regressor_config(str(tmp_path / "straight"), epochs=2, checkpoint_every=1, keep_last=10)
    straight = _fresh_model()
    Trainer(straight, config, data).train()
    checkpoint = tmp_path / "straight" / "checkpoints" / f"step-{stop_at:08d}"

    resumed = TwoHeadRegressor.from_pretrained(str(checkpoint))
    torch.manual_seed(12345)  # a resumed process starts from an unrelated RNG state
    random.seed(5)
    np.random.seed(5)
    config_b = regressor_config(str(tmp_path / "resumed"), epochs=2, checkpoint_every=1, keep_last=10)
    result = Trainer(resumed, config_b, data).train(resume_from=str(checkpoint))
    assert result.steps == 6
    for key, value in weights_of(straight).items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=1e-6, atol=1e-7)
    losses_a = [r["loss"] for r in read_metrics(tmp_path / "straight" / "metrics.jsonl", "train")][stop_at:]
    losses_b = [r["loss"] for r in read_metrics(tmp_path / "resumed" / "metrics.jsonl", "train")]
    assert losses_b == pytest.approx(losses_a, rel=1e-6)


def _grouped(keys, group_size, rank=0, world=1, epoch=0):
    sampler = GroupedDistributedSampler(list(range(len(keys))), keys, group_size, num_replicas=world, rank=rank,
                                        shuffle=True, seed=3)
    sampler.set_epoch(epoch)
    return sampler.epoch_indices()


def test_grouped_sampler_keeps_slices_together_and_covers_every_record():
    keys = [index % 7 for index in range(60)]           # 7 "slices" of 8 or 9 records
    order = _grouped(keys, 4)
    assert sorted(order) == list(range(60))
    # walking the order, the key changes only at chunk boundaries: at most ceil(n/4) runs per key
    runs = 1 + sum(keys[a] != keys[b] for a, b in zip(order, order[1:]))
    assert runs <= sum(math.ceil(keys.count(k) / 4) for k in set(keys))
    assert _grouped(keys, 4) == order and _grouped(keys, 4, epoch=1) != order   # depends on (seed, epoch) only
    ranks = [_grouped(keys, 4, rank=r, world=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 30 and sorted(ranks[0] + ranks[1]) == list(range(60))
    odd = [_grouped(keys[:59], 4, rank=r, world=2) for r in range(2)]
    assert len(odd[0]) == len(odd[1]) == 30 and set(odd[0] + odd[1]) == set(range(59))   # padded, none lost
    with pytest.raises(ValueError, match="group_keys has 3 entries"):
        GroupedDistributedSampler(list(range(4)), [0, 1, 2], 2, num_replicas=1, rank=0)


class _SliceRecords(RegressionSamples):
    """RegressionSamples that look like a curated dataset to the trainer (records with subject and slice)."""

    def __init__(self, count: int):
        super().__init__(count=count)
        self.records = [{"subject": f"s{i % 3}", "slice_index": i % 2} for i in range(count)]


def test_slice_grouped_training_resumes_identically(tmp_path):
    data = _SliceRecords(20)
    run = dict(epochs=2, checkpoint_every=1, keep_last=10)
    config = regressor_config(str(tmp_path / "straight"), **run)
    config.data.records_per_slice = 3
    straight = _fresh_model()
    Trainer(straight, config, data).train()
    checkpoint = tmp_path / "straight" / "checkpoints" / "step-00000002"
    resumed = TwoHeadRegressor.from_pretrained(str(checkpoint))
    config_b = regressor_config(str(tmp_path / "resumed"), **run)
    config_b.data.records_per_slice = 3
    Trainer(resumed, config_b, data).train(resume_from=str(checkpoint))
    for key, value in weights_of(straight).items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=1e-6, atol=1e-7)
    config_c = regressor_config(str(tmp_path / "plain"), **run)
    config_c.data.records_per_slice = 3
    with pytest.raises(ValueError, match="needs a curated dataset"):
        Trainer(_fresh_model(), config_c, RegressionSamples(count=20))


def test_validation_runs_on_a_fixed_subset_without_disturbing_training(tmp_path):
    seen = []

    def validate(model, samples):
        assert not model.training
        seen.append(len(samples))
        torch.rand(100)  # validation that draws random numbers must not change training
        return {"val_dice": 0.5}

    data = RegressionSamples()
    config = regressor_config(str(tmp_path / "a"), epochs=1, val_every=2, val_samples=5)
    with_val = _fresh_model()
    result = Trainer(with_val, config, data, val_dataset=RegressionSamples(9, seed=1), validate_fn=validate).train()
    without_val = _fresh_model()
    Trainer(without_val, regressor_config(str(tmp_path / "b"), epochs=1), data).train()
    assert seen == [5, 5]  # step 2, then the end of the 3-step run
    assert result.last_validation == {"val_dice": 0.5}
    assert [r["step"] for r in read_metrics(tmp_path / "a" / "metrics.jsonl", "val")] == [2, 3]
    for key, value in weights_of(without_val).items():
        assert torch.equal(with_val.state_dict()[key], value)


def test_rng_state_round_trip():
    state = capture_rng_state()
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    restore_rng_state(state)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


# ---------------------------------------------------------------------------------------------- DeepSpeed
def test_deepspeed_config_is_filled_from_the_training_config():
    resolved = load_deepspeed_config(str(REPO / "configs" / "deepspeed_zero2.json"), micro_batch_size=2,
                                     grad_accum_steps=10, max_grad_norm=1.0, bf16=True, world_size=4)
    assert resolved["zero_optimization"]["stage"] == 2
    assert (resolved["train_micro_batch_size_per_gpu"], resolved["gradient_accumulation_steps"]) == (2, 10)
    assert resolved["train_batch_size"] == 80 and resolved["gradient_clipping"] == 1.0
    assert resolved["bf16"]["enabled"] is True and resolved["fp16"]["enabled"] is False


@pytest.mark.parametrize("raw, message", [
    ({"gradient_accumulation_steps": 4}, "contradicts the training config"),
    ({"zero_optimization": {"stage": 3}}, "ZeRO stage 3"),
    ({"optimizer": {"type": "Adam"}}, "defines an optimizer"),
    ({"bf16": {"enabled": True}, "fp16": {"enabled": True}}, "both bf16 and fp16"),
])
def test_deepspeed_config_rejects_contradictions(raw, message):
    with pytest.raises(ConfigError, match=message):
        resolve_deepspeed_config(raw, micro_batch_size=1, grad_accum_steps=10, max_grad_norm=1.0, bf16=True,
                                 world_size=1)


def test_deepspeed_missing_is_a_clear_error(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_deepspeed(name, *args, **kwargs):
        if name == "deepspeed":
            raise ImportError("No module named 'deepspeed'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_deepspeed)
    with pytest.raises(ConfigError, match="deepspeed package is not installed") as info:
        require_deepspeed()
    assert "docs/training.md" in info.value.hint
    config = regressor_config(str(tmp_path), epochs=1, deepspeed=str(REPO / "configs" / "deepspeed_zero2.json"))
    with pytest.raises(ConfigError, match="deepspeed package is not installed"):
        Trainer(_fresh_model(), config, RegressionSamples())


def test_deepspeed_initialize_arguments(monkeypatch, tmp_path):
    """The engine path hands deepspeed.initialize our module (training_step as forward), AdamW, schedule, config."""
    import sys
    import types

    captured = {}

    class FakeEngine:
        def __init__(self, module):
            self.module = module

    def initialize(**kwargs):
        captured.update(kwargs)
        return FakeEngine(kwargs["model"]), kwargs["optimizer"], None, kwargs["lr_scheduler"]

    monkeypatch.setitem(sys.modules, "deepspeed", types.SimpleNamespace(initialize=initialize))
    config = regressor_config(str(tmp_path), epochs=1, deepspeed=str(REPO / "configs" / "deepspeed_zero2.json"))
    model = _fresh_model()
    trainer = Trainer(model, config, RegressionSamples())
    assert isinstance(captured["optimizer"], torch.optim.AdamW)
    assert captured["optimizer"].defaults["betas"] == (0.9, 0.95)
    assert captured["config"]["gradient_accumulation_steps"] == 2
    assert captured["config"]["train_micro_batch_size_per_gpu"] == 4
    batch = TwoHeadRegressor.collate([RegressionSamples(2)[i] for i in range(2)])
    assert set(captured["model"](batch)) == {"loss", "loss_seg", "loss_det"}
    assert trainer.engine.engine.module.model is model


# ------------------------------------------------------------------------------- the real tiny CTReasoner
@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    """One small phantom curated into a train split (built through the CLI, like the tiny recipe does)."""
    from CTReasonerLib.cli import main as cli_main

    root = tmp_path_factory.mktemp("tiny-data") / "dataset"
    code = cli_main(["curate", "--phantoms", "1", "--phantom-shape", "96", "96", "12", "--seed", "5",
                     "--splits", "1", "0", "0", "--workers", "1", "--out", str(root), "--no-progress"])
    assert code == 0
    return root


def _tiny_config(tmp_path, dataset, name):
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"name: {name}\nseed: 3\noutput_dir: {tmp_path / name}\nmodel: {{source: tiny}}\n"
                    f"data: {{root: {dataset}, batch_size: 1}}\n"
                    "optim: {grad_accum_steps: 1, warmup_steps: 1}\n"
                    "run: {epochs: 1, max_steps: 2, log_every: 1, checkpoint_every: 1, keep_last: 3, progress: false}\n")
    return load_train_config(str(path))


def _safetensors(folder: Path):
    from safetensors.torch import load_file

    return {**{f"p.{k}": v for k, v in load_file(folder / "perception.safetensors").items()},
            **{f"l.{k}": v for k, v in load_file(folder / "lvlm" / "model.safetensors").items()}}


@pytest.mark.slow
def test_tiny_model_resume_and_merge(tmp_path, tiny_dataset, monkeypatch):
    """The shipped path on CTReasonerModel: train, resume from a checkpoint into a fresh model, merge, reload."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from CTReasonerLib.commands.merge import merge_checkpoint
    from CTReasonerLib.commands.train import train_from_config
    from CTReasonerLib.model.ctreasoner import CTReasonerModel

    straight = train_from_config(_tiny_config(tmp_path, tiny_dataset, "straight"), device="cpu")
    assert straight.steps == 2 and straight.final_checkpoint.is_dir()
    losses = read_metrics(tmp_path / "straight" / "metrics.jsonl", "train")
    assert {"lm", "seg_bce", "seg_dice", "det_l1", "det_giou", "det_objectness"} <= set(losses[0])

    torch.manual_seed(999)
    resumed = train_from_config(_tiny_config(tmp_path, tiny_dataset, "resumed"), device="cpu",
                                resume_from=str(tmp_path / "straight" / "checkpoints" / "step-00000001"))
    assert resumed.steps == 2
    expected, got = _safetensors(straight.final_checkpoint), _safetensors(resumed.final_checkpoint)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)

    merged = merge_checkpoint(str(straight.final_checkpoint), str(tmp_path / "merged"))
    assert not (merged / "trainer_state.pt").exists()
    reloaded = CTReasonerModel.from_pretrained(str(merged), device="cpu")
    for key, value in _safetensors(merged).items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)
    assert not reloaded.training
    with pytest.raises(ConfigError, match="not empty"):
        merge_checkpoint(str(straight.final_checkpoint), str(merged))
    # --dtype bfloat16 halves every stored weight, the perception heads included, and still reloads
    half = merge_checkpoint(str(straight.final_checkpoint), str(tmp_path / "merged-bf16"), dtype="bfloat16")
    stored = _safetensors(half)
    assert {tensor.dtype for tensor in stored.values() if tensor.is_floating_point()} == {torch.bfloat16}
    for key, value in stored.items():
        torch.testing.assert_close(value.float(), expected[key].to(torch.bfloat16).float(), msg=key)
    assert json.loads((half / "merge_info.json").read_text())["weights_dtype"] == "bfloat16"
    CTReasonerModel.from_pretrained(str(half), device="cpu")


def test_fine_tuning_may_change_losses_and_closer_look_but_not_the_architecture():
    from CTReasonerLib.commands.train import training_overrides
    from CTReasonerLib.model.config import CTReasonerConfig

    base = CTReasonerConfig()
    tuned = training_overrides(base, {"loss": {"lm_decision": 5.0}, "closer_look": {"train_crops_per_batch": 2}})
    assert tuned.loss.lm_decision == 5.0 and tuned.closer_look.train_crops_per_batch == 2
    assert tuned.loss.seg == base.loss.seg and tuned.segmenter == base.segmenter
    with pytest.raises(ConfigError, match="sets segmenter for a pretrained model"):
        training_overrides(base, {"segmenter": {"image_size": 512}})
    with pytest.raises(ConfigError, match="unknown model config key"):
        training_overrides(base, {"loss": {"lm_decisoin": 2.0}})


def test_lr_multipliers_give_new_heads_their_own_group():
    model = _fresh_model()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names, params = [n for n, _ in named], [p for _, p in named]
    optimizer = build_optimizer(params, 1e-3, (0.9, 0.95), 1e-8, 0.0, names=names, lr_multipliers={"det_head.": 10})
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, pytest.approx(1e-2)]
    assert {id(p) for p in optimizer.param_groups[1]["params"]} == {id(p) for p in model.det_head.parameters()}
    scheduler = build_scheduler(optimizer, 10, 2, "cosine", 0.0)
    assert scheduler.get_last_lr() == [pytest.approx(5e-4), pytest.approx(5e-3)]   # warmup scales both
    with pytest.raises(ConfigError, match="match no trainable parameter"):
        build_optimizer(params, 1e-3, (0.9, 0.95), 1e-8, 0.0, names=names, lr_multipliers={"stem.": 10})


# ------------------------------------------------------------------------------- fit-presence
def _saved_untrained_model(tmp_path: Path):
    """A new tiny model saved to ``tmp_path / "model"``, and its weights (to see what a fit changes)."""
    from fixtures_model import tiny_model_config
    from CTReasonerLib.model.ctreasoner import CTReasonerModel

    torch.manual_seed(0)
    source = tmp_path / "model"
    CTReasonerModel.build_tiny(tiny_model_config()).save_pretrained(str(source))
    return source, _safetensors(source)


@pytest.mark.slow
def test_fit_presence_trains_only_the_image_head_and_writes_a_gated_folder(tmp_path, tiny_dataset, monkeypatch, capsys):
    """ctreasoner fit-presence: the BCE falls, every other weight stays, the folder reloads with the gate on."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from CTReasonerLib.cli import main as cli_main
    from CTReasonerLib.model.ctreasoner import CTReasonerModel

    source, before = _saved_untrained_model(tmp_path)
    out = tmp_path / "fitted"
    code = cli_main(["fit-presence", str(source), str(tiny_dataset), "--out", str(out), "--epochs", "6",
                     "--lr", "1e-2", "--gate", "0.15", "--device", "cpu", "--no-progress"])
    assert code == 0
    info = json.loads((out / "presence_fit.json").read_text())
    assert info["slices"] > 0 and info["loss_per_epoch"][-1] < info["loss_per_epoch"][0]
    after = _safetensors(out)
    assert set(after) == set(before)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(name.startswith("p.image_presence_head.") for name in changed)
    reloaded = CTReasonerModel.from_pretrained(str(out), device="cpu")
    assert (reloaded.config.presence_from, reloaded.config.presence_gate) == ("image", 0.15)
    assert reloaded.config.loss.presence > 0
    assert CTReasonerModel.from_pretrained(str(source), device="cpu").config.presence_from == "lvlm"  # input untouched

    # the fitted head tells the organs of a training slice from the others better than chance
    from CTReasonerLib.train.presence_fit import dataset_slices, encode_slices

    embeddings, targets = encode_slices(reloaded, dataset_slices(str(tiny_dataset), "train"), progress=False)
    with torch.no_grad():
        probabilities = torch.sigmoid(reloaded.image_presence_head(embeddings.float()))
    assert probabilities[targets == 1].mean() > probabilities[targets == 0].mean() + 0.2

    for argv, message in [([str(source), str(tiny_dataset), "--out", str(out)], "is not empty"),
                          ([str(source), str(tiny_dataset), "--out", str(tmp_path / "x"), "--gate", "2"], "--gate"),
                          ([str(tiny_dataset), str(tiny_dataset), "--out", str(tmp_path / "y")], "not a model folder")]:
        assert cli_main(["fit-presence", *argv, "--no-progress"]) != 0
        assert message in capsys.readouterr().err


def test_presence_targets_count_organs_the_way_curation_asks_about_them():
    """An organ is present from the dataset's minimum area, absent at no pixel; a smaller sliver and an organ the
    dataset does not annotate are not scored."""
    import numpy as np

    from CTReasonerLib.train.pixel_presence_fit import presence_bce, presence_targets

    labels = np.zeros((8, 8), np.uint8)
    labels[:2, :2] = 1          # 4 pixels: present
    labels[5, 5:7] = 2          # 2 pixels: a sliver
    labels[7, :] = 3            # 8 pixels, but not annotated below
    targets = presence_targets(labels, 4, annotated={1, 2, 4})
    assert targets[:4].tolist() == [1.0, -1.0, -1.0, 0.0] and (targets[4:] == -1).all()
    assert presence_targets(labels, 4)[:4].tolist() == [1.0, -1.0, 1.0, 0.0]
    scores = torch.full((1, len(targets)), 0.5)
    scores[0, 0], scores[0, 1] = 0.9, 0.0          # the unscored sliver's 0 must not count
    expected = -(np.log(0.9) + np.log(0.5)) / 2
    assert float(presence_bce(scores, targets[None])) == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow
def test_fit_presence_pixels_adds_a_pixel_network_that_the_gate_reads(tmp_path, tiny_dataset, monkeypatch, capsys):
    """ctreasoner fit-presence --head pixels: a new network and config section, every old weight kept, and the
    reloaded network tells a slice's organs from the others; the gate reads it with the image head."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from CTReasonerLib.cli import main as cli_main
    from CTReasonerLib.model.ctreasoner import CTReasonerModel
    from CTReasonerLib.model.inference import CTReasonerPipeline
    from CTReasonerLib.organs import ORGANS
    from CTReasonerLib.train.presence_fit import dataset_slices

    source, before = _saved_untrained_model(tmp_path)
    out = tmp_path / "fitted"
    # "pixels" cannot be read before a network exists
    assert cli_main(["fit-presence", str(source), str(tiny_dataset), "--out", str(tmp_path / "no"),
                     "--presence-from", "image+pixels", "--device", "cpu", "--no-progress"]) != 0
    assert "has none" in capsys.readouterr().err
    assert cli_main(["fit-presence", str(source), str(tiny_dataset), "--out", str(tmp_path / "bad"),
                     "--head", "pixels", "--presence-from", "image+text", "--no-progress"]) != 0
    assert "presence_from must name" in capsys.readouterr().err

    code = cli_main(["fit-presence", str(source), str(tiny_dataset), "--out", str(out), "--head", "pixels",
                     "--presence-from", "image+pixels", "--epochs", "40", "--batch-size", "4", "--lr", "1e-2", "--gate", "0.3", "--device", "cpu",
                     "--no-progress"])
    assert code == 0
    info = json.loads((out / "pixel_presence_fit.json").read_text())
    assert info["head"] == "pixels" and info["loss_per_epoch"][-1] < info["loss_per_epoch"][0]
    after = _safetensors(out)
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert {name for name in after if name not in before} and all(
        name.startswith("p.pixel_presence_net.") for name in after if name not in before)
    reloaded = CTReasonerModel.from_pretrained(str(out), device="cpu")
    assert (reloaded.config.presence_from, reloaded.config.presence_gate) == ("image+pixels", 0.3)
    assert reloaded.config.pixel_presence is not None
    assert not any(p.requires_grad for p in reloaded.pixel_presence_net.parameters())   # frozen in ctreasoner train

    slices = dataset_slices(str(tiny_dataset), "train")
    images = torch.stack([reloaded.slice_input(hu)[0] for hu, _ in slices])
    from CTReasonerLib.model.auxiliary import organ_presence
    truth = torch.stack([organ_presence(labels) for _, labels in slices])
    with torch.no_grad():
        probabilities = reloaded.pixel_presence_net.presence(images)
    assert probabilities[truth == 1].mean() > probabilities[truth == 0].mean() + 0.2

    # the gate reads the geometric mean of the image head and the pixel network, for the organ asked about
    pipeline = CTReasonerPipeline(reloaded)
    hu, labels = slices[0]
    organ = ORGANS[int(truth[0].argmax())]
    prepared = pipeline._prepare(hu)
    features = pipeline._features(prepared.key, prepared.image)
    generation = pipeline._generate(prepared.image, [(f"Segment the {organ.name}.", None)])
    with torch.no_grad():
        image_head = torch.sigmoid(reloaded.image_presence_head(features.image_embeddings.float()))[0, organ.label - 1]
    pixels = probabilities[0, organ.label - 1]
    monkeypatch.setattr(pipeline, "_routes", lambda generation: True)
    monkeypatch.setattr("CTReasonerLib.model.inference._checked_organ", lambda text, query, routed: organ.key)
    with torch.no_grad():
        presence, checked = pipeline._presence(generation, prepared, features, "q", routed=True)
    assert checked == organ.key
    assert presence == pytest.approx(float((image_head * pixels).sqrt()), rel=1e-4)

    # --continue trains this network further: it starts where the first fit ended, keeps the features, may change top-k
    further = tmp_path / "further"
    assert cli_main(["fit-presence", str(out), str(tiny_dataset), "--out", str(further), "--head", "pixels", "--continue",
                     "--epochs", "2", "--batch-size", "4", "--lr", "1e-3", "--pixel-top-k", "2", "--device", "cpu",
                     "--no-progress"]) == 0
    continued = json.loads((further / "pixel_presence_fit.json").read_text())
    assert continued["continued"] and continued["pixel_presence"]["top_k"] == 2
    assert continued["loss_per_epoch"][0] < 0.5 * info["loss_per_epoch"][0]
    assert continued["pixel_presence"]["features"] == info["pixel_presence"]["features"]
    assert CTReasonerModel.from_pretrained(str(further), device="cpu").config.pixel_presence.top_k == 2
    # ... or at another side: the fully convolutional weights carry over, so it starts well below a new network
    resized = tmp_path / "resized"
    assert cli_main(["fit-presence", str(out), str(tiny_dataset), "--out", str(resized), "--head", "pixels", "--continue",
                     "--pixel-size", "64", "--epochs", "1", "--batch-size", "4", "--lr", "1e-3", "--device", "cpu",
                     "--no-progress"]) == 0
    at_64 = json.loads((resized / "pixel_presence_fit.json").read_text())
    assert at_64["pixel_presence"]["image_size"] == 64 and at_64["continued"]
    assert at_64["loss_per_epoch"][0] < 0.5 * info["loss_per_epoch"][0]
    assert CTReasonerModel.from_pretrained(str(resized), device="cpu").pixel_presence_net.config.image_size == 64
    # --presence-weight trains the presence score itself: from the same network, seed and steps, its BCE on the
    # slices' organs ends lower than the segmentation loss alone leaves it
    from CTReasonerLib.train.pixel_presence_fit import dataset_presence_rule, presence_bce, presence_targets
    rule = dataset_presence_rule(str(tiny_dataset))
    targets = torch.stack([presence_targets(labels, *rule) for _, labels in slices])
    bces = {}
    for weight in ("0", "5"):
        assert cli_main(["fit-presence", str(out), str(tiny_dataset), "--out", str(tmp_path / f"weighted{weight}"),
                         "--head", "pixels", "--continue", "--presence-weight", weight, "--epochs", "6", "--batch-size", "4",
                         "--lr", "3e-3", "--device", "cpu", "--no-progress"]) == 0
        weighted = CTReasonerModel.from_pretrained(str(tmp_path / f"weighted{weight}"), device="cpu")
        with torch.no_grad():
            bces[weight] = float(presence_bce(weighted.pixel_presence_net.presence(images), targets))
        assert json.loads((tmp_path / f"weighted{weight}" / "pixel_presence_fit.json").read_text())["presence_weight"] == float(weight)
    assert bces["5"] < 0.8 * bces["0"], bces
    for argv, message in [([str(out), "--head", "pixels", "--continue", "--pixel-features", "4", "8", "16", "32", "64", "4"],
                           "keeps the network's features"),
                          ([str(out), "--presence-weight", "1"], "--presence-weight weighs a pixel network"),
                          ([str(out), "--head", "pixels", "--presence-weight", "-1"], "must be >= 0"),
                          ([str(out), "--continue"], "--continue trains a pixel network"),
                          ([str(source), "--head", "pixels", "--continue"], "no pixel network to continue")]:
        assert cli_main(["fit-presence", argv[0], str(tiny_dataset), "--out", str(tmp_path / "refused"), *argv[1:],
                         "--device", "cpu", "--no-progress"]) != 0
        assert message in capsys.readouterr().err


def test_fit_presence_neighbours_widens_the_pixel_network_and_the_pipeline_reads_the_slices_either_side(
        tmp_path, tiny_dataset, monkeypatch, capsys):
    """--neighbours: a network without them is widened (9 input channels) and trained on; chat and the pixel map
    then depend on the neighbours sent; wrong neighbours and datasets that lack them are refused by name."""
    import shutil

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from CTReasonerLib.cli import main as cli_main
    from CTReasonerLib.data.dataset import CuratedDataset
    from CTReasonerLib.model.ctreasoner import CTReasonerModel
    from CTReasonerLib.model.inference import CTReasonerPipeline

    source, _ = _saved_untrained_model(tmp_path)
    flat, wide = tmp_path / "flat", tmp_path / "wide"
    common = ["--epochs", "3", "--batch-size", "4", "--lr", "3e-3", "--device", "cpu", "--no-progress"]
    assert cli_main(["fit-presence", str(source), str(tiny_dataset), "--out", str(flat), "--head", "pixels", *common]) == 0
    assert cli_main(["fit-presence", str(flat), str(tiny_dataset), "--out", str(wide), "--head", "pixels", "--continue",
                     "--neighbours", *common]) == 0
    first, widened = (json.loads((folder / "pixel_presence_fit.json").read_text()) for folder in (flat, wide))
    assert widened["pixel_presence"]["neighbours"] and widened["continued"]
    assert widened["loss_per_epoch"][0] < first["loss_per_epoch"][0]       # it starts from what the first fit learnt
    model = CTReasonerModel.from_pretrained(str(wide), device="cpu")
    assert model.pixel_presence_net.unet.conv_0.conv_0.conv.weight.shape[1] == 9

    sample = next(s for s in CuratedDataset(str(tiny_dataset), "train") if s.task == "seg")
    pipeline = CTReasonerPipeline(model)
    with_them = pipeline.pixel_organ_logits(sample.image_hu, sample.organ, neighbours_hu=sample.neighbours_hu)
    without = pipeline.pixel_organ_logits(sample.image_hu, sample.organ)
    assert with_them.shape == sample.image_hu.shape and np.abs(with_them - without).max() > 1e-3
    result = pipeline.chat(sample.image_hu, sample.turns[0]["query"], neighbours_hu=sample.neighbours_hu)
    assert result.text
    with pytest.raises(InputFileError, match="neighbouring slices have shape"):
        pipeline.chat(sample.image_hu, "segment the liver", neighbours_hu=sample.neighbours_hu[:1])
    nan = sample.neighbours_hu.astype(np.float32)
    nan[0, 0, 0] = np.nan
    with pytest.raises(InputFileError, match="NaN"):
        pipeline.chat(sample.image_hu, "segment the liver", neighbours_hu=nan)

    assert pipeline.neighbour_distance_mm == 3.0
    # the network asks for the neighbours it learnt: those of the dataset it was fitted on
    far = tmp_path / "far-dataset"
    shutil.copytree(tiny_dataset, far)
    info = json.loads((far / "dataset.json").read_text())
    info["config"]["neighbour_distance_mm"] = 6.0
    (far / "dataset.json").write_text(json.dumps(info))
    assert cli_main(["fit-presence", str(flat), str(far), "--out", str(tmp_path / "far"), "--head", "pixels",
                     "--continue", "--neighbours", *common]) == 0
    assert CTReasonerPipeline.from_pretrained(str(tmp_path / "far"), device="cpu").neighbour_distance_mm == 6.0

    # a dataset curated before neighbours were stored is refused by name; so are --neighbours on the image head
    # and a continued fit that would drop them
    old = tmp_path / "old-dataset"
    shutil.copytree(tiny_dataset, old)
    for npz in (old / "slices").glob("*.npz"):
        arrays = dict(np.load(npz))
        arrays.pop("neighbours")
        np.savez_compressed(npz, **arrays)
    assert CuratedDataset(str(old), "train")[0].neighbours_hu is None
    for argv, message in [([str(flat), str(old), "--head", "pixels", "--continue", "--neighbours"], "stores no neighbouring"),
                          ([str(flat), str(tiny_dataset), "--neighbours"], "add --head pixels")]:
        assert cli_main(["fit-presence", *argv, "--out", str(tmp_path / "refused"), *common]) != 0
        assert message in capsys.readouterr().err
    from CTReasonerLib.model.pixel_presence import PixelPresenceConfig
    from CTReasonerLib.train.pixel_presence_fit import _config_to_continue
    with pytest.raises(ConfigError, match="keeps them"):
        _config_to_continue(model, PixelPresenceConfig(image_size=model.config.pixel_presence.image_size,
                                                       features=model.config.pixel_presence.features))

    # --head context: the decision over the slice's and each neighbour's maps, written into the config; the
    # pipeline's presence is that decision (with neighbours, and for a lone slice); its preconditions are named
    from CTReasonerLib.model.context_presence import context_presence, slice_context_features
    from CTReasonerLib.organs import get_organ

    context = tmp_path / "context"
    assert cli_main(["fit-presence", str(wide), str(tiny_dataset), "--out", str(context), "--head", "context",
                     "--l2", "1e-2", "--gate", "0.4", "--rescue", "0.45", "--device", "cpu", "--no-progress"]) == 0
    assert "subjects it has not seen" in capsys.readouterr().out     # the pixel network was fitted on this dataset
    fitted = json.loads((context / "context_presence_fit.json").read_text())
    assert fitted["head"] == "context" and fitted["l2"] == 1e-2 and fitted["questions"] > 0
    assert fitted["bce_decision"] < fitted["bce_top_k_score"]
    model = CTReasonerModel.from_pretrained(str(context), device="cpu")
    decision = model.config.presence_context
    assert decision is not None and len(decision.weights) == 14
    assert (model.config.presence_gate, model.config.presence_rescue) == (0.4, 0.45)
    pipeline = CTReasonerPipeline(model)
    net = model.pixel_presence_net
    label = get_organ(sample.organ).label
    for neighbours_hu in (sample.neighbours_hu, None):
        prepared = pipeline._prepare(sample.image_hu, neighbours_hu)
        with torch.no_grad():
            slice_map = net.probabilities(net.inputs(prepared.image[None], None if prepared.neighbours is None
                                                     else prepared.neighbours[None]))[0]
            neighbour_maps = None if prepared.neighbours is None else net.probabilities(net.inputs(prepared.neighbours))
            expected = context_presence(decision, slice_context_features(slice_map, neighbour_maps,
                                                                         net.config.top_k)[None])[0, label - 1]
        assert float(pipeline._pixel_presence(prepared)[label - 1]) == pytest.approx(float(expected), abs=1e-5)
    plain = CTReasonerPipeline(CTReasonerModel.from_pretrained(str(wide), device="cpu"))
    assert (pipeline._pixel_presence(pipeline._prepare(sample.image_hu, sample.neighbours_hu))
            - plain._pixel_presence(plain._prepare(sample.image_hu, sample.neighbours_hu))).abs().max() > 1e-3
    # a model whose gate reads image+pixels keeps reading both; the decision refines the pixels part
    both = tmp_path / "both"
    shutil.copytree(wide, both)
    config = json.loads((both / "ctreasoner_config.json").read_text())
    config["presence_from"] = "image+pixels"
    (both / "ctreasoner_config.json").write_text(json.dumps(config))
    assert cli_main(["fit-presence", str(both), str(tiny_dataset), "--out", str(tmp_path / "both-context"),
                     "--head", "context", "--heldout-split", "train", "--max-slices", "6", "--device", "cpu",
                     "--no-progress"]) == 0
    both_fit = json.loads((tmp_path / "both-context" / "context_presence_fit.json").read_text())
    assert both_fit["slices"] == 6 and both_fit["heldout_split"] == "train"
    assert both_fit["heldout_bce_decision"] < both_fit["heldout_bce_top_k_score"]   # on all 12 slices, 6 unseen
    assert json.loads((tmp_path / "both-context" / "ctreasoner_config.json").read_text())["presence_from"] == "image+pixels"
    # a pixel network refitted after it drops the decision that read the old one
    refitted = tmp_path / "refitted"
    assert cli_main(["fit-presence", str(context), str(tiny_dataset), "--out", str(refitted), "--head", "pixels",
                     "--continue", *common]) == 0
    assert "dropped" in capsys.readouterr().out
    assert CTReasonerModel.from_pretrained(str(refitted), device="cpu").config.presence_context is None
    for argv, message in [([str(flat), str(tiny_dataset), "--head", "context"], "does not read neighbouring slices"),
                          ([str(source), str(tiny_dataset), "--head", "context"], "has none"),
                          ([str(wide), str(tiny_dataset), "--head", "pixels", "--l2", "1"], "add --head context"),
                          ([str(wide), str(tiny_dataset), "--head", "context", "--gate", "0.5", "--rescue", "0.4"],
                           "must be >= presence_gate"),
                          ([str(wide), str(tiny_dataset), "--head", "context", "--presence-from", "lvlm"],
                           "does not read")]:
        assert cli_main(["fit-presence", *argv, "--out", str(tmp_path / "refused"), "--no-progress"]) != 0
        assert message in capsys.readouterr().err
