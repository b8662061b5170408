"""Run a Python module or script, then print its process's peak resident memory on stderr:

    python benchmarks/_peak.py -m ckptinit rescale resnet18 ...
    python benchmarks/_peak.py benchmarks/bare.py resnet18 ...

The figure is `ckptinit.device.peak_rss_bytes()`: VmHWM from /proc/self/status, the
high-water mark of this process's own memory. (getrusage(RUSAGE_CHILDREN) and wait4 are
no good here: on Linux a child's ru_maxrss starts from the RSS of the process that forked
it, inherited through exec, and the benchmark that forks has a model loaded.)
"""

import os
import runpy
import sys


def _peak() -> int | None:
    from ckptinit.device import peak_rss_bytes  # after the run: the import costs nothing

    return peak_rss_bytes()


def main() -> None:
    args = sys.argv[1:]
    code = 0
    try:
        if args and args[0] == "-m":
            sys.argv = args[1:]
            runpy.run_module(args[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = args
            sys.path.insert(0, os.path.dirname(os.path.abspath(args[0])))
            runpy.run_path(args[0], run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.stdout.flush()
        print(f"\n@@peak_rss_bytes {_peak()}", file=sys.stderr, flush=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
