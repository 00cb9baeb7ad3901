"""The host memory allocator of CPU training and decoding: tcmalloc where it is installed, as PyTorch's own CPU
launcher (`python -m torch.backends.xeon.run_cpu`) sets up by default.

glibc's malloc keeps the blocks a training step frees for reuse instead of returning them, and as tensor
sizes vary it reuses them badly: on packed GSM8K rows of 2048 tokens (SmolLM2-135M, bf16, docs/performance.md)
a step peaks at 4.57 GiB without gradient checkpointing and 3.23 GiB with it, where the live tensors need about
3 and 1.3. tcmalloc keeps size-classed free lists and returns what it does not reuse: 3.04 / 1.37 GiB at the
same speed or faster (266 vs 228 and 176 vs 177 tokens/s). glibc's own knobs cost speed instead (mapping every
large block: 2x slower; malloc_trim between steps: no gain); jemalloc saves as much but is slower here.
Decoding allocates a few hundred small tensors a token, and torch's int8 and oneDNN products a scratch block per
thread per call: under tcmalloc a token took 1.02-1.12x less time at one row (int8 weights) and 1.09-1.23x (exact
weights) on a 2-core AMX Xeon, in alternating processes (docs/performance.md).

An allocator must be preloaded before the process starts, so the commands that train or decode on the CPU
(`VERBS`: the console command and `python -m finetune`) re-execute themselves once with LD_PRELOAD when they run
on Linux without an NVIDIA GPU, tcmalloc is installed (Debian/Ubuntu: `apt install libtcmalloc-minimal4`; conda:
`gperftools`) and no other allocator is preloaded. `FINETUNE_ALLOCATOR` chooses: `auto` (the default, as just
said), `tcmalloc` (an error if it is not installed) or `glibc` (leave the process as it is). A training run's
environment.json records the one in use.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from finetune.errors import FinetuneError

CHOICES = ("auto", "tcmalloc", "glibc")
NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4", "libtcmalloc_minimal.so", "libtcmalloc.so")
MARK = "FINETUNE_ALLOCATOR_SET"  # set in the re-executed process: never twice
VERBS = ("train", "chat", "serve", "eval")  # the commands that re-execute themselves under tcmalloc


class AllocatorError(FinetuneError):
    exit_code = 2


def search_dirs() -> list[Path]:
    dirs = [Path(sys.prefix) / "lib"]
    if os.environ.get("CONDA_PREFIX"):
        dirs.append(Path(os.environ["CONDA_PREFIX"]) / "lib")
    return dirs + [Path(p) for p in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64",
                                     "/usr/lib", "/usr/local/lib")]


def find_tcmalloc() -> str | None:
    return next((str(d / n) for d in search_dirs() for n in NAMES if (d / n).is_file()), None)


def allocator_in_use() -> str:
    """The allocator of this process: tcmalloc, jemalloc (both only when preloaded) or glibc."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "glibc" if sys.platform.startswith("linux") else "system"
    return "tcmalloc" if "libtcmalloc" in maps else "jemalloc" if "libjemalloc" in maps else "glibc"


def choice(env=os.environ) -> str:
    value = env.get("FINETUNE_ALLOCATOR", "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise AllocatorError(f"FINETUNE_ALLOCATOR is '{value}'; expected one of {', '.join(CHOICES)} "
                             "(auto: tcmalloc for CPU training where it is installed).")
    return value


def cpu_only(env=os.environ) -> bool:
    """No NVIDIA GPU this process could use (decided without importing torch)."""
    if env.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return True
    return not Path("/dev/nvidiactl").exists()


def to_preload(env=os.environ) -> str | None:
    """The tcmalloc library `finetune train` preloads in this environment, or None (it runs as it is)."""
    wanted = choice(env)
    if wanted == "glibc" or not sys.platform.startswith("linux") or allocator_in_use() != "glibc":
        return None
    if wanted == "auto" and not cpu_only(env):
        return None
    library = find_tcmalloc()
    if library is None and wanted == "tcmalloc":
        raise AllocatorError("FINETUNE_ALLOCATOR=tcmalloc, but no tcmalloc library was found in "
                             f"{', '.join(map(str, search_dirs()))}. Install it (Debian/Ubuntu: apt install "
                             "libtcmalloc-minimal4; conda: gperftools) or set FINETUNE_ALLOCATOR=auto.")
    return library


def for_training(env=os.environ) -> str:
    """The allocator `finetune train` runs with here: tcmalloc or glibc (or what is preloaded already).
    A setting `finetune train` would refuse plans as the allocator of this process."""
    try:
        return "tcmalloc" if to_preload(env) else allocator_in_use()
    except AllocatorError:
        return allocator_in_use()


def reexec_command(argv: list[str], env=os.environ) -> tuple[list[str], dict] | None:
    """The command line and environment to re-execute `finetune VERB` (one of `VERBS`) with tcmalloc, or None to go
    on as is."""
    args = [a for a in argv[1:] if not a.startswith("-")]
    if not args or args[0] not in VERBS:
        return None
    return preloaded([sys.executable, "-m", "finetune", *argv[1:]], env)


def preloaded(command: list[str], env=os.environ) -> tuple[list[str], dict] | None:
    """`command` with the environment that runs it under tcmalloc (`to_preload`), or None to go on as is (the
    allocator is set already, or stays glibc). The benches run themselves so, as the commands they measure."""
    if env.get(MARK):
        return None
    library = to_preload(env)
    if library is None:
        return None
    preload = ":".join(p for p in (library, env.get("LD_PRELOAD", "")) if p)
    return command, {**env, "LD_PRELOAD": preload, MARK: library}


def maybe_reexec(argv: list[str] | None = None) -> None:
    """Replace this process by `finetune VERB` under tcmalloc when `reexec_command` says so (never returns then)."""
    execute(reexec_command(list(sys.argv if argv is None else argv)))


def execute(command: tuple[list[str], dict] | None) -> None:
    """Replace this process by `command` (`preloaded`'s), or return where it is None."""
    if command is not None:
        args, env = command
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(args[0], args, env)
