"""Serves Keystone's WSGI application on 127.0.0.1:PORT with a threaded stdlib server.

Run with the Keystone venv's python, never imported by the test code:

    python keystone_launcher.py CONFIG_FILE PORT

Keystone reads its configuration through oslo.config, which parses sys.argv: the file is
therefore handed over in OS_KEYSTONE_CONFIG_FILES and sys.argv is emptied before the import.
"""

from __future__ import annotations

import os
import sys
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server


class ThreadingServer(ThreadingMixIn, WSGIServer):
    """Swift's proxy validates tokens while Muster logs in: one request must not block another."""

    daemon_threads = True


class QuietHandler(WSGIRequestHandler):
    """Keystone logs each request itself; the access log line per request is noise."""

    def log_message(self, format: str, *args: object) -> None:
        pass


def main(config_file: str, port: int) -> None:
    os.environ["OS_KEYSTONE_CONFIG_FILES"] = config_file
    del sys.argv[1:]
    from keystone.server import wsgi

    application = wsgi.initialize_public_application()
    server = make_server(
        "127.0.0.1", port, application, server_class=ThreadingServer, handler_class=QuietHandler
    )
    server.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
