"""XLA flags shared by the tests that run tiny models in subprocesses.

FAST_COMPILE: at the tests' tiny shapes compiling is nearly all the time, and XLA:CPU's -O0 with the
expensive LLVM passes off halves it or better (notebooks: dense_to_moe 98 s of CPU -> 50 s, same
logits to 1e-7; the sharded-vs-1-device checks of test_parallel.py: 146 s -> 43 s). Only for checks
that compare results computed under the same flags, never for timings.
"""
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
