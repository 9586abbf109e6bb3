"""Attack traffic for benchmarks and tests: UDP floods from a lab host with ``mausezahn``
(Debian's netsniff-ng), which writes prebuilt frames straight to the interface and reaches
~290k packets/s here, where a Python sender manages a fraction of that.

The number of packets sent is read from the sender's own interface counter, not from
mausezahn's intent: what the counter says left the host is what the switch was offered.
"""

from __future__ import annotations

import subprocess

from .netlab import Host, Process

MAUSEZAHN = "mausezahn"


def flood_argv(source: Host, dst_ip: str, dst_mac: str, count: int, delay_us: int = 0,
               dst_port: int = 9, payload_bytes: int = 18) -> list[str]:
    """mausezahn arguments for ``count`` UDP frames (0 = until stopped) from ``source``'s
    eth0 to ``dst_ip``/``dst_mac``, ``delay_us`` apart (0 = as fast as it can).  The default
    18-byte payload makes minimum-size (64-byte) Ethernet frames."""
    return [MAUSEZAHN, "eth0", "-q", "-c", str(count), "-d", f"{delay_us}usec" if delay_us else "0",
            "-a", source.mac, "-b", dst_mac, "-A", str(source.interface.ip), "-B", dst_ip,
            "-t", "udp", f"sp=40000,dp={dst_port}", "-p", str(payload_bytes)]


def flood(source: Host, dst_ip: str, dst_mac: str, count: int, delay_us: int = 0, dst_port: int = 9,
          timeout: float = 300.0) -> int:
    """Send ``count`` frames and return how many left ``source`` (its tx counter's rise)."""
    if count <= 0:
        raise ValueError("a counted flood needs count > 0")
    before = source.tx_packets()
    source.run(flood_argv(source, dst_ip, dst_mac, count, delay_us, dst_port), timeout=timeout)
    return source.tx_packets() - before


class Flood:
    """A flood running in the background for as long as the ``with`` block lasts::

        with Flood(attacker, MB_IP, MB_MAC) as attack:
            ...                      # measure something under attack
        attack.sent                  # frames that left the attacker meanwhile
    """

    def __init__(self, source: Host, dst_ip: str, dst_mac: str, delay_us: int = 0, dst_port: int = 9):
        self.source, self.argv = source, flood_argv(source, dst_ip, dst_mac, 0, delay_us, dst_port)
        self.process: Process | None = None
        self.sent = 0
        self._before = 0

    def __enter__(self) -> "Flood":
        self._before = self.source.tx_packets()
        self.process = self.source.popen(self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.process.check_alive()
        return self

    def __exit__(self, *exc) -> None:
        process, self.process = self.process, None
        if process is not None:
            process.stop()
        self.sent = self.source.tx_packets() - self._before
