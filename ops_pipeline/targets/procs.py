"""Linux /proc readers for the processes this package starts on the host (nginx, relays) and their connections."""

from __future__ import annotations

from pathlib import Path


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def children(ppid: int) -> dict[int, str]:
    """{pid: command line} of the live children of `ppid`."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 1 and fields[1] == str(ppid) and fields[0] != "Z":
            out[int(d.name)] = cmdline(int(d.name))
    return out


def established_to(port: int) -> int:
    """Established TCP connections from this host (network namespace) to 127.0.0.1:<port>."""
    want = f"0100007F:{port:04X}"
    n = 0
    for table in ("/proc/net/tcp",):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) > 3 and parts[2] == want and parts[3] == "01":
                n += 1
    return n
