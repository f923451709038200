"""raygpt.export's CHECKPOINT as a newcomer gives it: a Ray run folder (its latest checkpoint), an out_dir,
the shell pattern of a run's checkpoint_* and the file Ray keeps beside them; and --hf without safetensors,
refused before anything is written. Fast tier: tiny checkpoints in real folders (and in a moto S3 bucket)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from raygpt import export
from raygpt.core import checkpoint
from raygpt.core.model import GPT, GPTConfig

MODEL_ARGS = dict(n_layer=1, n_head=2, n_embd=16, block_size=8, bias=False, vocab_size=65)
# Ray names a run's checkpoints by the time they were reported, and keeps its own record beside them.
EARLIER, LATER = "checkpoint_2026-01-01_10-00-00.000000", "checkpoint_2026-01-01_10-05-00.000000"
RAY_RECORD = "checkpoint_manager_snapshot.json"


def save_checkpoint(folder, iter_num: int, summary: bool = True):
    """A whole-model checkpoint as raygpt hands it to Ray: ckpt.pt, and summary.json beside it."""
    torch.manual_seed(iter_num)
    state = {"model": GPT(GPTConfig(**MODEL_ARGS)).state_dict(), "model_args": MODEL_ARGS, "iter_num": iter_num,
             "optimizer": {"state": {}, "param_groups": []}, "config": {}}  # fmt: skip
    folder.mkdir(parents=True)
    checkpoint.save_atomic(state, folder / checkpoint.CKPT_NAME)
    if summary:
        (folder / checkpoint.SUMMARY_NAME).write_text(json.dumps({"model_args": MODEL_ARGS, "iter_num": iter_num}))
    return state


@pytest.fixture
def ray_run(tmp_path):
    """storage_path/run_name of a run with two checkpoints (iter 4, then 8) and Ray's record beside them."""
    run = tmp_path / "ray_results" / "out-mine"
    save_checkpoint(run / EARLIER, 4)
    save_checkpoint(run / LATER, 8)
    (run / RAY_RECORD).write_text('{"checkpoints": []}')
    return run


def exported(capsys, *argv) -> tuple[int, str, str]:
    code = export.main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return code, out, err


def refusal(code: int, err: str) -> str:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_a_ray_run_folder_exports_its_latest_checkpoint(tmp_path, capsys, ray_run):
    code, out, err = exported(capsys, ray_run, "--ckpt", tmp_path / "export" / "ckpt.pt")
    assert code == 0, err
    assert checkpoint.load(tmp_path / "export" / "ckpt.pt")["iter_num"] == 8
    assert f"{ray_run / LATER} (iter 8) is the latest checkpoint of Ray run folder {ray_run}" in out


def test_the_latest_is_by_iteration_as_a_resume_chooses(tmp_path, capsys, ray_run):
    """Ray may report a checkpoint of an earlier iteration after a later one (a run continued from an
    older checkpoint); the one at the latest iteration is exported, as a resume would continue it."""
    save_checkpoint(ray_run / "checkpoint_2026-01-01_10-10-00.000000", 6)
    code, out, err = exported(capsys, ray_run, "--ckpt", tmp_path / "ckpt.pt")
    assert code == 0, err
    assert checkpoint.load(tmp_path / "ckpt.pt")["iter_num"] == 8


def test_a_shell_pattern_of_the_run_is_one_line_naming_the_run_folder(tmp_path, capsys, ray_run):
    matches = sorted(ray_run.glob("checkpoint_*"))  # what `RUN/checkpoint_*` expands to: Ray's record too
    assert [p.name for p in matches] == [EARLIER, LATER, RAY_RECORD]
    line = refusal(*exported(capsys, *matches, "--ckpt", tmp_path / "ckpt.pt")[::2])
    assert line == (
        "error: give one CHECKPOINT, not 3 (did a shell pattern expand?): a Ray run folder such as "
        f"{ray_run} exports its latest checkpoint"
    )
    assert not (tmp_path / "ckpt.pt").exists()


def test_rays_record_beside_the_checkpoints_is_not_called_damaged(tmp_path, capsys, ray_run):
    line = refusal(*exported(capsys, ray_run / RAY_RECORD, "--ckpt", tmp_path / "ckpt.pt")[::2])
    assert line.startswith(f"error: {ray_run / RAY_RECORD} is not a checkpoint (not a file torch.save wrote)")
    assert line.endswith(f"; {ray_run} is a Ray run folder, which exports its latest checkpoint")
    assert "damaged" not in line


def test_the_storage_path_itself_names_its_runs(tmp_path, capsys, ray_run):
    line = refusal(*exported(capsys, ray_run.parent, "--ckpt", tmp_path / "ckpt.pt")[::2])
    assert line.startswith(f"error: {ray_run.parent} holds no checkpoint: give a ckpt.pt, a checkpoint folder")
    assert line.endswith(f"; it holds Ray runs: give one of them, such as {ray_run}")


def test_an_out_dir_exports_its_ckpt_pt(tmp_path, capsys):
    save_checkpoint(tmp_path / "out-shakespeare-char-cpu", 20, summary=False)
    code, out, err = exported(capsys, tmp_path / "out-shakespeare-char-cpu", "--ckpt", tmp_path / "ckpt.pt")
    assert code == 0, err
    assert checkpoint.load(tmp_path / "ckpt.pt")["iter_num"] == 20


def test_an_out_dir_without_a_ckpt_pt_names_its_ray_run(tmp_path, capsys):
    """An FSDP run writes no ckpt.pt to out_dir: its run record says where the checkpoints went."""
    out_dir = tmp_path / "out-fsdp"
    out_dir.mkdir()
    (out_dir / "raygpt-run.json").write_text(json.dumps({"run_id": "ab12", "run_name": "big", "out_dir": "x"}))
    line = refusal(*exported(capsys, out_dir, "--ckpt", tmp_path / "ckpt.pt")[::2])
    assert line.endswith(
        "; its run's checkpoints are in Ray's run folder, storage_path/big (by default ~/ray_results/big)"
    )


def test_a_ray_run_folder_in_object_storage_downloads_only_its_latest(tmp_path, capsys, ray_run, s3_server):
    import pyarrow.fs

    from raygpt.storage.uri import open_filesystem

    uri = f"{s3_server.create_bucket()}/raygpt/out-mine"
    filesystem, path = open_filesystem(uri)
    pyarrow.fs.copy_files(str(ray_run), path, destination_filesystem=filesystem)
    code, out, err = exported(capsys, uri, "--ckpt", tmp_path / "ckpt.pt")
    assert code == 0, err
    assert checkpoint.load(tmp_path / "ckpt.pt")["iter_num"] == 8
    assert f"{uri}/{LATER} (iter 8) is the latest checkpoint of Ray run folder {uri}" in out
    copy = Path(out.split(" from ")[-1].strip()).parent  # the local copy read: that checkpoint alone
    assert sorted(p.name for p in copy.iterdir()) == [checkpoint.CKPT_NAME, checkpoint.SUMMARY_NAME]


BLOCK_SAFETENSORS = "import sys; sys.modules['safetensors'] = None; from raygpt.export import main; sys.exit(main())"


def test_hf_without_safetensors_is_refused_before_anything_is_written(tmp_path, ray_run):
    """safetensors missing (the [hf] extra not installed): one line naming the extra, and neither --ckpt's
    file nor --hf's folder (nor a folder above them) made."""
    before = sorted(tmp_path.rglob("*"))
    argv = [ray_run, "--ckpt", tmp_path / "new" / "ckpt.pt", "--hf", tmp_path / "hf"]
    done = subprocess.run([sys.executable, "-c", BLOCK_SAFETENSORS, *map(str, argv)], capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert refusal(done.returncode, done.stderr) == (
        'error: --hf writes model.safetensors, and safetensors is not installed: pip install -e ".[hf]" in the '
        "raygpt folder (the [hf] extra), or pip install safetensors"
    )
    assert done.stdout == ""  # not even the choice of checkpoint: nothing was read
    assert sorted(tmp_path.rglob("*")) == before
