"""Weights holding nan or inf (a diverged run's): one check (core.checkpoint.check_finite) makes them a damaged
checkpoint for a resume (skipped for the one before it, by the launcher and a worker alike), for raygpt.export
(refused unless --allow-nonfinite) and for raygpt.sample (tests/test_sample_cli.py)."""

import shutil
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_LOCAL_RUN

from raygpt import export, launch
from raygpt.core import checkpoint
from raygpt.core.model import GPT, GPTConfig

MODEL_ARGS = dict(n_layer=1, n_head=2, n_embd=8, block_size=8, bias=False, vocab_size=16)
POISONED = "transformer.h.0.mlp.c_fc.weight"


def resumable_state(iter_num: int, poison: float | None = None) -> dict:
    """A tiny GPT's checkpoint as training writes one (compiled: the weights' names carry _orig_mod.), with
    `poison` (nan or inf) in one weight."""
    torch.manual_seed(iter_num)
    model = GPT(GPTConfig(**MODEL_ARGS))
    optimizer = torch.optim.AdamW(model.parameters())
    weights = {f"_orig_mod.{name}": value for name, value in model.state_dict().items()}
    if poison is not None:
        weights[f"_orig_mod.{POISONED}"][0, 0] = poison
    return {"model": weights, "optimizer": optimizer.state_dict(), "model_args": dict(MODEL_ARGS),
            "iter_num": iter_num, "config": {}}  # fmt: skip


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), float("-inf")])
def test_a_checkpoint_with_nonfinite_weights_is_skipped_for_the_one_before_it(tmp_path, poison):
    run = tmp_path / "run"
    older, latest = run / "checkpoint_2026-11-26_10-00-00.000000", run / "checkpoint_2026-11-26_10-05-00.000000"
    checkpoint.save_atomic(resumable_state(iter_num=20), older / "ckpt.pt")
    checkpoint.save_atomic(resumable_state(iter_num=40, poison=poison), latest / "ckpt.pt")
    # The launcher, deciding a rerun: the summary it reads refuses the latest, and the one before it is chosen.
    with pytest.raises(checkpoint.NonFiniteWeightsError, match=f"weight {POISONED} holds nan or inf values"):
        checkpoint.read_summary(latest)
    warnings = []
    source, summary = checkpoint.newest_readable([latest, older], warn=warnings.append)
    assert source == older and summary["iter_num"] == 20
    refusal = f"{latest}: weight {POISONED} holds nan or inf values"
    assert warnings == [f"warning: skipping checkpoint: {refusal}"]
    # A restarted worker, handed Ray's latest checkpoint, passes it over for the same reason.
    warnings.clear()
    ray_latest = SimpleNamespace(path=str(latest), filesystem=SimpleNamespace(type_name="local"))
    state, source = checkpoint.load_resume_state(ray_latest, warn=warnings.append)
    assert state["iter_num"] == 20 and source == str(older / "ckpt.pt")
    assert len(warnings) == 1 and "holds nan or inf values" in warnings[0]
    # With nothing before it, there is nothing to resume.
    with pytest.raises(checkpoint.CheckpointError, match="no usable checkpoint to resume from"):
        checkpoint.load_resume_state(fallback=latest / "ckpt.pt", warn=warnings.append)


def test_the_check_reads_the_weights_once_and_never_the_optimizer(tmp_path, monkeypatch):
    """A finite sum clears a tensor; only a tensor whose sum is not finite is looked at element by element,
    and the optimizer's state (twice the weights, in AdamW) is not read at all."""
    state = resumable_state(iter_num=3)
    state["optimizer"]["state"] = {0: {"exp_avg": torch.full((4,), float("nan"))}}  # never looked at
    checkpoint.save_atomic(state, tmp_path / "ckpt.pt")
    exact_tests = []
    isfinite = torch.isfinite
    monkeypatch.setattr(torch, "isfinite", lambda value: exact_tests.append(value.numel()) or isfinite(value))
    mapped, _ = checkpoint.read_checkpoint(tmp_path / "ckpt.pt", mmap=True)
    checkpoint.check_resumable(mapped, "ckpt")
    assert all(numel == 1 for numel in exact_tests)  # only the sums' finiteness was tested
    huge = torch.full((4,), 3e38)  # finite, but its float32 sum overflows: the exact test decides
    assert not checkpoint.holds_nonfinite(huge) and exact_tests[-1] == 4


def test_a_local_mode_resume_of_nonfinite_weights_is_refused_in_one_line(tmp_path, char_data, capsys):
    """Only out_dir/ckpt.pt to continue from, and it holds nan: refused before training, instead of a run that
    fails calling that file the last good checkpoint."""
    out_dir = tmp_path / "out"
    argv = [*TINY_LOCAL_RUN, f"--data_dir={char_data}", f"--out_dir={out_dir}"]
    assert launch.main(argv) == 0
    state = checkpoint.load(out_dir / "ckpt.pt")
    name = next(key for key in state["model"] if key.endswith(POISONED))
    state["model"][name][1, 2] = float("nan")
    checkpoint.save_atomic(state, out_dir / "ckpt.pt")
    poisoned = (out_dir / "ckpt.pt").read_bytes()
    capsys.readouterr()
    code = launch.main([*argv, "--max_iters=8"])
    out, err = capsys.readouterr()
    assert code == 2, err
    assert err.strip() == (
        f"error: no usable checkpoint to resume from: {out_dir / 'ckpt.pt'}: weight {POISONED} holds nan or inf "
        "values; --fresh starts a new run beside it (nothing is deleted)"
    )
    assert "warning: skipping checkpoint" in out
    assert (out_dir / "ckpt.pt").read_bytes() == poisoned


@pytest.mark.ray
def test_a_ray_run_continues_from_the_checkpoint_before_the_nonfinite_one(ray_local, tmp_path, char_data, capsys):
    """The launcher skips the latest Ray checkpoint (nan in its weights) for the one before it, and so does
    the worker Ray hands the latest to."""
    data = tmp_path / "data"
    shutil.copytree(char_data / "shakespeare_char", data / "shakespeare_char")
    argv = [a for a in TINY_LOCAL_RUN if a != "--local_mode=True"]
    argv += [f"--data_dir={data}", f"--out_dir={tmp_path / 'out'}", f"--storage_path={tmp_path / 'ray'}",
             "--run_name=diverged"]  # fmt: skip
    assert launch.main(argv) == 0
    checkpoints = sorted(p for p in (tmp_path / "ray" / "diverged").glob("checkpoint_*") if p.is_dir())
    assert len(checkpoints) == 2  # iters 2 and 4
    latest = checkpoints[-1] / "ckpt.pt"
    state = checkpoint.load(latest)
    name = next(key for key in state["model"] if key.endswith(POISONED))
    state["model"][name][0, 0] = float("inf")
    checkpoint.save_atomic(state, latest)
    (tmp_path / "out" / "ckpt.pt").unlink()  # its intact copy at iter 4 would be the newest good checkpoint
    capsys.readouterr()
    assert launch.main([*argv, "--max_iters=6"]) == 0
    out = capsys.readouterr().out
    assert f"warning: skipping checkpoint: {latest.parent}: weight {POISONED} holds nan or inf values" in out
    assert "continuing run 'diverged' (Ray checkpoints" in out and "from iter 2" in out
    resumed = checkpoint.load(tmp_path / "out" / "ckpt.pt")
    assert resumed["iter_num"] == 6 and resumed["resumed_from"] == str(checkpoints[0] / "ckpt.pt")


def test_export_refuses_nonfinite_weights_unless_asked(tmp_path, capsys):
    source = tmp_path / "diverged.pt"
    checkpoint.save_atomic(resumable_state(iter_num=3, poison=float("nan")), source)
    ckpt, hf = tmp_path / "export" / "ckpt.pt", tmp_path / "hf"
    assert export.main([str(source), "--ckpt", str(ckpt), "--hf", str(hf)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {source}: weight {POISONED} holds nan or inf values; export an earlier checkpoint, or pass "
        "--allow-nonfinite to write it anyway"
    )
    assert not ckpt.exists() and not hf.exists()
    assert export.main([str(source), "--hf", str(hf)]) == 2  # --hf alone, the same check
    assert "holds nan or inf values" in capsys.readouterr().err and not hf.exists()

    assert export.main([str(source), "--ckpt", str(ckpt), "--hf", str(hf), "--allow-nonfinite"]) == 0
    err = capsys.readouterr().err
    assert err.strip() == f"warning: {source}: weight {POISONED} holds nan or inf values; writing it all the same " \
                          "(--allow-nonfinite)"  # fmt: skip
    assert torch.isnan(checkpoint.load(ckpt)["model"][f"_orig_mod.{POISONED}"]).any()
    from safetensors.torch import load_file

    assert torch.isnan(load_file(hf / "model.safetensors")[POISONED]).any()


def sharded_checkpoint(folder, poison: float) -> None:
    """An FSDP run's sharded checkpoint (torch.distributed.checkpoint's files and train_state.pt), written
    without a process group, with `poison` in one weight."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    torch.manual_seed(0)
    model = GPT(GPTConfig(**MODEL_ARGS))
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu", verbose=False)  # as training builds it
    x = torch.randint(0, MODEL_ARGS["vocab_size"], (2, MODEL_ARGS["block_size"]))
    model(x, x)[1].backward()
    optimizer.step()
    with torch.no_grad():
        model.get_parameter(POISONED)[0, 0] = poison
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=folder, no_dist=True)
    torch.save({"model_args": dict(MODEL_ARGS), "iter_num": 5, "config": {}}, folder / checkpoint.PROGRESS_NAME)


def test_export_refuses_the_nonfinite_weights_of_a_sharded_checkpoint(tmp_path, capsys):
    sharded_checkpoint(tmp_path / "sharded", float("nan"))
    ckpt, hf = tmp_path / "ckpt.pt", tmp_path / "hf"
    assert export.main([str(tmp_path / "sharded"), "--ckpt", str(ckpt), "--hf", str(hf)]) == 2
    refusal = f"weight {POISONED} holds nan or inf values; export an earlier checkpoint, or pass --allow-nonfinite"
    assert capsys.readouterr().err.strip().endswith(f"{refusal} to write it anyway")
    assert not ckpt.exists() and not hf.exists()
