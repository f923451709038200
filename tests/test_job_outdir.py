"""Where a Ray job's files land: `ray job submit --working-dir .` runs the launcher inside Ray's copy of the
project, which Ray deletes when the job ends, so a relative out_dir goes to the run's folder of Ray's
storage instead, where the same job submitted again finds it.

The fast tier gives the launcher (local mode, in this process) what Ray's job supervisor gives a job's
driver: the job's config in its variable, and a working directory inside the session's runtime_resources.
test_job_submit.py submits the real job, twice, to a real head.
"""

import json

import pytest
from conftest import TINY_LOCAL_RUN

from raygpt import launch
from raygpt.ray_compat import JOB_CONFIG_VARIABLE, job_working_dir

WORKING_DIR_URI = "gcs://_ray_pkg_0123456789abcdef.zip"  # what `--working-dir .` becomes once uploaded


@pytest.fixture
def job_driver(tmp_path, monkeypatch):
    """This process as Ray's job supervisor starts a job's driver: in its copy of the working dir."""
    copy = tmp_path / "session_latest" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123456789abcdef"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    job_config = {"runtime_env": {"working_dir": WORKING_DIR_URI}, "metadata": {}}
    monkeypatch.setenv(JOB_CONFIG_VARIABLE, json.dumps(job_config))
    return copy


def test_the_variable_is_the_one_ray_hands_a_jobs_driver():
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    assert JOB_CONFIG_VARIABLE == RAY_JOB_CONFIG_JSON_ENV_VAR


def test_only_a_job_with_a_working_dir_counts(monkeypatch):
    monkeypatch.delenv(JOB_CONFIG_VARIABLE, raising=False)
    assert job_working_dir() is None
    for config in ('{"runtime_env": {}}', '{"runtime_env": {"pip": ["x"]}}', "not json", "[]"):
        monkeypatch.setenv(JOB_CONFIG_VARIABLE, config)
        assert job_working_dir() is None, config
    monkeypatch.setenv(JOB_CONFIG_VARIABLE, json.dumps({"runtime_env": {"working_dir": WORKING_DIR_URI}}))
    assert job_working_dir() == WORKING_DIR_URI


def test_a_jobs_relative_out_dir_lands_in_the_runs_storage_folder(job_driver, tmp_path, char_data, capsys):
    storage = tmp_path / "ray"
    argv = [*TINY_LOCAL_RUN, f"--data_dir={char_data}", f"--storage_path={storage}"]  # out_dir: the default 'out'
    assert launch.main(argv) == 0
    kept = storage / "out" / "out"
    assert (kept / "ckpt.pt").is_file() and (kept / "metrics.jsonl").is_file()
    assert not (job_driver / "out").exists()
    out = capsys.readouterr().out
    assert f"raygpt: out_dir out is {kept}, a folder of its Ray run: a Ray job runs in a copy of its working dir" in out
    # An absolute out_dir is the user's choice: kept as given.
    mine = tmp_path / "mine"
    assert launch.main([*argv, f"--out_dir={mine}"]) == 0
    assert (mine / "ckpt.pt").is_file()


def test_a_job_continues_the_out_dir_its_run_was_recorded_with(job_driver, tmp_path, char_data, capsys):
    """The quick start trained here in ./out, then the same config is submitted as a job: the run's record
    names that out_dir, and the job goes on there instead of a second out_dir the run refuses."""
    storage, trained_here = tmp_path / "ray", tmp_path / "project" / "out"
    trained_here.mkdir(parents=True)
    (storage / "out").mkdir(parents=True)
    record = {"run_id": "0123abcd", "run_name": "out", "out_dir": str(trained_here)}
    (storage / "out" / "raygpt-run.json").write_text(json.dumps(record))  # what a launch on Ray wrote
    argv = [*TINY_LOCAL_RUN, f"--data_dir={char_data}", f"--storage_path={storage}"]
    assert launch.main(argv) == 0
    assert (trained_here / "ckpt.pt").is_file() and not (storage / "out" / "out").exists()
    out = capsys.readouterr().out
    assert f"raygpt: out_dir out is {trained_here}, the out_dir its Ray run was recorded with: a Ray job" in out


def test_a_jobs_relative_storage_path_is_refused(job_driver, char_data, capsys):
    argv = [*TINY_LOCAL_RUN, f"--data_dir={char_data}", "--storage_path=runs"]
    assert launch.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: storage_path runs is relative, but a Ray job runs in a copy of its working dir that "
                   "Ray deletes when the job ends: pass an absolute --storage_path or a URI")  # fmt: skip
    assert not list(job_driver.iterdir())
