"""Running SIPp scenarios from tests: phones that register, call and answer."""

from __future__ import annotations

import asyncio
import itertools
import tempfile
from dataclasses import dataclass
from pathlib import Path

SCENARIOS = Path(__file__).resolve().parents[2] / "sipp-scenarios"
_ports = itertools.count(16000)


def next_port() -> int:
    return next(_ports)


@dataclass(frozen=True)
class Phone:
    """A SIP account as a phone uses it."""

    username: str
    password: str
    registrar: str

    def row(self, *extra: str) -> str:
        auth = f"[authentication username={self.username} password={self.password}]"
        return ";".join([self.username, auth, self.registrar, *extra])


@dataclass
class SippRun:
    returncode: int
    output: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


async def sipp(scenario: str, target: str | None, rows: list[str], *, port: int,
               calls: int = 1, timeout: float = 15, extra: tuple[str, ...] = (),
               local_ip: str = "127.0.0.1") -> SippRun:
    """Run one scenario to completion (exit 0: every call succeeded)."""
    with tempfile.NamedTemporaryFile("w", suffix=".csv", delete=False) as inf:
        inf.write("SEQUENTIAL\n" + "\n".join(rows) + "\n")
    args = ["sipp", *([target] if target else []), "-sf", str(SCENARIOS / scenario),
            "-inf", inf.name, "-m", str(calls), "-i", local_ip, "-p", str(port),
            "-nostdin", "-timeout", f"{int(timeout)}s", "-timeout_error", "-max_recv_loops",
            "1000", *extra]
    proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout + 5)
    except TimeoutError:
        proc.kill()
        out, _ = await proc.communicate()
    except BaseException:
        # cancelled (its test failed): a SIPp left running would hold its port, such as the
        # carrier's 5060, and fail the tests after it
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    finally:
        Path(inf.name).unlink(missing_ok=True)
    return SippRun(proc.returncode if proc.returncode is not None else -9,
                   out.decode(errors="replace")[-3000:])


def refused_scenario(code: int) -> str:
    """uac_refused.xml, succeeding only when the call is refused with `code` (not 404)."""
    text = (SCENARIOS / "uac_refused.xml").read_text(encoding="iso-8859-1")
    final = '<recv response="404" />'
    assert text.count(final) == 1
    path = Path(tempfile.gettempdir()) / f"pbx-uac-refused-{code}.xml"
    path.write_text(text.replace(final, f'<recv response="{code}" />'), encoding="iso-8859-1")
    return str(path)


async def register(phone: Phone, *, port: int | None = None, timeout: float = 5) -> SippRun:
    return await sipp("register.xml", f"{phone.registrar}:5060", [phone.row()],
                      port=port or next_port(), timeout=timeout)


async def until_registered(phone: Phone, *, within: float = 5.0) -> float:
    """Seconds until a REGISTER with these credentials succeeds; fails after `within`."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while True:
        run = await register(phone, timeout=2)
        if run.ok:
            return loop.time() - start
        if loop.time() - start > within:
            raise AssertionError(f"{phone.username} could not register within {within}s:\n"
                                 f"{run.output}")
        await asyncio.sleep(0.1)


async def until_refused(phone: Phone, *, within: float = 5.0) -> float:
    loop = asyncio.get_running_loop()
    start = loop.time()
    while True:
        run = await register(phone, timeout=2)
        if not run.ok:
            return loop.time() - start
        if loop.time() - start > within:
            raise AssertionError(f"{phone.username} still registers after {within}s")
        await asyncio.sleep(0.1)
