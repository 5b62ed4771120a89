"""Small fixture results shared by the dashboard tests."""

FIXTURE_EVAL = {
    "gallery": "fixture", "split": "test",
    "matchers": {
        "teacher": {"t2i": {"R@1": 30.0, "R@5": 60.0, "R@10": 72.0}, "i2t": {"R@1": 40.0, "R@5": 70.0, "R@10": 80.0},
                    "rsum": 352.0, "params": 25_000_000, "size_mb": 100.0, "text_query_ms": 9.0, "images_per_s": 40.0},
        "student": {"t2i": {"R@1": 25.0, "R@5": 55.0, "R@10": 68.0}, "i2t": {"R@1": 33.0, "R@5": 64.0, "R@10": 75.0},
                    "rsum": 320.0, "params": 5_000_000, "size_mb": 20.0, "text_query_ms": 3.0, "images_per_s": 150.0},
        "hashed-64": {"t2i": {"R@1": 22.0, "R@5": 50.0, "R@10": 63.0}, "i2t": {"R@1": 30.0, "R@5": 60.0, "R@10": 71.0},
                      "rsum": 296.0, "params": 5_000_000, "size_mb": 20.0, "text_query_ms": 3.1, "images_per_s": 150.0,
                      "bytes_per_item": 8, "candidate_recall": 0.97},
    },
}
