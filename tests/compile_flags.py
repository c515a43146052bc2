"""XLA_FLAGS of the test processes, importable before JAX starts (``conftest`` sets them for the suite)."""


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a test process with ``devices`` simulated CPU devices.

    LLVM's optimisation passes are most of XLA's CPU compile time and the tests' shapes are tiny, so
    the tests compile without them (half the suite's time); XLA CPU keeps IEEE float semantics either way.
    """
    return f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"
