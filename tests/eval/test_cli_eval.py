"""End to end with the bundled teacher: CLI eval and search on a handful of bundled photos."""
import json
import subprocess
import sys

import pytest

from matcher.data.gallery import open_gallery
from matcher.registry import cached_encoder
from matcher.search.exact import ExactMatcher
from matcher.search.protocol import QueryError, SearchOptions
from tests.helpers import REPO

pytestmark = pytest.mark.slow


def run_cli(*args: str, env_cache: str) -> subprocess.CompletedProcess:
    env = {"MATCHER_CACHE_DIR": env_cache, "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    import os

    env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-m", "matcher", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_cli_eval_writes_the_documented_json(small_gallery, tmp_path):
    out = tmp_path / "eval.json"
    proc = run_cli("eval", "--gallery", str(small_gallery), "--split", "test", "--matchers", "teacher,candidate=assets/models/offline-student.pt",
                   "--json", str(out), env_cache=str(tmp_path / "cache"))
    assert proc.returncode == 0, proc.stderr
    assert "teacher" in proc.stdout and "rsum" in proc.stdout
    report = json.loads(out.read_text())
    assert report["split"] == "test"
    teacher = report["matchers"]["teacher"]
    assert set(teacher["t2i"]) == set(teacher["i2t"]) == {"R@1", "R@5", "R@10"}
    assert teacher["rsum"] == pytest.approx(sum(teacher["t2i"].values()) + sum(teacher["i2t"].values()))
    # 12 images: chance t2i R@1 is 8%; the trained teacher must be far above it.
    assert teacher["t2i"]["R@1"] >= 40 and teacher["i2t"]["R@1"] >= 50
    assert teacher["images"] == 12 and teacher["captions"] == 60
    assert teacher["params"] > 20_000_000 and teacher["text_query_ms"] > 0 and teacher["images_per_s"] > 0
    # speeds of both matchers come from one interleaved probe: medians inside their per-round ranges
    assert "interleaved" in report["speed_probe"]
    for entry in report["matchers"].values():
        lo, hi = entry["images_per_s_range"]
        assert lo <= entry["images_per_s"] <= hi
        lo, hi = entry["text_query_ms_range"]
        assert lo <= entry["text_query_ms"] <= hi
    # ROLE=SPEC: a matcher outside the preset, here a checkpoint path, measured next to the teacher
    assert report["matchers"]["candidate"]["spec"] == "assets/models/offline-student.pt"
    assert report["matchers"]["candidate"]["params"] * 5 < teacher["params"]


def test_cli_reports_bad_split_and_unknown_matcher(small_gallery, tmp_path):
    proc = run_cli("eval", "--gallery", str(small_gallery), "--split", "train", env_cache=str(tmp_path / "c"))
    assert proc.returncode != 0 and "no images in split 'train'" in proc.stderr
    proc = run_cli("eval", "--gallery", str(small_gallery), "--matchers", "oracle", env_cache=str(tmp_path / "c"))
    assert proc.returncode != 0 and "no matcher 'oracle'" in proc.stderr
    proc = run_cli("eval", "--gallery", str(small_gallery), "--matchers", "teacher,candidate=runs/missing.pt",
                   env_cache=str(tmp_path / "c"))
    assert proc.returncode != 0 and "matcher 'candidate' cannot be loaded: runs/missing.pt not found" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_teacher_finds_the_described_photo(small_gallery):
    gallery = open_gallery(small_gallery)
    matcher = ExactMatcher(cached_encoder("offline-teacher"), gallery)
    # The first bundled test photo shows two brown dogs playing in the snow.
    hits = matcher.search_text("two brown dogs wrestle in the snow", SearchOptions(k=3)).hits
    assert hits[0].name == gallery.names[0]
    assert hits[0].score > hits[1].score
    # "More like this" on a photo returns the photo itself first.
    assert matcher.more_like(gallery.names[3], SearchOptions(k=2)).hits[0].name == gallery.names[3]
    with pytest.raises(QueryError, match="Type a few words"):
        matcher.search_text("   ")
    with pytest.raises(QueryError, match="under 500"):
        matcher.search_text("dog " * 200)


def test_matchers_sharing_an_encoder_are_timed_once(monkeypatch, small_gallery):
    """offline-hashed encodes with offline-student: one instance in memory, one timing, both reported."""
    from matcher.eval import costs as evaluate

    assert cached_encoder("offline-hashed") is cached_encoder("offline-student")
    timed = []

    def fake_time_interleaved(encoders, images, rounds, queries):
        timed.append(sorted(encoders))
        return {name: evaluate.Speed(float(i + 1), 10.0 * (i + 1), (0, 0), (0, 0)) for i, name in enumerate(encoders)}

    monkeypatch.setattr(evaluate, "time_interleaved", fake_time_interleaved)
    images = [str(p) for p in sorted(small_gallery.glob("*.jpg"))[:2]]
    speeds = evaluate.measure_speeds(["offline-student", "offline-hashed"], images)
    assert timed == [["offline-student"]]
    assert speeds["offline-hashed"] == speeds["offline-student"]
