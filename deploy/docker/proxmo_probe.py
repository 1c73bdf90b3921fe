#!/usr/bin/env python3
"""Container probe: exit 0 when ``GET http://127.0.0.1:<port><path>`` answers 200, else 1.

Used by the image's HEALTHCHECK (``/livez``) and compose's healthcheck (``/readyz``): the
slim images carry no curl, and Python is there anyway. The port is the server's own
``PROXMO_HTTP_PORT`` (default 8000), so the probe follows the server when the port moves.

    proxmo-probe /readyz          # exit 0 ready, 1 not ready / unreachable
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

DEFAULT_HTTP_PORT = "8000"  # proxmo.server.config.Settings.http_port
TIMEOUT_S = 3.0


def probe(path: str, port: str) -> tuple[bool, str]:
    """(ok, what happened) for one GET of ``path`` on the loopback port."""
    url = f"http://127.0.0.1:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:  # noqa: S310 (loopback)
            return response.status == 200, f"{url}: {response.status}"
    except urllib.error.HTTPError as error:
        return False, f"{url}: {error.code}"
    except (urllib.error.URLError, OSError) as error:
        return False, f"{url}: {error}"


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not argv[1].startswith("/"):
        print("usage: proxmo-probe /livez|/readyz", file=sys.stderr)
        return 2
    ok, detail = probe(argv[1], os.environ.get("PROXMO_HTTP_PORT", DEFAULT_HTTP_PORT))
    print(detail, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
