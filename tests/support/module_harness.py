"""The dynamic module's C decision, driven from Python through a small C driver
(tests/support/module_driver.c) compiled with the module's core (decision.c,
config.c, json.c): the module's own parsers and decision, not a copy. Built with
AddressSanitizer and UBSan, so a memory error or undefined behaviour ends the
driver (and fails the test)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from extproc.module.build import CORE_SOURCES, SOURCE_DIR, WARNINGS, compile_c

DRIVER_SOURCE = Path(__file__).with_name("module_driver.c")
# float-cast-overflow: GCC's "undefined" leaves out a double too large for its integer type.
SANITIZERS = (
    "-O1",
    "-g",
    "-fno-omit-frame-pointer",
    "-fsanitize=address,undefined,float-cast-overflow",
    "-fno-sanitize-recover=all",
)


def build_driver(directory: Path, *, sanitized: bool = True) -> Path:
    """The driver, under the sanitizers unless ``sanitized`` is False (ASan
    reserves terabytes of address space: a driver run with a limit on it is
    built without)."""
    core = [SOURCE_DIR / name for name in CORE_SOURCES]
    return compile_c(directory / "module-driver", [DRIVER_SOURCE, *core], (*WARNINGS, *(SANITIZERS if sanitized else ("-O2",))))


class ModuleDriver:
    def __init__(self, binary: Path, preexec_fn: Callable[[], None] | None = None) -> None:
        self.process = subprocess.Popen(
            [str(binary)],
            preexec_fn=preexec_fn,  # a resource limit set in the child only; the tests start no threads meanwhile
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            # Leaks are checked too: the driver frees everything it parsed.
            env={"ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0", "UBSAN_OPTIONS": "print_stacktrace=1"},
        )

    def ask(self, *fields: bytes | str) -> str:
        assert self.process.stdin is not None and self.process.stdout is not None
        line = " ".join(f if isinstance(f, str) else (f.hex() or "-") for f in fields)
        self.process.stdin.write(line.encode() + b"\n")
        self.process.stdin.flush()
        answer = self.process.stdout.readline().decode().rstrip("\n")
        if not answer:
            raise AssertionError(f"the driver died on {line[:200]!r}: {self.end()[1][-4000:]}")
        return answer

    def end(self) -> tuple[int, str]:
        """Ends the driver: its exit status and what it wrote to stderr."""
        assert self.process.stdin is not None and self.process.stdout is not None and self.process.stderr is not None
        if not self.process.stdin.closed:
            self.process.stdin.close()
        code = self.process.wait(timeout=60)
        errors = self.process.stderr.read().decode(errors="replace") if not self.process.stderr.closed else ""
        self.process.stdout.close()
        self.process.stderr.close()
        return code, errors

    def filter_config(self, text: bytes) -> str:
        return self.ask("F", text)

    def counted_indexes(self) -> list[int]:
        """For each target of the current rule, its index in the current filter
        config's "counted" pairs, or -1."""
        return [int(i) for i in self.ask("L").split()]

    def rule_config(self, text: bytes) -> str:
        return self.ask("R", text)

    def rule(self, settings: dict[str, Any]) -> None:
        answer = self.rule_config(json.dumps(settings).encode())
        assert answer == "ok", answer

    def decide(self, headers: Sequence[tuple[bytes, bytes]], now_ns: int = 0) -> tuple[bytes | None, list[str]]:
        """The key the rule's chain finds, and each target's outcome."""
        blob = b"".join(len(f).to_bytes(4, "big") + f for pair in headers for f in pair)
        key, _, outcomes = self.ask("D", str(now_ns), blob).partition(" ")
        return (None if key == "none" else bytes.fromhex(key.removeprefix("key:"))), (outcomes.split(",") if outcomes else [])

    def key_hash(self, salt: bytes, key: bytes) -> int:
        return int(self.ask("H", salt + b"\0", key))


@contextmanager
def running(binary: Path) -> Iterator[ModuleDriver]:
    """A driver for the block; at its end, a clean exit (LeakSanitizer finds no leak)."""
    driver = ModuleDriver(binary)
    try:
        yield driver
    except BaseException:
        driver.end()
        raise
    code, errors = driver.end()
    assert code == 0 and not errors, errors[-4000:]
