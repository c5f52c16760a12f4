"""Serve a directory over HTTP on stdin/stdout: one connection of a guest to the artifact mirror.

QEMU's user network runs this for every connection a guest opens to the mirror address (guest.sh:
``guestfwd=tcp:10.0.2.100:80-cmd:python3 stdio_http.py DIR``), so the guests, which reach nothing else, download
from the mirror over HTTP as a site's nodes do from theirs. GET and HEAD of files under DIR only (Python's
SimpleHTTPRequestHandler: no path leaves DIR); every request is appended to DIR/../mirror-requests.log.

    python3 stdio_http.py DIR
"""
import http.server
import os
import sys
import time


class StdioHandler(http.server.SimpleHTTPRequestHandler):
    """SimpleHTTPRequestHandler on the process's stdin and stdout instead of a socket."""

    protocol_version = "HTTP/1.0"   # one request per connection: QEMU starts this per connection anyway

    def __init__(self, directory, log_path):  # pylint: disable=super-init-not-called
        self.directory = directory
        self.log_path = log_path
        self.client_address = ("guest", 0)
        self.server = None
        self.request = None
        self.rfile = sys.stdin.buffer
        self.wfile = sys.stdout.buffer
        self.close_connection = True
        self.handle_one_request()
        self.wfile.flush()

    def log_message(self, format, *args):  # pylint: disable=redefined-builtin
        with open(self.log_path, "a", encoding="utf-8") as log:
            log.write("%s %s\n" % (time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), format % args))


def main(argv):
    if len(argv) != 1 or not os.path.isdir(argv[0]):
        sys.stderr.write("usage: stdio_http.py DIR (an existing directory)\n")
        return 2
    directory = os.path.abspath(argv[0])
    StdioHandler(directory, os.path.join(os.path.dirname(directory), "mirror-requests.log"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
