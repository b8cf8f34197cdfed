"""XLA flags of the test processes and of the CLI subprocesses the tests start."""

# XLA:CPU with its classic elemental emitters instead of the newer MLIR fusion emitters: the same
# HLO passes and the same programs, compiled with ~25% less CPU (test_sample.py: 282 vs 379 CPU s,
# both run side by side), and compiling is most of the suite's time on this CPU. (Turning XLA's
# backend optimisation off instead made the training and sampling runs slower than it saved.)
COMPILE_FLAGS = "--xla_cpu_use_fusion_emitters=false"


def xla_flags(devices: int | None = None) -> str:
    """XLA_FLAGS for a test process: the compile flags and, if given, that many simulated CPU devices."""
    count = "" if devices is None else f" --xla_force_host_platform_device_count={devices}"
    return COMPILE_FLAGS + count
