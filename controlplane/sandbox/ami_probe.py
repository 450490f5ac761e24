"""A small blocking AMI client used to tell when a sandbox node is ready.

The control plane talks to nodes through its asyncio AMI session; this probe only needs to log
in, see ``FullyBooted`` and run a few CLI commands, from synchronous code, with deadlines.
"""

from __future__ import annotations

import itertools
import socket
import time
from types import TracebackType

Message = dict[str, str]


class AmiProbeError(RuntimeError):
    pass


class AmiAuthenticationError(AmiProbeError):
    pass


class AmiProbe:
    """One AMI connection; every read is bounded by ``deadline`` (a ``time.monotonic`` value)."""

    def __init__(self, address: str, port: int, deadline: float) -> None:
        self.deadline = deadline
        self._ids = itertools.count(1)
        self._buffer = b""
        self._pending_events: list[Message] = []
        self._sock = socket.create_connection((address, port), timeout=self._remaining())
        self.banner = self._read_line()
        if not self.banner.startswith("Asterisk Call Manager"):
            self._sock.close()
            raise AmiProbeError(f"unexpected AMI banner {self.banner!r}")

    def __enter__(self) -> AmiProbe:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        try:
            self._sock.sendall(b"Action: Logoff\r\n\r\n")
        except OSError:
            pass
        self._sock.close()

    def login(self, username: str, secret: str) -> None:
        response = self.action({"Action": "Login", "Username": username, "Secret": secret})
        if response.get("Response") != "Success":
            raise AmiAuthenticationError(
                f"AMI login as {username!r} refused: {response.get('Message', response)}"
            )

    def action(self, fields: dict[str, str]) -> Message:
        action_id = f"probe-{next(self._ids)}"
        lines = [f"{key}: {value}" for key, value in fields.items()]
        lines.append(f"ActionID: {action_id}")
        self._sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        while True:
            message = self._read_message()
            if "Event" in message:
                self._pending_events.append(message)
            elif message.get("ActionID") == action_id:
                return message

    def command(self, command: str) -> str:
        """Run a CLI command through the ``Command`` action and return its output."""
        response = self.action({"Action": "Command", "Command": command})
        if response.get("Response") != "Success":
            raise AmiProbeError(f"AMI command {command!r} failed: {response}")
        return response.get("Output", "")

    def wait_event(self, name: str) -> Message:
        while True:
            for event in self._pending_events:
                if event.get("Event") == name:
                    self._pending_events.remove(event)
                    return event
            self._pending_events.clear()
            message = self._read_message()
            if "Event" in message:
                self._pending_events.append(message)

    def _read_message(self) -> Message:
        message: Message = {}
        while True:
            line = self._read_line()
            if not line:
                if message:
                    return message
                continue
            key, _, value = line.partition(":")
            value = value.strip()
            # Several 'Output' lines make up one command's output.
            message[key] = f"{message[key]}\n{value}" if key in message else value

    def _read_line(self) -> str:
        while b"\r\n" not in self._buffer:
            self._sock.settimeout(self._remaining())
            chunk = self._sock.recv(65536)
            if not chunk:
                raise AmiProbeError("AMI connection closed by Asterisk")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\r\n", 1)
        return line.decode(errors="replace")

    def _remaining(self) -> float:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("AMI deadline passed")
        return remaining
