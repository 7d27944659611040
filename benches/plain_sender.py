"""The plain sender of the import benchmark (benches/import.rs): what a short script
sends for a first import of MEMBERS members through Braze's partner cohort import API,
with nothing of the operator's — no source to read, no sort, no snapshot, no budget, no
retries. It names the cohort, then sends the members in order, PER_REQUEST ids a request,
WORKERS requests at a time (a thread pool, one keep-alive connection per thread), and
prints one line, `RESULT {json}`: seconds from the first request to the last answer,
requests sent, and their answers by HTTP status.

Standard library only (Debian's python3, no pip). Loopback only: the benchmark passes
its sandbox's URL.

    python3 plain_sender.py URL PARTNER PARTNER_KEY IMPORT_KEY COHORT_ID MEMBERS PER_REQUEST WORKERS
"""

import http.client
import json
import sys
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor


def main():
    url, partner, partner_key, import_key, cohort_id = sys.argv[1:6]
    members, per_request, workers = (int(a) for a in sys.argv[6:9])
    target = urllib.parse.urlsplit(url)
    if target.hostname not in ("127.0.0.1", "::1", "localhost"):
        sys.exit(f"{url}: loopback only")
    local = threading.local()

    def post(path, payload):
        connection = getattr(local, "connection", None)
        if connection is None:
            connection = local.connection = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
        connection.request("POST", path, body=json.dumps(payload).encode(),
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        response.read()
        return response.status

    keys = {"partner_api_key": partner_key, "client_secret": import_key, "cohort_id": cohort_id}

    def send(first):
        ids = [f"user-{i:08d}" for i in range(first, min(first + per_request, members))]
        return post(f"/partners/{partner}/cohorts/users", {**keys, "cohort_changes": [{"user_ids": ids}]})

    statuses = {}
    started = time.monotonic()
    created_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    named = post(f"/partners/{partner}/cohorts", {**keys, "name": "Plain sender", "created_at": created_at})
    statuses[named] = 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for status in pool.map(send, range(0, members, per_request)):
            statuses[status] = statuses.get(status, 0) + 1
    seconds = time.monotonic() - started
    result = {"seconds": seconds, "requests": sum(statuses.values()),
              "statuses": {str(s): n for s, n in sorted(statuses.items())}}
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
