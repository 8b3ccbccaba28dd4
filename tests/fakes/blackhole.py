"""A TCP port on loopback where a connect never completes: a listening socket that never accepts,
its accept queue filled at start (a small backlog), so the kernel drops every further SYN and the
client's connect hangs until its own timeout. What a host that dropped off the network looks like."""

from __future__ import annotations

import socket


class BlackHole:
    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(0)
        self.port: int = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.fillers: list[socket.socket] = []
        for _ in range(64):  # fill the accept queue: until a connect no longer completes
            filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            filler.settimeout(0.3)
            try:
                filler.connect(("127.0.0.1", self.port))
            except OSError:  # TimeoutError: the queue is full
                filler.close()
                break
            self.fillers.append(filler)
        else:
            self.close()
            raise RuntimeError("the black hole's accept queue never filled")

    def connect_completes(self, timeout: float = 0.5) -> bool:
        """Whether a new connect completes within ``timeout`` (it must not)."""
        probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        probe.settimeout(timeout)
        try:
            probe.connect(("127.0.0.1", self.port))
        except OSError:
            return False
        finally:
            probe.close()
        return True

    def close(self) -> None:
        for filler in self.fillers:
            filler.close()
        self.fillers = []
        self.sock.close()
