"""FSDP2, activation checkpointing, sharded checkpoints and export, on CPU workers with gloo."""

import pytest
import torch

from raygpt import export, launch
from raygpt.config.schema import TrainConfig
from raygpt.core import checkpoint
from raygpt.core.model import GPT, GPTConfig

RUN = dict(
    dataset="shakespeare_char",
    n_layer=2,
    n_head=2,
    n_embd=32,
    block_size=32,
    batch_size=8,
    gradient_accumulation_steps=2,
    dropout=0.0,
    learning_rate=1e-2,
    min_lr=1e-3,
    warmup_iters=2,
    lr_decay_iters=20,
    eval_interval=2,
    eval_iters=3,  # not a multiple of the 2 workers: FSDP ranks must still make the same eval passes
    log_interval=2,
    device="cpu",
    dtype="float32",
    compile=False,
    seed=5,
    num_workers=2,
    cpus_per_worker=1,
)


def run(tmp_path, char_data, name, **overrides):
    paths = {"data_dir": str(char_data), "out_dir": str(tmp_path / name), "storage_path": str(tmp_path / "ray")}
    cfg = TrainConfig(**{**RUN, **paths, **overrides})
    return launch.run(cfg, explicit_keys=set(overrides))


def whole_weights(result) -> dict:
    """The run's latest Ray checkpoint as one whole state dict, however it was saved."""
    saved, _ = checkpoint.read_checkpoint(result.checkpoint.path)
    return checkpoint.whole_model_state(saved)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_recomputes_the_same_loss_and_gradients(mode):
    from raygpt.core.parallel import recompute_layers

    config = GPTConfig(n_layer=4, n_head=2, n_embd=32, block_size=16, vocab_size=65, dropout=0.1)
    torch.manual_seed(0)
    plain = GPT(config)
    recomputing = GPT(config)
    recomputing.load_state_dict(plain.state_dict())
    recomputing.recompute_layers = recompute_layers(mode, config.n_layer)
    assert recomputing.recompute_layers == ({0, 1, 2, 3} if mode == "full" else {0, 2})
    x = torch.randint(0, 65, (4, 16))
    losses = []
    for model in (plain, recomputing):
        torch.manual_seed(1)  # the same dropout masks: checkpointing replays the RNG in its recomputation
        _, loss = model(x, x)
        loss.backward()
        losses.append(loss)
    assert torch.equal(losses[0], losses[1])
    for (name, a), b in zip(plain.named_parameters(), recomputing.parameters()):
        assert torch.equal(a.grad, b.grad), name


def test_fsdp_trains_as_ddp_does_and_resumes_across_parallelism_and_worker_counts(ray_local, tmp_path, char_data):
    ddp = run(tmp_path, char_data, "ddp", max_iters=6)
    fsdp = run(tmp_path, char_data, "fsdp", max_iters=6, parallelism="fsdp")
    # The same training, sharded: equal losses within float tolerance.
    assert fsdp.metrics["val_loss"] == pytest.approx(ddp.metrics["val_loss"], abs=1e-5)
    assert fsdp.metrics["weights_in_sync"] is None  # shards differ by design: nothing to compare
    latest = sorted(p.name for p in (tmp_path / "ray" / "fsdp").iterdir())
    sharded = fsdp.checkpoint.path
    names = sorted(p.name for p in checkpoint.Path(sharded).iterdir())
    assert names == [".metadata", "__0_0.distcp", "__1_0.distcp", "summary.json", "train_state.pt"], (latest, names)
    assert not (tmp_path / "fsdp" / "ckpt.pt").exists()  # no consolidated copy: raygpt.export makes one
    for key, value in whole_weights(ddp).items():
        assert torch.allclose(value, whole_weights(fsdp)[key], atol=1e-5), key

    # Stopped at 4 and continued to 6 (a sharded resume): bit-identical to the straight run.
    run(tmp_path, char_data, "fsdp-resumed", max_iters=4, parallelism="fsdp")
    resumed = run(tmp_path, char_data, "fsdp-resumed", max_iters=6, parallelism="fsdp")
    straight, continued = whole_weights(fsdp), whole_weights(resumed)
    assert all(torch.equal(straight[key], continued[key]) for key in straight)

    # The sharded run continued by one DDP worker (from the shards), and the DDP run by two FSDP workers
    # (from its ckpt.pt). Each continues where it stopped (worker counts change the data shards, so
    # the two continuations train on different batches: the issue on elastic runs changes that).
    one_worker = run(tmp_path, char_data, "fsdp-resumed", max_iters=8, num_workers=1)
    ddp_state = checkpoint.load(tmp_path / "fsdp-resumed" / "ckpt.pt")
    assert ddp_state["iter_num"] == 8 and ddp_state["resumed_from"] == resumed.checkpoint.path
    assert one_worker.metrics["val_loss"] < resumed.metrics["val_loss"]
    sharded_again = run(tmp_path, char_data, "ddp", max_iters=8, parallelism="fsdp")
    progress, _ = checkpoint.read_checkpoint(sharded_again.checkpoint.path)
    assert progress["iter_num"] == 8 and progress["resumed_from"].endswith("ckpt.pt")
    assert sharded_again.metrics["val_loss"] < ddp.metrics["val_loss"]

    # Export: nanoGPT's ckpt.pt from the shards (weights and a position-keyed optimizer), and a
    # Hugging Face GPT-2 whose logits equal raygpt's model's.
    assert export.main([sharded, "--ckpt", str(tmp_path / "export" / "ckpt.pt"), "--hf", str(tmp_path / "hf")]) == 0
    whole = checkpoint.load(tmp_path / "export" / "ckpt.pt")
    assert whole["iter_num"] == 6 and sorted(whole["optimizer"]["state"]) == list(
        range(len(whole["optimizer"]["state"]))
    )
    assert all(torch.equal(whole["model"][key], straight[key]) for key in straight)
    assert_hf_logits_equal(whole, tmp_path / "hf")


def assert_hf_logits_equal(whole: dict, hf_dir):
    from transformers import GPT2LMHeadModel

    model = GPT(GPTConfig(**checkpoint.architecture(whole, "export"))).eval()
    model.load_state_dict(whole["model"])
    hf = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    x = torch.randint(0, whole["model_args"]["vocab_size"], (2, whole["model_args"]["block_size"]))
    with torch.no_grad():
        ours, _ = model(x, x)
        theirs = hf(x).logits
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()


def test_export_of_a_whole_checkpoint_with_biases_matches_transformers(tmp_path):
    torch.manual_seed(0)
    args = dict(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=50304, bias=True)
    model = GPT(GPTConfig(**args))
    checkpoint.save_atomic({"model": model.state_dict(), "model_args": args, "iter_num": 3}, tmp_path / "ckpt.pt")
    assert export.main([str(tmp_path / "ckpt.pt"), "--hf", str(tmp_path / "hf")]) == 0
    assert_hf_logits_equal(checkpoint.load(tmp_path / "ckpt.pt"), tmp_path / "hf")


def test_export_refuses_in_one_line(tmp_path, capsys):
    assert export.main([str(tmp_path / "nothing"), "--ckpt", str(tmp_path / "x.pt")]) == 2
    assert capsys.readouterr().err.strip() == f"error: no checkpoint at {tmp_path / 'nothing'}"
    (tmp_path / "empty").mkdir()
    assert export.main([str(tmp_path / "empty"), "--hf", str(tmp_path / "hf")]) == 2
    assert "holds no checkpoint" in capsys.readouterr().err
    assert export.main([str(tmp_path / "empty")]) == 2
    assert "nothing to write" in capsys.readouterr().err


@pytest.mark.parametrize("reshard", [True, False])
def test_blocks_keep_their_gathered_weights_until_backward_only_when_asked(tmp_path, reshard):
    """--fsdp_reshard_after_forward=False leaves each block's weights gathered between its forward and its
    backward; True (the default) frees all but the last block's. The loss is the same either way."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from raygpt.core.parallel import shard_model

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "rendezvous"), 1), rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = GPT(GPTConfig(n_layer=3, n_head=2, n_embd=16, block_size=8, bias=False, vocab_size=32, dropout=0.0))
        x = torch.arange(16).reshape(2, 8) % 32
        unsharded_loss = model(x, x)[1].item()
        cfg = TrainConfig(**{**RUN, "fsdp_reshard_after_forward": reshard, "parallelism": "fsdp"})
        shard_model(model, cfg, "default", "float32", cuda_graphs=False, device=torch.device("cpu"))
        _, loss = model(x, x)
        gathered = [not isinstance(block.mlp.c_fc.weight, DTensor) for block in model.transformer.h]
        loss.backward()
    finally:
        dist.destroy_process_group()
    assert gathered == [not reshard, not reshard, True]
    assert loss.item() == pytest.approx(unsharded_loss, abs=1e-6)
