"""Imported only as the compute fork server's first preload (``proxmo.workers.ComputePool``).

The fork server ignores SIGTERM, as the workers do: a SIGTERM to the server's whole process
group (systemd's default KillMode, honcho, foreman, ``tini -g``) then leaves it running while the
server drains, so a worker that dies meanwhile can still be replaced. It needs no signal to end:
it exits by itself once the server and every worker are gone (multiprocessing's "alive" pipe
reaches end of file), and the workers end with the server (``proxmo.workers.exit_with``).
"""

import signal

signal.signal(signal.SIGTERM, signal.SIG_IGN)
