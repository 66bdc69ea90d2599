"""moejax: Mixture-of-Experts language models in JAX/Flax NNX."""
import os

__version__ = "0.1.0"

# XLA:CPU flags moejax runs with unless the environment names them itself. XLA reads XLA_FLAGS when
# JAX starts its CPU backend (the first computation), so importing moejax first is enough.
#   concurrency-optimized scheduler: orders the step's operations so that independent ones overlap
#   on the CPU's threads: the same results, a train step 1,125 -> 1,036 ms (median of 5 runs) at the
#   peer comparison's shapes, at the cost of more live buffers (XLA's memory of that step 417 -> 520 MB)
#   (docs/benchmarks.md, "2026-12-08, another host"). Set it to false in XLA_FLAGS to undo.
CPU_XLA_FLAGS = {"xla_cpu_enable_concurrency_optimized_scheduler": "true"}


def _add_cpu_xla_flags() -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    extra = [f"--{k}={v}" for k, v in CPU_XLA_FLAGS.items() if k not in flags]
    if extra:
        os.environ["XLA_FLAGS"] = " ".join([flags, *extra]).strip()


_add_cpu_xla_flags()
