"""What machine a benchmark ran on, for its output (shared by the tools/ scripts)."""

import os
import platform


def machine_name() -> str:
    """CPU model and logical CPU count, e.g. 'AMD EPYC, 2 logical CPUs'."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} logical CPUs"
