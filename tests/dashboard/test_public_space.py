"""The documented public-Space configuration: the operator names the gallery, the page states it and
its terms, and no bundled Flickr8k photo (research-use terms) can be fetched from the server."""
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from PIL import Image

from tests.helpers import BUNDLED, REPO

pytestmark = pytest.mark.slow
TINY = "open_clip:matcher-tiny-vit"


def own_gallery(root):
    """Six generated photos (no Flickr8k content) with captions and stated terms."""
    root.mkdir()
    rows = []
    for i, colour in enumerate(["red", "green", "blue", "yellow", "purple", "orange"]):
        Image.new("RGB", (64, 64), colour).save(root / f"{colour}.png")
        rows.append({"image": f"{colour}.png", "captions": [f"a plain {colour} square"]})
    (root / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "TERMS.md").write_text("# Terms\n\nGenerated colour squares, CC0: use them for anything.\n")
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except urllib.error.URLError:
        return 0   # not listening yet


def test_public_mode_refuses_the_bundled_gallery():
    proc = subprocess.run([sys.executable, "app.py", "--public", "--no-warm"], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "MATCHER_GALLERY": ""})
    assert proc.returncode != 0 and "serves no bundled Flickr8k photo" in proc.stderr


def test_public_space_serves_its_own_gallery_and_no_bundled_photo(tmp_path):
    gallery, port = own_gallery(tmp_path / "own"), free_port()
    env = {**os.environ, "MATCHER_PUBLIC": "1", "MATCHER_GALLERY": str(gallery), "MATCHER_CACHE_DIR": str(tmp_path / "cache"),
           "HF_HUB_OFFLINE": "1", "GRADIO_TEMP_DIR": str(tmp_path / "gradio")}
    server = subprocess.Popen([sys.executable, "app.py", "--host", "127.0.0.1", "--port", str(port), "--no-warm",
                               "--roles", f"teacher={TINY}"], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and status(base + "/") != 200:
            assert server.poll() is None, server.stdout.read()
            time.sleep(1)
        with urllib.request.urlopen(base + "/config", timeout=10) as response:
            config = response.read().decode()
        assert "own" in config and "CC0" in config            # the page names the gallery and its terms
        bundled = sorted((BUNDLED / "images").glob("*.jpg"))[0]
        assert str(BUNDLED) not in config and bundled.name not in config   # e.g. no example photo from it
        for url in (f"{base}/gradio_api/file={bundled}", f"{base}/file={bundled}"):
            assert status(url) in (403, 404), url
        assert status(f"{base}/gradio_api/file={gallery / 'red.png'}") == 200   # its own photos are served
    finally:
        server.terminate()
        server.wait(timeout=30)
