"""A loopback TCP proxy between clients and a broker that misbehaves as a flaky link does:
it cuts every connection it carries, adds latency to every chunk of bytes it forwards, or
partitions (holds all traffic both ways without closing anything) for a while, then
resumes or cuts. Clients reconnect through it as they would to the broker.

From a script: ``python tests/netproxy.py UPSTREAM_PORT [--port N]`` prints the port it
listens on, then reads commands from stdin: ``cut``, ``delay SECONDS``,
``partition SECONDS [cut]``, ``quit``.
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading
import time


class ChaosProxy:
    """Listens on ``port`` (0: a free one) and forwards every connection to
    ``upstream_port``. An upstream that refuses (a broker that is down) closes the client's
    connection at once, as the broker itself would."""

    def __init__(self, upstream_port: int, host: str = "127.0.0.1", port: int = 0) -> None:
        self.upstream = (host, upstream_port)
        self.listener = socket.create_server((host, port))
        self.port = self.listener.getsockname()[1]
        self.cuts = 0
        self.partitions = 0
        self.delay = 0.0  # seconds added before forwarding each chunk (up to 64 KiB)
        self._flowing = threading.Event()  # cleared while partitioned
        self._flowing.set()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._pairs)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            pair = (client, server)
            with self._lock:
                self._pairs.append(pair)
            for src, dst in (pair, pair[::-1]):
                threading.Thread(
                    target=self._pump, args=(src, dst, pair), name="proxy-pump", daemon=True
                ).start()

    def _pump(self, src: socket.socket, dst: socket.socket, pair) -> None:
        try:
            while data := src.recv(1 << 16):
                self._flowing.wait()  # a partition holds what was read; TCP holds the rest
                if self.delay:
                    time.sleep(self.delay)
                dst.sendall(data)
        except OSError:
            pass
        for s in pair:
            _shut(s)
            s.close()
        with self._lock:
            if pair in self._pairs:
                self._pairs.remove(pair)

    def cut(self) -> int:
        """Drop every connection now, with whatever bytes are on their way; return how many."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
            self.cuts += 1  # counted before anyone can see the connection closed
        for pair in pairs:
            for s in pair:
                _shut(s)
        return len(pairs)

    def hold(self) -> None:
        """Stop forwarding both ways; connections stay open (and new ones are accepted and
        held too), as on a link whose packets are lost without a reset."""
        if self._flowing.is_set():
            self._flowing.clear()
            self.partitions += 1

    def release(self, *, cut: bool = False) -> None:
        """End a partition: forward what was held, or (``cut``) drop every connection."""
        if cut:
            self.cut()
        self._flowing.set()  # pumps of cut connections fail on their next send and exit

    def partition(self, seconds: float, *, cut: bool = False) -> None:
        """Hold all traffic for ``seconds`` (blocking), then resume or cut."""
        self.hold()
        time.sleep(seconds)
        self.release(cut=cut)

    def close(self) -> None:
        self.listener.close()
        self.release(cut=True)


CutProxy = ChaosProxy  # the name the transfer test knows it by


def _shut(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("upstream", type=int, help="the broker's port on 127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (0: free)")
    args = parser.parse_args(argv)
    proxy = ChaosProxy(args.upstream, port=args.port)
    print(f"listening on 127.0.0.1:{proxy.port} -> 127.0.0.1:{args.upstream}", flush=True)
    for line in sys.stdin:
        words = line.split()
        try:
            if not words:
                continue
            if words[0] == "cut":
                print(f"cut {proxy.cut()} connections", flush=True)
            elif words[0] == "delay":
                proxy.delay = float(words[1])
                print(f"delay {proxy.delay:g} s per chunk", flush=True)
            elif words[0] == "partition":
                proxy.partition(float(words[1]), cut=words[2:] == ["cut"])
                print("partition over", flush=True)
            elif words[0] == "quit":
                break
            else:
                print(f"unknown command {words[0]!r}", flush=True)
        except (IndexError, ValueError) as exc:
            print(f"bad command {line.strip()!r}: {exc}", flush=True)
    proxy.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
