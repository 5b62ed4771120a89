"""Load test: N concurrent clients x M text queries against ``python app.py``.

Each client is one visitor: by default a lean HTTP client of Gradio's API (``--client http``), or
gradio_client (``--client gradio``). Queries are real captions of the bundled test split (different
per client). Every answer must
fill every matcher column; anything else counts as an error. Writes p50/p95/p99 latency,
throughput, the error count and the CPU seconds the server and the clients used to
``assets/results/load.json``.

With ``--heavy-images N`` it then measures searches while a heavy task runs: a fresh zip of N
bundled photos (a nonce in its captions.jsonl, so nothing is cached) is uploaded and indexed by
every matcher through ``/upload_zip`` while ``--heavy-clients`` clients keep searching; the same
clients are measured for as many queries without it first.

    python bench/load_test.py --clients 32 --queries 20 --heavy-images 1000 --public   # starts its own server
    python bench/load_test.py --url http://127.0.0.1:7860/                              # against a running one
    python bench/load_test.py --in-process 16       # the matcher set alone: text batching's share of the gain

The clients run on the same machine as the server: their CPU time is reported next to the
server's, because on a small machine they compete for the same cores.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
import uuid
import zipfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server import REPO, AppServer, gallery_items  # noqa: E402

GALLERY = REPO / "assets" / "gallery" / "flickr8k-test"
MAX_WALL_S = 600   # every phase stops after this, whatever is left


def captions(n: int) -> list[str]:
    rows = (GALLERY / "captions.jsonl").read_text().splitlines()
    out = []
    for i in range(n):
        out.append(json.loads(rows[i % len(rows)])["captions"][(i // len(rows) + i) % 5])
    return out


def process_cpu_s(pid: int) -> float | None:
    """utime + stime of a process (Linux /proc), in seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def percentiles(lat: list[float]) -> dict:
    if not lat:
        return {}
    arr = np.asarray(lat)
    return {p: round(float(np.percentile(arr, q)), 1) for p, q in (("p50", 50), ("p95", 95), ("p99", 99), ("max", 100))}


class HttpClient:
    """A lean visitor: Gradio's documented HTTP API (``POST /gradio_api/call/<api>`` then the event's
    result stream), one keep-alive connection; the same queue and handlers as the page, without
    gradio_client's per-call job threads and status polling (which cost more CPU than the server's
    side of a query on this machine)."""

    def __init__(self, url: str):
        import httpx

        self.url = url.rstrip("/") + "/gradio_api/call"
        self.http = httpx.Client(timeout=120)
        self.session = uuid.uuid4().hex  # one visitor, one session (as a browser tab keeps its own)

    def search(self, text: str, k: int) -> list:
        # every input of /search_text but the session state: text, preset, K, bits, C, re-rank
        event = self.http.post(f"{self.url}/search_text", json={"data": [text, None, k, 64, 100, True],
                                                                     "session_hash": self.session})
        event.raise_for_status()
        answer = self.http.get(f"{self.url}/search_text/{event.json()['event_id']}")
        kind = None
        for line in answer.text.splitlines():
            if line.startswith("event:"):
                kind = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and kind in ("complete", "error"):
                data = json.loads(line.split(":", 1)[1])
                if kind == "error":
                    raise RuntimeError(f"server error: {data}")
                return data
        raise RuntimeError(f"no answer in the event stream: {answer.text[:200]!r}")


class GradioClient:
    def __init__(self, url: str):
        from gradio_client import Client

        self.client = Client(url, verbose=False, download_files=False)

    def search(self, text: str, k: int) -> list:
        return self.client.predict(text=text, k=k, api_name="/search_text")


CLIENTS = {"http": HttpClient, "gradio": GradioClient}


def run_client(url: str, queries: list[str], k: int, latencies: list, errors: list, expected_columns: int,
               stop: threading.Event | None = None, deadline: float | None = None, kind: str = "http") -> None:
    try:
        client = CLIENTS[kind](url)
    except Exception as exc:  # noqa: BLE001 - every failure is counted, not raised
        errors.extend([f"connect: {exc}"] * len(queries))
        return
    for q in queries:
        if (stop is not None and stop.is_set()) or (deadline is not None and time.perf_counter() > deadline):
            break
        started = time.perf_counter()
        try:
            out = client.search(q, k)
            elapsed = (time.perf_counter() - started) * 1000
            filled = [g for g in out[2:] if len(gallery_items(g)) == k]
            if len(filled) < expected_columns:
                errors.append(f"only {len(filled)} of {expected_columns} columns filled for {q!r}: {out[0]}")
            else:
                latencies.append(elapsed)
        except Exception as exc:  # noqa: BLE001
            errors.append(f"{type(exc).__name__}: {exc}")


def search_phase(url: str, clients: int, queries: int, k: int, columns: int, offset: int = 0,
                 stop: threading.Event | None = None, kind: str = "http") -> dict:
    pool = captions(offset + clients * queries)[offset:]
    latencies, errors, threads = [], [], []
    deadline = time.perf_counter() + MAX_WALL_S
    for c in range(clients):
        qs = pool[c * queries:(c + 1) * queries]
        threads.append(threading.Thread(target=run_client, args=(url, qs, k, latencies, errors, columns, stop, deadline, kind)))
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    sent = len(latencies) + len(errors)   # fewer than clients x queries when stopped early (``stop``)
    return {"clients": clients, "queries_per_client": queries if stop is None else None, "requests": sent, "ok": len(latencies),
            "errors": len(errors), "error_examples": errors[:5], "latency_ms": percentiles(latencies),
            "throughput_qps": round(len(latencies) / wall, 2), "wall_s": round(wall, 1)}


def make_zip(n: int, folder: Path) -> Path:
    rows = [json.loads(line) for line in (GALLERY / "captions.jsonl").read_text().splitlines()[:n]]
    path = folder / f"heavy-{n}.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for row in rows:
            zf.write(GALLERY / "images" / row["image"], Path(row["image"]).name)
        nonce = uuid.uuid4().hex  # a new gallery every run: nothing extracted or encoded before
        zf.writestr("captions.jsonl", "".join(json.dumps({"image": Path(r["image"]).name,
                                                          "captions": r["captions"] + [f"run {nonce}"]}) + "\n"
                                              for r in rows))
    return path


def heavy_phase(url: str, images: int, clients: int, queries: int, k: int, columns: int, kind: str) -> dict:
    """Search latency with and without a gallery being indexed at the same time."""
    from gradio_client import Client, handle_file

    quiet = search_phase(url, clients, queries, k, columns, offset=5000, kind=kind)
    with tempfile.TemporaryDirectory() as tmp:
        archive = make_zip(images, Path(tmp))
        heavy: dict = {}
        done = threading.Event()

        def upload() -> None:
            started = time.perf_counter()
            try:
                out = Client(url, verbose=False, download_files=False).predict(handle_file(str(archive)),
                                                                              api_name="/upload_zip")
                texts = [o for o in (out if isinstance(out, (list, tuple)) else [out]) if isinstance(o, str)]
                heavy["status"] = (texts[0] if texts else str(out))[:300]
            except Exception as exc:  # noqa: BLE001
                heavy["status"] = f"{type(exc).__name__}: {exc}"[:300]
            heavy["seconds"] = round(time.perf_counter() - started, 1)
            done.set()

        uploader = threading.Thread(target=upload)
        uploader.start()
        time.sleep(2.0)  # upload sent, extraction and encoding under way
        during = search_phase(url, clients, 10_000, k, columns, offset=7000, stop=done, kind=kind)
        uploader.join(MAX_WALL_S)
    return {"heavy_task": f"/upload_zip: extract and index a fresh zip of {images} photos with every matcher",
            "heavy": heavy, "searches_without_heavy": quiet, "searches_during_heavy": during}


def in_process(threads: int, queries: int = 400) -> dict:
    """The default preset's matcher set alone (no HTTP, no Gradio): CPU per text query answered one at a
    time without batching, and with ``threads`` queries in flight and text batching on."""
    import torch

    from matcher.dashboard.matchers import MatcherSet
    from matcher.dashboard.workspace import Workspace
    from matcher.search.protocol import SearchOptions

    torch.set_num_threads(1)
    ws = Workspace(hub_ok=lambda: False)
    pool = captions(queries)
    out = {}
    for name, batch, inflight in (("one at a time", False, 1), (f"{threads} in flight, batched", True, threads)):
        mset = MatcherSet(ws.active().roles, ws.gallery(), batch_texts=batch)
        mset.warm()

        def work(i: int) -> None:
            for j in range(i, queries, inflight):
                mset.search_text(pool[j], SearchOptions(k=8))

        workers = [threading.Thread(target=work, args=(i,)) for i in range(inflight)]
        wall, cpu = time.perf_counter(), time.process_time()
        for t in workers:
            t.start()
        for t in workers:
            t.join()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        out[name] = {"cpu_ms_per_query": round(1000 * cpu / queries, 1), "queries_per_s": round(queries / wall, 1)}
    return {"what": f"MatcherSet.search_text over every column, {queries} captions, 1 torch thread", **out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running app; default: start python app.py on a free port")
    parser.add_argument("--roles", help="role=spec pairs for the started app (see app.py --roles)")
    parser.add_argument("--public", action="store_true", help="start the app in public mode (MATCHER_PUBLIC=1)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--columns", type=int, default=None, help="columns every answer must fill (default: all roles)")
    parser.add_argument("--client", choices=sorted(CLIENTS), default="http",
                        help="http: Gradio's HTTP API with one keep-alive connection per visitor (default); "
                             "gradio: gradio_client (about as much CPU per query as the server, on the same cores)")
    parser.add_argument("--heavy-images", type=int, default=0, help="then measure searches while a zip of N photos is indexed")
    parser.add_argument("--heavy-clients", type=int, default=4)
    parser.add_argument("--json", default=str(REPO / "assets" / "results" / "load.json"))
    parser.add_argument("--in-process", type=int, metavar="N",
                        help="only measure the matcher set in this process (no server): one query at a time "
                             "against N in flight with text batching; prints, writes nothing")
    args = parser.parse_args()
    if args.in_process:
        sys.path.insert(0, str(REPO))
        print(json.dumps(in_process(args.in_process), indent=2))
        return

    server = None
    url = args.url
    if url is None:
        # Public-mode settings on loopback, against the bundled gallery (which a real public page never serves).
        env = {"HF_HUB_OFFLINE": "1", **({"MATCHER_PUBLIC": "1", "MATCHER_SERVE_BUNDLED": "1"} if args.public else {})}
        server = AppServer(*(["--roles", args.roles] if args.roles else []), env=env)
        server.wait_serving()
        server.wait_warm()
        url = server.url
    try:
        probe = CLIENTS[args.client](url).search("a dog", args.k)  # warm path
        columns = args.columns or sum(1 for g in probe[2:] if gallery_items(g))
        load_start = os.getloadavg()[0]
        server_cpu0 = process_cpu_s(server.proc.pid) if server else None
        client_cpu0 = sum(os.times()[:2])
        main_run = search_phase(url, args.clients, args.queries, args.k, columns, kind=args.client)
        server_cpu = process_cpu_s(server.proc.pid) - server_cpu0 if server else None
        client_cpu = sum(os.times()[:2]) - client_cpu0
        result = {
            "command": "python bench/load_test.py" + f" --clients {args.clients} --queries {args.queries} --client {args.client}"
                       + (f" --roles {args.roles}" if args.roles else "") + (" --public" if args.public else "")
                       + (f" --heavy-images {args.heavy_images}" if args.heavy_images else ""),
            "roles": args.roles or "the app's default preset", "public_mode": args.public, "client": args.client,
            "k": args.k, "columns": columns,
            **main_run,
            "cpu_s": {"server": round(server_cpu, 1) if server_cpu is not None else None,
                      "load_test_clients": round(client_cpu, 1),
                      "available": round(main_run["wall_s"] * (os.cpu_count() or 1), 1)},
            "server": "python app.py (queue on; search concurrency "
                      + os.environ.get("MATCHER_SEARCH_CONCURRENCY", "16, the default") + "; concurrent text queries encoded in batches)"
                      if server else url,
            "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                        "load_avg_1min_at_start": round(load_start, 2),
                        "load_avg_1min_at_end": round(os.getloadavg()[0], 2),
                        "note": "shared with other developers' processes; clients run on the same cores"},
            "note": f"client-side latency per text query ({args.client} client), all matcher columns filled",
        }
        if args.heavy_images:
            result["during_heavy"] = heavy_phase(url, args.heavy_images, args.heavy_clients, args.queries, args.k, columns,
                                                 args.client)
        print(json.dumps(result, indent=2))
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    finally:
        if server:
            server.stop()


if __name__ == "__main__":
    main()
