"""launchers/: dry runs under a faked SLURM environment, and the signal -> checkpoint -> requeue path.

No SLURM here: `srun` and `scontrol` are small fakes put first on PATH. The fake srun runs its
command in place (one node), the fake scontrol records its arguments, so the test sees whether
the batch script took its requeue branch.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_helpers import base_overrides, free_port, make_assets

REPO = Path(__file__).resolve().parents[2]
SBATCH = REPO / "launchers" / "slurm.sbatch"
LOCAL = REPO / "launchers" / "local.sh"
sys.path.insert(0, str(REPO / "launchers"))
from nodelist import expand  # noqa: E402


def run_script(script: Path, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """A launcher script under bash from the repository root (dry runs: seconds)."""
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=60)


def slurm_env(tmp: Path, nodes: int, nodelist: str, job_id: str = "4242", **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and not k.startswith("RETRO_")}
    env.update(
        SLURM_JOB_ID=job_id,
        SLURM_NNODES=str(nodes),
        SLURM_JOB_NODELIST=nodelist,
        SLURM_PROCID="0",
        RETRO_LOG_DIR=str(tmp / "logs"),
        RETRO_PYTHON=sys.executable,
        **extra,
    )
    return env


def torchrun_lines(stdout: str) -> dict[int, list[str]]:
    """node rank -> the argv of the torchrun command printed for that node."""
    out = {}
    for line in stdout.splitlines():
        if line.startswith("node "):
            head, command = line.split(": ", 1)
            out[int(head.split()[1])] = shlex.split(command)
    return out


def option(argv: list[str], name: str) -> str:
    values = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
    assert len(values) == 1, (name, argv)
    return values[0]


def test_nodelist_expansion():
    assert expand("gpu[001-004]") == ["gpu001", "gpu002", "gpu003", "gpu004"]
    assert expand("gpu[07-09,12],login1") == ["gpu07", "gpu08", "gpu09", "gpu12", "login1"]
    assert expand("a[1-2]b[3-4]") == ["a1b3", "a1b4", "a2b3", "a2b4"]
    assert expand("node7") == ["node7"]
    with pytest.raises(ValueError, match="gpu\\[001-"):
        expand("gpu[001-")


@pytest.mark.parametrize(
    "nodes, nodelist, gpu_var, hosts",
    [
        (1, "gpu017", {"SLURM_GPUS_ON_NODE": "8"}, ["gpu017"]),
        (4, "gpu[001-004]", {"SLURM_GPUS_PER_NODE": "h100:4"}, ["gpu001", "gpu002", "gpu003", "gpu004"]),
    ],
)
def test_slurm_dry_run(tmp_path, nodes, nodelist, gpu_var, hosts):
    config = tmp_path / "run.toml"
    config.write_text("[train]\nsteps = 10\n")
    env = slurm_env(tmp_path, nodes, nodelist, **gpu_var)
    env["PATH"] = "/usr/bin:/bin"  # no scontrol: the node list is parsed by launchers/nodelist.py
    result = run_script(SBATCH, ["--dry-run", str(config), "--optim.lr=3e-4", "--train.out_dir=/x y"], env)
    assert result.returncode == 0, result.stderr
    commands = torchrun_lines(result.stdout)
    assert sorted(commands) == list(range(nodes))
    nproc = gpu_var.get("SLURM_GPUS_ON_NODE") or gpu_var["SLURM_GPUS_PER_NODE"].split(":")[-1]
    port = str(20000 + 4242 % 20000)
    for rank, argv in commands.items():
        assert argv[0] == "torchrun"
        assert option(argv, "nnodes") == str(nodes)
        assert option(argv, "node_rank") == str(rank)
        assert option(argv, "nproc_per_node") == nproc
        assert option(argv, "rdzv_backend") == "c10d"
        assert option(argv, "rdzv_endpoint") == f"{hosts[0]}:{port}"  # the first node hosts the rendezvous
        assert option(argv, "rdzv_id") == "4242"
        assert option(argv, "rdzv_conf") == f"is_host={int(rank == 0)}"
        assert option(argv, "max_restarts") == "0"
        script = argv.index(str(REPO / "launchers" / "worker.py"))
        assert argv[script + 1 :] == [
            "--config",
            str(config),
            "--optim.lr=3e-4",
            "--train.out_dir=/x y",
            "--resume",
            "auto",
        ]
        assert f"node {rank} ({hosts[rank]})" in result.stdout


@pytest.mark.parametrize("restart, last", [("0", ["--resume", "none", "--force"]), ("1", ["--resume", "auto"])])
def test_a_requeued_start_resumes_whatever_the_submission_said(tmp_path, restart, last):
    """Used to keep `--resume none --force` on every requeue: each restart set its own checkpoints aside and
    began again at step 1. A requeued start (SLURM_RESTART_COUNT > 0) now ends its arguments with --resume auto."""
    config = tmp_path / "run.toml"
    config.write_text("[train]\nsteps = 10\n")
    env = slurm_env(tmp_path, 1, "gpu017", SLURM_GPUS_ON_NODE="1", SLURM_RESTART_COUNT=restart)
    env["PATH"] = "/usr/bin:/bin"
    result = run_script(SBATCH, ["--dry-run", str(config), "--resume", "none", "--force"], env)
    assert result.returncode == 0, result.stderr
    (argv,) = torchrun_lines(result.stdout).values()
    assert argv[-len(last) :] == last


def test_slurm_dry_run_rejects_mismatched_nodelist(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text("")
    env = slurm_env(tmp_path, 4, "gpu[001-003]", SLURM_GPUS_ON_NODE="8", RETRO_DRY_RUN="1")
    result = run_script(SBATCH, [str(config)], env)
    assert result.returncode != 0
    assert "SLURM_NNODES=4 but the node list has 3 hosts" in result.stderr


def test_local_dry_run(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text("")
    env = {**os.environ, "RETRO_NPROC_PER_NODE": "2"}
    result = run_script(LOCAL, ["--dry-run", str(config), "--train.steps=3", "--resume", "none"], env)
    assert result.returncode == 0, result.stderr
    assert shlex.split(result.stdout.strip()) == [
        "torchrun",
        "--standalone",
        "--nnodes=1",
        "--nproc_per_node=2",
        str(REPO / "launchers" / "worker.py"),  # the worker records each rank's own exit code
        "--config",
        str(config),
        "--train.steps=3",
        "--resume",
        "none",
    ]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("launch_assets"))


@pytest.fixture
def fake_slurm_bin(tmp_path):
    """`srun` that runs its command in place; `scontrol` that records its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\nwhile [[ $1 == --* ]]; do shift; done\nexec "$@"\n')
    (bin_dir / "scontrol").write_text(
        f'#!/usr/bin/env bash\necho "$*" >> {tmp_path}/scontrol.log\n[[ $1 == requeue ]]\n'
    )
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return bin_dir


def run_batch(tmp_path, bin_dir, overrides, restart: int, signal_after_lines: int | None = None):
    """`bash slurm.sbatch CONFIG overrides...` on one faked node; base_overrides' --config becomes CONFIG."""
    if overrides[:1] == ["--config"]:
        config, overrides = overrides[1], overrides[2:]
    else:
        config = tmp_path / "run.toml"
        config.write_text("")
    env = slurm_env(
        tmp_path,
        1,
        "localhost",
        SLURM_GPUS_ON_NODE="1",
        SLURM_RESTART_COUNT=str(restart),
        OMP_NUM_THREADS="1",
        RETRO_RDZV_PORT=str(free_port()),
    )  # the job-id port could be taken by a concurrent test
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    proc = subprocess.Popen(
        ["bash", str(SBATCH), str(config), *overrides],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )
    if signal_after_lines is not None:
        (out_dir,) = [o.split("=", 1)[1] for o in overrides if o.startswith("--train.out_dir=")]
        metrics = Path(out_dir) / "metrics.jsonl"
        deadline = time.time() + 60
        while not (metrics.is_file() and metrics.read_text().count("\n") >= signal_after_lines):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.1)
        proc.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@300` does before the time limit
    stdout, stderr = proc.communicate(timeout=120)
    return proc.returncode, stdout, stderr


def test_signal_checkpoint_requeue_resume(tmp_path, assets, fake_slurm_bin):
    model, data = assets
    out = tmp_path / "run"
    overrides = base_overrides(model, data, out, **{"train.steps": 10_000})
    code, stdout, stderr = run_batch(tmp_path, fake_slurm_bin, overrides, restart=0, signal_after_lines=2)
    assert code == 0, stderr[-3000:]
    # The trainer itself exited with REQUEUE_EXIT_CODE (recorded by launchers/worker.py) ...
    assert (tmp_path / "logs/exit/4242/restart_0/node_0/rank_0").read_text().strip() == "85"
    # ... after writing a complete checkpoint ...
    checkpoints = sorted((out / "checkpoints").iterdir())
    assert len(checkpoints) == 1 and (checkpoints[0] / "COMPLETE").is_file()
    assert (checkpoints[0] / "rank_0.pt").is_file() and any(checkpoints[0].glob("*.distcp"))
    saved_step = int(checkpoints[0].name.split("_")[1])
    assert saved_step >= 2
    # ... and the batch script took its requeue branch.
    assert "requeue 4242" in (tmp_path / "scontrol.log").read_text().splitlines()
    assert "requeueing job 4242" in stdout

    # The requeued job (SLURM_RESTART_COUNT=1) resumes from that checkpoint and finishes.
    (tmp_path / "scontrol.log").unlink()
    overrides = base_overrides(model, data, out, **{"train.steps": saved_step + 2})
    code, stdout, stderr = run_batch(tmp_path, fake_slurm_bin, overrides, restart=1)
    assert code == 0, stderr[-3000:]
    assert f"resuming from {checkpoints[0]}" in stdout
    assert "training finished" in stdout
    assert (tmp_path / "logs/exit/4242/restart_1/node_0/rank_0").read_text().strip() == "0"
    assert "requeue" not in (tmp_path / "scontrol.log").read_text()


def test_failure_is_not_requeued(tmp_path, assets, fake_slurm_bin):
    model, data = assets
    overrides = base_overrides(model, data, tmp_path / "run", **{"train.global_batch": 7})  # not divisible: exit 2
    code, stdout, stderr = run_batch(tmp_path, fake_slurm_bin, overrides, restart=0)
    assert code == 2, stderr[-3000:]
    assert (tmp_path / "logs/exit/4242/restart_0/node_0/rank_0").read_text().strip() == "2"
    assert "not requeueing" in stderr
    log = tmp_path / "scontrol.log"
    assert not log.exists() or "requeue" not in log.read_text()
