"""What the native kernel's build tells the user: one line before a build starts and one when it
is done (nothing when the cache already holds it), and, when it fails, the cause in one line,
then the fix, then where the build log is (``FUSED_COSLOSS_VERBOSE=1`` prints the log itself
and ninja's output as the build runs).

The messages go to the ``fused_cosloss`` logger at WARNING level, so that they show on stderr
without any logging set up; ``logging.getLogger("fused_cosloss").setLevel(logging.ERROR)``
silences them.
"""
from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

logger = logging.getLogger("fused_cosloss.native")

BUILD_COMMAND = "python -m fused_cosloss.build"
_REFERENCE_HINT = "backend='reference' works without it (FUSED_COSLOSS_DISABLE_NATIVE=1 stops the build attempts)"


def verbose() -> bool:
    """FUSED_COSLOSS_VERBOSE=1 (or the older FUSED_COSLOSS_VERBOSE_BUILD=1): the full build output."""
    return any(os.environ.get(name, "") not in ("", "0")
               for name in ("FUSED_COSLOSS_VERBOSE", "FUSED_COSLOSS_VERBOSE_BUILD"))


class NativeBuildError(RuntimeError):
    """The native kernel could not be built or loaded: ``cause`` (one line), ``fix`` (what to do)
    and ``log`` (the build's full output, also written to ``log_path`` when there is one)."""

    def __init__(self, cause: str, fix: str, log: str = "", log_path: Path | None = None):
        self.cause, self.fix, self.log, self.log_path = cause, fix, log, log_path
        super().__init__(self.summary(with_log=verbose()))

    def summary(self, with_log: bool = False) -> str:
        lines = [self.cause, f"  to fix: {self.fix}"]
        if self.log_path is not None:
            lines.append(f"  build log: {self.log_path}" + ("" if with_log else " (FUSED_COSLOSS_VERBOSE=1 prints it)"))
        if with_log and self.log:
            lines.append(self.log.rstrip())
        return "\n".join(lines)


def compiler_command() -> str:
    """The compiler torch.utils.cpp_extension runs: $CXX, else ``c++``."""
    try:
        from torch.utils.cpp_extension import get_cxx_compiler

        return get_cxx_compiler()
    except ImportError:  # an older torch: the same rule
        return os.environ.get("CXX", "c++")


def find_compiler() -> tuple[str, str]:
    """(the compiler command, its path and version for the messages); NativeBuildError when it is not there."""
    command = compiler_command()
    words = shlex.split(command) or [command]
    path = shutil.which(words[0])
    if path is None:
        origin = " (from $CXX)" if os.environ.get("CXX") else ""
        where = "" if os.sep in words[0] else " on PATH"
        raise NativeBuildError(
            cause=f"no C++ compiler: `{words[0]}`{origin} was not found{where}",
            fix=f"install one (`apt-get install g++`, `conda install -c conda-forge gxx`, or Xcode's command line "
                f"tools) or set CXX to one. Then `{BUILD_COMMAND}` builds it; {_REFERENCE_HINT}")
    details = [part for part in (path if path != words[0] else "", _version(path)) if part]
    return command, ", ".join(details)


def _version(path: str) -> str:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return ""
    first = (out.stdout or "").strip().splitlines()
    return first[0] if out.returncode == 0 and first else ""


def require_ninja() -> None:
    if shutil.which("ninja") is None:
        raise NativeBuildError(
            cause="ninja, which builds the native kernel, was not found",
            fix=f"`pip install ninja` (a dependency of fused_cosloss: reinstall it). Then `{BUILD_COMMAND}` builds "
                f"it; {_REFERENCE_HINT}")


def announce_start(compiler: str, details: str, build_dir: Path) -> None:
    logger.warning(
        "fused_cosloss: building the native CPU kernel with %s%s into %s; this takes about a minute, once per "
        "installation (`%s` does it ahead of time)", compiler, f" ({details})" if details else "", build_dir,
        BUILD_COMMAND)


def announce_done(seconds: float, build_dir: Path) -> None:
    logger.warning("fused_cosloss: native CPU kernel built in %.0f s; later runs load it from %s", seconds, build_dir)


# (pattern of the line that names the cause, the fix); the first pattern found in the log wins
_DIAGNOSES = (
    (r"Python\.h: No such file", "install the Python development headers (`apt-get install python3-dev`, or the "
                                 "python-devel package of your distribution)"),
    (r": not found$|command not found",
     "install a C++ compiler (`apt-get install g++`) or set CXX to a working one"),
    (r"cannot find -l|undefined reference", "the linker could not link against libtorch: reinstall torch, or "
                                            "report this log"),
    (r"\berror:", "a compiler that builds PyTorch extensions is needed (g++ >= 9 or clang >= 10; set CXX to "
                   "choose it); if it is one, please report this log"),
    (r"undefined symbol|cannot open shared object", "the built library does not match this torch: remove its "
                                                    "build directory (where the build log is) to rebuild it"),
)


def diagnose(error: BaseException, compiler: str, log_path: Path | None) -> NativeBuildError:
    """A NativeBuildError for an exception of the build or the load (``cpp_extension.load``), with
    the line of its output that says why, and the full output written to ``log_path``."""
    log = f"{type(error).__name__}: {error}"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    cause, fix = None, None
    for pattern, remedy in _DIAGNOSES:
        found = next((line for line in lines if re.search(pattern, line)), None)
        if found is not None:
            cause, fix = found, remedy
            break
    if cause is None:
        cause = lines[0] if lines else type(error).__name__
        fix = "see the build log"
    cause = re.sub(r"^/bin/sh: (\d+: )?", "", cause)
    if log_path is not None:
        try:
            log_path.write_text(log + "\n")
        except OSError:
            log_path = None
    return NativeBuildError(
        cause=f"the native CPU kernel failed to build or load with {compiler}: {cause}",
        fix=f"{fix}. Then `{BUILD_COMMAND}` builds it; {_REFERENCE_HINT}", log=log, log_path=log_path)
