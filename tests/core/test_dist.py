"""Who am I: rank and world from torchrun / the DeepSpeed launcher, or from srun."""

from rapid.dist import Env, env


def test_one_process_without_a_launcher(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    assert env() == Env(0, 1, 0, 1)


def test_torchrun_and_deepspeed_variables(monkeypatch):
    for key, value in {"RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "8"}.items():
        monkeypatch.setenv(key, value)
    assert env() == Env(5, 16, 1, 8)


def test_srun_variables(monkeypatch):
    for key in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in {"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_NNODES": "2"}.items():
        monkeypatch.setenv(key, value)
    assert env() == Env(9, 16, 1, 8)
