"""Launch scripts: --help, argument checks, dry runs (the printed commands), and real runs against
stand-in gcloud / scontrol / srun / nvidia-smi / python that record what they were asked to do."""

from __future__ import annotations

import os
import pathlib
import re
import shlex
import subprocess
import sys
import textwrap

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = ("tpu_pod.sh", "slurm_gpu.sbatch", "gpu_single_host.sh", "local_cpu.sh")
VERSION = re.search(r'^version = "(.*)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)
JAX_VERSION = re.search(r'"jax>=([0-9.]+)"', (REPO / "pyproject.toml").read_text()).group(1)
RECIPE, MESH = REPO / "configs/paper/grpo_ktae_1.5b.yaml", REPO / "configs/mesh/tpu_v4_64.yaml"


@pytest.fixture
def fakes(tmp_path) -> pathlib.Path:
    """A bin folder whose tools append their argv (NUL-separated, one record per call) to calls.log."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"

    def tool(name: str, body: str = "") -> None:
        path = bin_dir / name
        path.write_text(textwrap.dedent(f"""\
            #!/usr/bin/env bash
            {{ printf '%s\\0' {name} "$@"; printf '\\x1e'; }} >> {log}
            """) + textwrap.dedent(body))
        path.chmod(0o755)

    # describe fails unless FAKE_EXISTS is set (then the TPU / bucket "exist").
    tool("gcloud", '[[ " $* " == *" describe "* && -z "${FAKE_EXISTS:-}" ]] && exit 1\nexit 0\n')
    tool("scontrol", 'printf "%s\\n" $FAKE_HOSTS\n')
    # srun: run the task command once per process, as SLURM would, with its ids.
    tool("srun", """\
        n=1; for a in "$@"; do [[ $a == --ntasks=* ]] && n=${a#--ntasks=}; [[ $a == --ntasks-per-node=* ]] && k=${a#*=}; done
        for (( i = 0; i < n; i++ )); do SLURM_PROCID=$i SLURM_LOCALID=$(( i % k )) "${@: -3}"; done
        """)
    tool("nvidia-smi", '[[ " $* " == *" --query-gpu=name "* ]] && { echo "NVIDIA H100 80GB HBM3"; echo "NVIDIA H100 80GB HBM3"; exit 0; }\n'
                       'echo "GPU 0: fake"; echo "GPU 1: fake"\n')
    # ktae-train and a python: print their arguments and the environment they would train with.
    record = 'echo "ARGS $* | CUDA=${CUDA_VISIBLE_DEVICES:-} XLA=${XLA_FLAGS:-} PLAT=${JAX_PLATFORMS:-}"\n'
    tool("ktae-train", record)
    tool("fakepython", record)
    return bin_dir


@pytest.fixture
def real_check(fakes) -> pathlib.Path:
    """The stand-ins, but with this checkout's own ktae-train (the fit check compiles for real)."""
    log = fakes.parent / "calls.log"
    (fakes / "ktae-train").write_text(textwrap.dedent(f"""\
        #!/usr/bin/env bash
        {{ printf '%s\\0' ktae-train "$@"; printf '\\x1e'; }} >> {log}
        exec {sys.executable} -m ktae_jax.cli.train "$@"
        """))
    return fakes


def _run(script: str, *args: str, fakes: pathlib.Path | None = None, env: dict | None = None):
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    if fakes is not None:
        environ["PATH"] = f"{fakes}:{environ['PATH']}"
    environ.update(env or {})
    # The timeout only stops a hang: the fit checks start a real ktae-train (jax, transformers), which
    # on a loaded 2-core machine took more than a minute.
    return subprocess.run(["bash", str(LAUNCH / script), *args], capture_output=True, text=True, env=environ,
                          cwd=REPO, timeout=600)


def _calls(fakes: pathlib.Path) -> list[list[str]]:
    log = fakes.parent / "calls.log"
    if not log.exists():
        return []
    return [record.split("\0")[:-1] for record in log.read_text().split("\x1e")[:-1]]


def _commands(stdout: str) -> list[list[str]]:
    """The `+ command` lines a script printed, split as a shell would."""
    out, buf = [], ""
    for line in stdout.splitlines(keepends=True):  # a quoted argument may span lines
        if buf or line.startswith("+ "):
            buf += line
            try:
                out.append(shlex.split(buf[2:]))
                buf = ""
            except ValueError:
                continue
    assert not buf, f"unterminated command in output: {buf!r}"
    return out


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
    res = _run(script, "--help")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("Usage:") and "--dry-run" in res.stdout


TPU_ARGS = ["--name", "ktae-v4", "--zone", "us-central2-b", "--accelerator", "v4-64", "--bucket", "gs://my-ktae",
            "--config", str(RECIPE), "--config", str(MESH)]
CHECK = ["--compile-only", "--target"]


def test_tpu_pod_dry_run(fakes):
    res = _run("tpu_pod.sh", *TPU_ARGS, "--project", "proj", "--dry-run", "--", "model.path=/m", "algo.kl_coef=0.001",
               fakes=fakes)
    assert res.returncode == 0, res.stderr
    # A dry run runs nothing but the fit check: the run compiled here for the slice it would create.
    check = ["ktae-train", "--config", str(RECIPE), "--config", str(MESH), "model.path=/m", "algo.kl_coef=0.001",
             *CHECK, "v4-64"]
    assert _calls(fakes) == [check]
    cmds = _commands(res.stdout)
    assert cmds[0] == check
    cmds = cmds[1:]
    tpu = ["gcloud", "compute", "tpus", "tpu-vm"]
    zone = ["--zone", "us-central2-b", "--project", "proj"]
    assert cmds[0] == [*tpu, "describe", "ktae-v4", *zone]
    assert cmds[1] == [*tpu, "create", "ktae-v4", *zone, "--accelerator-type", "v4-64", "--version",
                       "tpu-ubuntu2204-base"]
    assert cmds[2][:4] == ["gcloud", "storage", "buckets", "describe"] and cmds[3][4:7] == ["gs://my-ktae", "--location", "us-central2"]
    assert cmds[4][-5:] == ["--no-deps", "--quiet", "--wheel-dir", cmds[4][-2], str(REPO)]  # the pinned package
    ssh = [*tpu, "ssh", "ktae-v4", *zone, "--worker=all", "--command"]
    assert cmds[5] == [*ssh, "mkdir -p ~/ktae"]
    wheel = f"ktae_jax-{VERSION}-py3-none-any.whl"
    assert cmds[6][:5] == [*tpu, "scp"] and cmds[6][-6:] == ["ktae-v4:~/ktae/", *zone, "--worker=all"]
    assert [pathlib.Path(p).name for p in cmds[6][5:-6]] == [RECIPE.name, MESH.name, "train.sh", wheel]
    install = cmds[7]
    assert install[:-1] == ssh and f"pip install --user -q 'jax[tpu]=={JAX_VERSION}' ~/ktae/{wheel}" in install[-1]
    assert "gcsfuse --implicit-dirs my-ktae ~/gcs" in install[-1]
    assert cmds[8] == [*ssh, "bash ~/ktae/train.sh"] and len(cmds) == 9
    # What every worker runs: configs copied beside it, the run directory in the mounted bucket;
    # no coordinator flags (JAX finds the slice's workers itself).
    train = next(line[4:] for line in res.stdout.splitlines() if line.startswith("#   ktae-train"))
    argv = shlex.split(train.split(" 2>&1 | ")[0])
    assert argv == ["ktae-train", "--config", f"~/ktae/{RECIPE.name}", "--config", f"~/ktae/{MESH.name}",
                    "--run-dir", "~/gcs/runs/grpo_ktae_1.5b", "model.path=/m", "algo.kl_coef=0.001"]
    assert "tee -a ~/gcs/runs/grpo_ktae_1.5b/logs/$(hostname).log" in train


@pytest.mark.parametrize("accelerator, runtime", [
    ("v4-64", "tpu-ubuntu2204-base"), ("v5litepod-16", "v2-alpha-tpuv5-lite"), ("v5p-128", "v2-alpha-tpuv5"),
    ("v6e-16", "v2-alpha-tpuv6e"),
])
def test_tpu_pod_picks_the_runtime_of_the_generation(fakes, accelerator, runtime):
    args = [*TPU_ARGS[:4], "--accelerator", accelerator, *TPU_ARGS[6:], "--dry-run"]
    create = lambda res: next(c for c in _commands(res.stdout) if "create" in c[:5])  # noqa: E731
    res = _run("tpu_pod.sh", *args, fakes=fakes)
    assert res.returncode == 0, res.stderr
    assert create(res)[-4:] == ["--accelerator-type", accelerator, "--version", runtime]
    assert _calls(fakes)[0][-2:] == ["--target", accelerator]
    res = _run("tpu_pod.sh", *args, "--version", "my-runtime", fakes=fakes)
    assert create(res)[-1] == "my-runtime"


def test_tpu_pod_refuses_a_plan_that_cannot_fit_before_booking(real_check):
    """The real fit check: 7B with no FSDP on a v5e-8 (8 chips of 15.75 GiB) holds 85 GiB of
    parameters and AdamW state per chip. Refused; no gcloud call is made, not even in a real run."""
    recipe = REPO / "configs/paper/dapo_ktae_7b.yaml"
    args = [*TPU_ARGS[:4], "--accelerator", "v5litepod-8", *TPU_ARGS[6:8], "--config", str(recipe)]
    for dry in (["--dry-run"], []):
        res = _run("tpu_pod.sh", *args, *dry, "--", "mesh.data=8", "mesh.fsdp=1", fakes=real_check)
        assert res.returncode == 1, res.stderr[-2000:]
        assert "the plan does not fit on v5litepod-8" in res.stderr and "DOES NOT FIT" in res.stdout
        assert all(call[0] == "ktae-train" for call in _calls(real_check))
    res = _run("tpu_pod.sh", *args, "--dry-run", "--no-check", "--", "mesh.data=8", "mesh.fsdp=1", fakes=real_check)
    assert res.returncode == 0 and "fit check skipped" in res.stdout


def test_gpu_host_refuses_a_plan_that_cannot_fit(real_check):
    recipe = REPO / "configs/paper/dapo_ktae_7b.yaml"
    res = _run("gpu_single_host.sh", "--config", str(recipe), "--run-dir", "runs/x", "--gpus", "0,1,2,3,4,5,6,7",
               "--dry-run", "--", "mesh.data=8", "mesh.fsdp=1", fakes=real_check)
    assert res.returncode == 1, res.stderr[-2000:]
    assert "the plan does not fit on h100x8" in res.stderr
    assert _calls(real_check)[-1][-3:] == ["--compile-only", "--target", "h100x8"]
    assert not any(line.startswith("+ env") or line.startswith("+ ktae-train --config") for line in res.stdout.splitlines()
                   if "--compile-only" not in line)


def test_tpu_pod_real_run_with_fake_gcloud(fakes, tmp_path):
    wheel = tmp_path / "ktae_jax-9.9-py3-none-any.whl"
    wheel.write_text("not really a wheel")
    res = _run("tpu_pod.sh", *TPU_ARGS, "--wheel", str(wheel), "--run-name", "exp1", "--detach", fakes=fakes,
               env={"FAKE_EXISTS": "1"})
    assert res.returncode == 0, res.stderr
    check, *calls = _calls(fakes)
    assert check[0] == "ktae-train" and check[-2:] == ["--target", "v4-64"]  # real runs are checked too
    verbs = [c[4] if c[1] == "compute" else c[3] for c in calls]
    # The slice and the bucket exist: reused, nothing created.
    assert verbs == ["describe", "describe", "ssh", "scp", "ssh", "ssh"]
    assert calls[-1][-1].startswith("nohup setsid bash ~/ktae/train.sh")
    assert calls[4][-1].endswith(f"~/ktae/{wheel.name}")
    assert "reusing TPU VM ktae-v4" in res.stdout and "gs://my-ktae/runs/exp1" in res.stdout


@pytest.mark.parametrize("per", ["host", "gpu"])
def test_slurm_dry_run_and_tasks(fakes, per, tmp_path):
    hosts = "gpu-a gpu-b gpu-c"
    args = ["--config", str(RECIPE), "--run-dir", "/shared/runs/x", "--per", per]
    overrides = ["--", "algo.kl_coef=0.001"]
    env = {"FAKE_HOSTS": hosts, "SLURM_JOB_NODELIST": "gpu-[a-c]", "SLURM_GPUS_ON_NODE": "4"}
    res = _run("slurm_gpu.sbatch", *args, "--port", "4000", "--dry-run", *overrides, fakes=fakes, env=env)
    assert res.returncode == 0, res.stderr
    # The only tools a dry run calls: scontrol, nvidia-smi (the GPU model), the fit check for 3 x 4 GPUs.
    check = ["ktae-train", "--config", str(RECIPE), "algo.kl_coef=0.001", *CHECK, "h100x12"]
    assert _calls(fakes) == [["scontrol", "show", "hostnames", "gpu-[a-c]"],
                             ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], check]
    cmds = _commands(res.stdout)
    assert cmds[0] == ["scontrol", "show", "hostnames", "gpu-[a-c]"] and cmds[1] == check
    n = 3 if per == "host" else 12
    srun = cmds[-1]
    assert srun[:5] == ["srun", "--nodes=3", f"--ntasks={n}", f"--ntasks-per-node={n // 3}", "--kill-on-bad-exit=1"]
    assert srun[5:7] == ["bash", "-c"]
    inner = shlex.split(srun[7].split("exec ", 1)[1])
    assert inner == ["ktae-train", "--config", str(RECIPE), "--run-dir", "/shared/runs/x", "--coordinator",
                     "gpu-a:4000", "--num-processes", str(n), "--process-id", "$SLURM_PROCID", "algo.kl_coef=0.001"]
    assert ("CUDA_VISIBLE_DEVICES=$SLURM_LOCALID" in srun[7]) == (per == "gpu")

    # A real run in the "allocation": every task gets its own process id (and GPU), same coordinator.
    res = _run("slurm_gpu.sbatch", *args, *overrides, fakes=fakes, env={**env, "FAKE_HOSTS": "gpu-a gpu-b"})
    assert res.returncode == 0, res.stderr
    check, *ran = [line for line in res.stdout.splitlines() if line.startswith("ARGS")]
    assert "--compile-only --target h100x8 |" in check  # 2 nodes x 4 GPUs, checked before srun
    n = 2 if per == "host" else 8
    assert len(ran) == n
    for i, line in enumerate(ran):
        assert f"--coordinator gpu-a:29500 --num-processes {n} --process-id {i} algo.kl_coef=0.001" in line
        assert f"CUDA={i % 4 if per == 'gpu' else ''} " in line


def test_gpu_single_host(fakes, tmp_path):
    res = _run("gpu_single_host.sh", "--config", str(RECIPE), "--run-dir", "runs/x", "--gpus", "0,1",
               "--venv", str(tmp_path / "v"), "--setup", "--dry-run", "--", "rollout.group_size=8", fakes=fakes)
    assert res.returncode == 0, res.stderr
    check = ["ktae-train", "--config", str(RECIPE), "rollout.group_size=8", *CHECK, "h100x2"]  # 2 GPUs
    assert _calls(fakes) == [["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], check]
    cmds = _commands(res.stdout)
    venv = str(tmp_path / "v")
    assert cmds == [check,
                    ["python3", "-m", "venv", venv],
                    [f"{venv}/bin/pip", "install", "--quiet", f"jax[cuda12]=={JAX_VERSION}", str(REPO)],
                    ["env", "CUDA_VISIBLE_DEVICES=0,1", f"{venv}/bin/ktae-train", "--config", str(RECIPE),
                     "--run-dir", "runs/x", "rollout.group_size=8"]]
    res = _run("gpu_single_host.sh", "--config", str(RECIPE), "--run-dir", "runs/x", "--gpus", "1",
               "--mem-fraction", ".9", fakes=fakes)
    assert res.returncode == 0, res.stderr
    assert "ARGS --config " + str(RECIPE) + " --run-dir runs/x | CUDA=1 " in res.stdout


def test_local_cpu(fakes):
    res = _run("local_cpu.sh", "--dry-run", "--max-steps", "2")
    assert res.returncode == 0, res.stderr
    (cmd,) = _commands(res.stdout)
    assert cmd[:3] == ["env", "JAX_PLATFORMS=cpu", "XLA_FLAGS=--xla_force_host_platform_device_count=1"]
    assert cmd[4:] == ["-m", "ktae_jax.cli.train", "--config", str(REPO / "configs/tiny.yaml"), "--run-dir",
                       "runs/local_cpu", "--max-steps", "2"]
    # Two processes with two devices each, on 127.0.0.1: run for real with a stand-in python.
    res = _run("local_cpu.sh", "--processes", "2", "--devices", "2", "--port", "23456", "--python",
               str(fakes / "fakepython"), "--", "algo.kl_coef=0.001", fakes=fakes)
    assert res.returncode == 0, res.stderr
    ran = sorted(line for line in res.stdout.splitlines() if line.startswith("ARGS"))
    assert len(ran) == 2
    for i, line in enumerate(ran):
        assert (f"--coordinator 127.0.0.1:23456 --num-processes 2 --process-id {i} algo.kl_coef=0.001 |" in line
                and "XLA=--xla_force_host_platform_device_count=2 PLAT=cpu" in line)


@pytest.mark.parametrize("script, args, message", [
    ("tpu_pod.sh", ["--name", "x", "--accelerator", "v4-8", "--bucket", "b1", "--config", str(RECIPE)], "--zone"),
    ("tpu_pod.sh", [*TPU_ARGS[:4], "--accelerator", "v4", *TPU_ARGS[6:]], "--accelerator 'v4'"),
    ("tpu_pod.sh", [*TPU_ARGS[:6], "--bucket", "Bad_Bucket!", *TPU_ARGS[8:]], "not a valid bucket"),
    ("tpu_pod.sh", [*TPU_ARGS[:8], "--config", "nope.yaml"], "no such file: nope.yaml"),
    ("tpu_pod.sh", [*TPU_ARGS, "--frobnicate"], "unknown argument '--frobnicate'"),
    ("tpu_pod.sh", [*TPU_ARGS, "--zone"], "--zone needs a value"),
    ("slurm_gpu.sbatch", ["--config", str(RECIPE), "--run-dir", "r", "--per", "node", "--nodelist", "a"], "--per"),
    ("slurm_gpu.sbatch", ["--config", str(RECIPE), "--run-dir", "r", "--port", "70000", "--nodelist", "a"], "--port"),
    ("slurm_gpu.sbatch", ["--config", str(RECIPE), "--run-dir", "r"], "not inside a SLURM job"),
    ("slurm_gpu.sbatch", ["--run-dir", "r", "--nodelist", "a"], "--config is required"),
    ("gpu_single_host.sh", ["--config", str(RECIPE), "--run-dir", "r", "--gpus", "a,b"], "--gpus"),
    ("gpu_single_host.sh", ["--config", str(RECIPE)], "--run-dir is required"),
    ("gpu_single_host.sh", ["--config", str(RECIPE), "--run-dir", "r", "--setup"], "--setup needs --venv"),
    ("local_cpu.sh", ["--devices", "0"], "--devices must be >= 1"),
    ("local_cpu.sh", ["--processes", "x"], "--processes must be a whole number"),
])
def test_bad_arguments_fail_with_a_message(script, args, message, fakes):
    res = _run(script, *args, "--dry-run", fakes=fakes)
    assert res.returncode != 0
    assert message in res.stderr, res.stderr
    assert _calls(fakes) == []
