"""The TPU VM scripts (tpu/*.sh), the SLURM script and the TPU/GPU configs.

The scripts run for real, against fake `gcloud`, `srun`, `scontrol`, `python` and `sudo` executables
put first on PATH; each fake appends what it was called with (one JSON line a call) to a log.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from moejax import config

ROOT = Path(__file__).resolve().parent.parent
TPU = ROOT / "tpu"
SCRIPTS = ("create.sh", "setup.sh", "run.sh", "copy_results.sh", "delete.sh")
LOCATION = ["--zone=us-west4-a", "--project=my-proj"]
SETTINGS = {"project": ("--project", "my-proj", "MOEJAX_TPU_PROJECT"),
            "zone": ("--zone", "us-west4-a", "MOEJAX_TPU_ZONE"),
            "name": ("--name", "tpu1", "MOEJAX_TPU_NAME"),
            "type": ("--type", "v5litepod-8", "MOEJAX_TPU_TYPE")}
TRAIN = ["python", "-m", "moejax.train", "--config", "configs/mixtral_tiny_tpu_v5e_8.yaml"]

# Each fake logs [name, *argv] (name: the program's file name, or "venv" for the virtual environment's
# python) and then does what its BEHAVIOUR says.
FAKE = """#!{python}
import json, os, shutil, sys
name = "venv" if ".venv" in sys.argv[0] else os.path.basename(sys.argv[0])
args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps([name] + args) + "\\n")
{behaviour}
"""
BEHAVIOUR = {
    # gcloud: say something (for --log), and list what a local directory being copied holds.
    "gcloud": """print("output of", " ".join(args[:4]))
for a in args:
    if os.path.isdir(a):
        files = sorted(os.path.relpath(os.path.join(d, n), a) for d, _, ns in os.walk(a) for n in ns)
        with open(os.environ["FAKE_LOG"] + ".files", "w") as f:
            json.dump(files, f)""",
    "srun": "os.execvp(args[0], args)",
    "scontrol": "print('gpu-node-07'); print('gpu-node-08')",
    # python: report the JAX_* environment and the working directory; as a system python of the
    # TPU VM, `-c` is the version check (FAKE_PY_OLD=1: too old) and `-m venv DIR` makes a venv.
    "python": """print(json.dumps({"env": {k: v for k, v in os.environ.items() if k.startswith("JAX_")},
                  "cwd": os.getcwd(), "argv": args}))
if args[:2] == ["-m", "venv"]:
    os.makedirs(os.path.join(args[2], "bin"))
    shutil.copy(sys.argv[0], os.path.join(args[2], "bin", "python"))
if args[:1] == ["-c"] and name != "venv":
    sys.exit(int(os.environ.get("FAKE_PY_OLD", "0")))""",
    "sudo": "",
}


def fake_bin(tmp_path: Path, *names: str, as_name: dict[str, str] | None = None) -> Path:
    """A directory of fake executables; as_name maps extra file names to a behaviour's name."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, kind in [(n, n) for n in names] + list((as_name or {}).items()):
        exe = bin_dir / name
        exe.write_text(FAKE.format(python=sys.executable, behaviour=BEHAVIOUR[kind]))
        exe.chmod(0o755)
    return bin_dir


def base_env(tmp_path: Path, bin_dir: Path, path: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MOEJAX_", "SLURM_", "JAX_"))}
    rest = os.environ["PATH"] if path is None else path
    env["PATH"] = f"{bin_dir}{os.pathsep}{rest}" if rest else str(bin_dir)
    env["FAKE_LOG"] = str(tmp_path / "calls.jsonl")
    return env


def calls(tmp_path: Path) -> list[list[str]]:
    log = tmp_path / "calls.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.fixture
def gcloud(tmp_path):
    """Run a tpu/ script with the fake gcloud; returns (completed process, gcloud calls)."""
    env = base_env(tmp_path, fake_bin(tmp_path, "gcloud"))

    def run(script: str, *args: str, **extra_env: str):
        proc = subprocess.run([str(TPU / script), *args], env={**env, **extra_env}, cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)
        return proc, [c[1:] for c in calls(tmp_path)]

    return run


def where(*settings: str) -> list[str]:
    """Flags giving these settings."""
    return [arg for s in settings for arg in SETTINGS[s][:2]]


# ----------------------------------------------------------------------------------------------
# The gcloud calls.


@pytest.mark.parametrize("tpu_type, runtime", [
    ("v5litepod-8", "v2-alpha-tpuv5-lite"), ("v4-32", "tpu-ubuntu2204-base"),
    ("v5p-64", "v2-alpha-tpuv5"), ("v6e-16", "v2-alpha-tpuv6e")])
def test_create_tpu_vm_with_the_generations_runtime(gcloud, tpu_type, runtime):
    proc, got = gcloud("create.sh", *where("project", "zone", "name"), "--type", tpu_type)
    assert proc.returncode == 0, proc.stderr
    assert got == [["compute", "tpus", "tpu-vm", "create", "tpu1", f"--version={runtime}",
                    f"--accelerator-type={tpu_type}", *LOCATION]]


def test_create_queued_spot_from_environment_variables(gcloud):
    proc, got = gcloud("create.sh", "--queued", "--spot", "--runtime=my-runtime",
                       MOEJAX_TPU_PROJECT="my-proj", MOEJAX_TPU_ZONE="us-west4-a",
                       MOEJAX_TPU_NAME="tpu1", MOEJAX_TPU_TYPE="v4-32")
    assert proc.returncode == 0, proc.stderr
    assert got == [["compute", "tpus", "queued-resources", "create", "tpu1", "--node-id=tpu1",
                    "--runtime-version=my-runtime", "--accelerator-type=v4-32", *LOCATION, "--spot"]]
    assert "queued-resources describe tpu1" in proc.stderr


def test_create_unknown_generation_needs_a_runtime(gcloud):
    proc, got = gcloud("create.sh", *where("project", "zone", "name"), "--type", "v9x-8")
    assert (proc.returncode, got) == (2, [])
    assert "--runtime" in proc.stderr


def test_setup_copies_the_checkout_to_all_workers_then_installs(tmp_path):
    checkout = tmp_path / "checkout"  # a git checkout with what must not be copied
    shutil.copytree(TPU, checkout / "tpu")
    for path in ("setup.py", "moejax/__init__.py", "moejax/__pycache__/x.pyc", "gone.py",
                 ".venv/pyvenv.cfg", ".venv/lib/site.py", "runs/a/metrics.jsonl", "notes.txt"):
        (checkout / path).parent.mkdir(parents=True, exist_ok=True)
        (checkout / path).write_text("x")
    subprocess.run(["git", "init", "-q"], cwd=checkout, check=True)
    subprocess.run(["git", "add", "setup.py", "moejax/__init__.py", "gone.py", "tpu"], cwd=checkout,
                   check=True)
    (checkout / "gone.py").unlink()
    env = base_env(tmp_path, fake_bin(tmp_path, "gcloud"))
    proc = subprocess.run([str(checkout / "tpu/setup.sh"), *where("project", "zone", "name")], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    got = [c[1:] for c in calls(tmp_path)]
    (scp, ssh) = got
    upload = Path(scp[4]).name
    assert scp == ["compute", "tpus", "tpu-vm", "scp", scp[4], "tpu1:", "--recurse", "--worker=all",
                   *LOCATION]
    assert upload.startswith("moejax-upload-")
    assert ssh == ["compute", "tpus", "tpu-vm", "ssh", "tpu1", *LOCATION, "--worker=all",
                   f"--command=set -e; mkdir -p moejax; cp -a {upload}/. moejax/; rm -rf {upload}; "
                   "cd moejax && bash tpu/remote_install.sh"]
    files = json.loads((tmp_path / "calls.jsonl.files").read_text())
    assert files == sorted(["setup.py", "moejax/__init__.py", "notes.txt"]
                           + [f"tpu/{p.name}" for p in TPU.iterdir() if p.is_file()])
    assert not Path(scp[4]).exists()  # the staged copy is removed


def test_setup_clones_a_repository(gcloud):
    proc, got = gcloud("setup.sh", *where("project", "zone", "name"), "--repo",
                       "https://example.com/moejax.git", "--remote-dir", "src/moejax")
    assert proc.returncode == 0, proc.stderr
    assert got == [["compute", "tpus", "tpu-vm", "ssh", "tpu1", *LOCATION, "--worker=all",
                    "--command=set -e; if [ -d src/moejax/.git ]; then git -C src/moejax pull --ff-only; "
                    "else git clone https://example.com/moejax.git src/moejax; fi; "
                    "cd src/moejax && bash tpu/remote_install.sh"]]


def test_run_streams_the_command_on_all_workers_and_tees_the_log(gcloud, tmp_path):
    train = [*TRAIN, "--set", "train.workdir=runs/with space"]
    proc, got = gcloud("run.sh", *where("project", "zone", "name"), "--log", "logs/run.log", "--", *train)
    assert proc.returncode == 0, proc.stderr
    ((*ssh, command),) = got
    assert ssh == ["compute", "tpus", "tpu-vm", "ssh", "tpu1", *LOCATION, "--worker=all"]
    assert command.startswith("--command=cd moejax && . .venv/bin/activate && ")
    assert "python -m moejax.train --config configs/mixtral_tiny_tpu_v5e_8.yaml" in command
    assert "MOEJAX_DISTRIBUTED=1" in command  # multi-host JAX starts on every worker
    words = shlex.split(command.removeprefix("--command="))
    assert words[-len(train):] == train  # quoted so that the workers' shell gets the same words
    subprocess.run(["bash", "-n", "-c", command.removeprefix("--command=")], check=True)
    assert "output of compute tpus tpu-vm ssh" in proc.stdout
    assert (tmp_path / "logs/run.log").read_text() == proc.stdout


def test_run_without_a_command_fails_early(gcloud):
    proc, got = gcloud("run.sh", *where("project", "zone", "name"))
    assert (proc.returncode, got) == (2, [])
    assert "missing the command" in proc.stderr


def test_copy_results_from_worker_0(gcloud, tmp_path):
    proc, got = gcloud("copy_results.sh", *where("project", "zone", "name"), "--workdir",
                       "runs/mixtral_tiny/", "--to", "results")
    assert proc.returncode == 0, proc.stderr
    assert got == [["compute", "tpus", "tpu-vm", "scp", "tpu1:moejax/runs/mixtral_tiny", "results",
                    "--recurse", "--worker=0", *LOCATION]]
    assert (tmp_path / "results").is_dir()


@pytest.mark.parametrize("flags, expected", [
    ([], ["tpu-vm", "delete", "tpu1", *LOCATION]),
    (["--quiet"], ["tpu-vm", "delete", "tpu1", *LOCATION, "--quiet"]),
    (["--queued", "--quiet"], ["queued-resources", "delete", "tpu1", "--force", *LOCATION, "--quiet"])])
def test_delete(gcloud, flags, expected):
    proc, got = gcloud("delete.sh", *where("project", "zone", "name"), *flags)
    assert proc.returncode == 0, proc.stderr
    assert got == [["compute", "tpus", *expected]]


def test_dry_run_prints_instead_of_calling(gcloud):
    proc, got = gcloud("delete.sh", *where("project", "zone", "name"), "--dry-run")
    assert (proc.returncode, got) == (0, [])
    assert proc.stdout == "gcloud compute tpus tpu-vm delete tpu1 --zone=us-west4-a --project=my-proj\n"


# ----------------------------------------------------------------------------------------------
# Help and early errors.


@pytest.mark.parametrize("script, flags", [
    ("create.sh", ["--type", "--runtime", "--queued", "--spot"]),
    ("setup.sh", ["--repo", "--remote-dir"]),
    ("run.sh", ["--log", "--remote-dir"]),
    ("copy_results.sh", ["--workdir", "--to", "--remote-dir"]),
    ("delete.sh", ["--queued", "--quiet"])])
def test_help(gcloud, script, flags):
    proc, got = gcloud(script, "--help")
    assert (proc.returncode, got) == (0, [])
    assert proc.stdout.startswith(f"Usage: tpu/{script}")
    for flag in flags + ["--project", "--zone", "--name", "--dry-run", "--help", "Example:"]:
        assert flag in proc.stdout


REQUIRED = {"create.sh": ("project", "zone", "name", "type"), "setup.sh": ("project", "zone", "name"),
            "run.sh": ("project", "zone", "name"), "copy_results.sh": ("project", "zone", "name"),
            "delete.sh": ("project", "zone", "name")}
EXTRA = {"run.sh": ["--", *TRAIN], "copy_results.sh": ["--workdir", "runs/x"]}


@pytest.mark.parametrize("script, missing", [(s, m) for s, req in REQUIRED.items() for m in req])
def test_a_missing_setting_fails_early(gcloud, script, missing):
    given = [s for s in REQUIRED[script] if s != missing]
    proc, got = gcloud(script, *where(*given), *EXTRA.get(script, []))
    assert (proc.returncode, got) == (2, [])
    flag, _, env_var = SETTINGS[missing]
    (line,) = proc.stderr.splitlines()
    assert line.startswith(f"tpu/{script}: error: missing") and flag in line and env_var in line


def test_unknown_flag_fails(gcloud):
    proc, got = gcloud("delete.sh", *where("project", "zone", "name"), "--zon=x")
    assert (proc.returncode, got) == (2, [])
    assert "unknown argument '--zon'" in proc.stderr


def test_missing_gcloud_is_a_clear_error(tmp_path):
    tools = tmp_path / "tools"  # the programs the scripts need, without gcloud
    tools.mkdir()
    for tool in ("bash", "env", "dirname", "basename"):
        (tools / tool).symlink_to(shutil.which(tool))
    env = base_env(tmp_path, tools, path="")
    proc = subprocess.run([str(TPU / "delete.sh"), *where("project", "zone", "name")], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith("tpu/delete.sh: error: gcloud is not on PATH")


# ----------------------------------------------------------------------------------------------
# What runs on the workers.


@pytest.mark.parametrize("old_python", [False, True])
def test_remote_install_makes_a_venv_with_a_new_enough_python(tmp_path, old_python):
    checkout = tmp_path / "checkout"
    (checkout / "tpu").mkdir(parents=True)
    shutil.copy(TPU / "remote_install.sh", checkout / "tpu")
    pythons = {p: "python" for p in ("python3.13", "python3.12", "python3.11", "python3")}
    env = base_env(tmp_path, fake_bin(tmp_path, "sudo", as_name=pythons))
    env["FAKE_PY_OLD"] = "1" if old_python else "0"
    subprocess.run(["bash", str(checkout / "tpu/remote_install.sh")], env=env, check=True,
                   capture_output=True, timeout=60)
    got = [c for c in calls(tmp_path) if c[1:2] != ["-c"]]
    python = "python3.13"
    if old_python:  # none of 3.13, 3.12, 3.11, python3 is >= 3.11: python3.11 comes from apt
        python = "python3.11"
        assert got[0][:2] == ["sudo", "apt-get"] and "update" in got[0]
        assert got[1][-4:] == ["-y", "-q", "python3.11", "python3.11-venv"] and "install" in got[1]
        got = got[2:]
    assert got == [[python, "-m", "venv", ".venv"],
                   ["venv", "-m", "pip", "install", "-q", "--upgrade", "pip"],
                   ["venv", "-m", "pip", "install", "-e", ".[tpu]"]]
    assert (checkout / ".venv/bin/python").exists()


# ----------------------------------------------------------------------------------------------
# SLURM.


@pytest.mark.parametrize("extra_env, config_file, address", [
    ({}, "configs/mixtral_tiny_gpu_8.yaml", "gpu-node-07:1234"),
    ({"CONFIG": "configs/other.yaml", "MOEJAX_COORDINATOR_PORT": "4321"}, "configs/other.yaml",
     "gpu-node-07:4321")])
def test_slurm_train_sets_the_jax_environment(tmp_path, extra_env, config_file, address):
    env = base_env(tmp_path, fake_bin(tmp_path, "srun", "scontrol", "python"))
    env.update(SLURM_JOB_ID="42", SLURM_JOB_NODELIST="gpu-node-[07-08]", SLURM_NNODES="2",
               SLURM_NODEID="1", SLURM_SUBMIT_DIR=str(tmp_path), **extra_env)
    proc = subprocess.run(["bash", str(ROOT / "scripts/slurm_train.sh"), "--set", "train.steps=5"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert [c[0] for c in calls(tmp_path)] == ["scontrol", "srun", "python"]
    assert calls(tmp_path)[0] == ["scontrol", "show", "hostnames", "gpu-node-[07-08]"]
    seen = json.loads(proc.stdout)
    assert seen["env"] == {"JAX_COORDINATOR_ADDRESS": address, "JAX_NUM_PROCESSES": "2",
                           "JAX_PROCESS_ID": "1"}
    assert seen["argv"] == ["-m", "moejax.train", "--config", config_file, "--set", "train.steps=5"]
    assert seen["cwd"] == str(tmp_path)


def test_slurm_train_outside_a_job_fails(tmp_path):
    env = base_env(tmp_path, fake_bin(tmp_path, "srun", "scontrol", "python"))
    proc = subprocess.run(["bash", str(ROOT / "scripts/slurm_train.sh")], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "sbatch" in proc.stderr
    assert calls(tmp_path) == []


# ----------------------------------------------------------------------------------------------
# Configs.


def test_tpu_and_gpu_configs_differ_only_in_the_mesh():
    tpu = config.load(ROOT / "configs/mixtral_tiny_tpu_v5e_8.yaml")
    gpu = config.load(ROOT / "configs/mixtral_tiny_gpu_8.yaml")
    assert dataclasses.replace(tpu, mesh=gpu.mesh) == gpu
    assert tpu.mesh != gpu.mesh
    for mesh in (tpu.mesh, gpu.mesh):
        assert mesh.data * mesh.fsdp * mesh.expert * mesh.tensor == 8
    m = tpu.model
    assert (m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.n_kv_heads) == (4096, 512, 8, 8, 4)
    assert (m.moe.num_experts, m.moe.top_k, m.moe.d_expert, m.moe.dispatch) == (8, 2, 1024, "dropless")
    assert (tpu.data.seq_len, tpu.train.dtype) == (1024, "bfloat16")
