"""moejax adds its XLA:CPU flags to XLA_FLAGS on import, and leaves a flag the environment names."""
import os
import subprocess
import sys

CODE = "import os, moejax; print(os.environ.get('XLA_FLAGS', ''))"


def run(env_flags):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    if env_flags is not None:
        env["XLA_FLAGS"] = env_flags
    return subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_cpu_flags_added_on_import_and_user_flags_kept():
    import moejax
    want = [f"--{k}={v}" for k, v in moejax.CPU_XLA_FLAGS.items()]
    assert run(None).split() == want
    assert run("--xla_force_host_platform_device_count=4").split() == [
        "--xla_force_host_platform_device_count=4", *want]
    off = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
    assert run(off) == off  # the user's own setting wins
