"""The dashboard's computations from the command line: compare, analyze, results, gallery-zip."""
import json
import zipfile

from matcher.cli.main import main
from tests.helpers import FIXTURE_EVAL  # noqa: F401  (shared with the browser tests)

TINY = "open_clip:matcher-tiny-vit"
ROLES = f"teacher={TINY},student={TINY}"


def test_compare_prints_columns_with_ground_truth(small_gallery, capsys):
    caption = json.loads((small_gallery / "captions.jsonl").read_text().splitlines()[0])["captions"][0]
    main(["compare", caption, "--gallery", str(small_gallery), "--split", "test", "--roles", ROLES, "--k", "12"])
    out = capsys.readouterr().out
    assert "== teacher" in out and "== student" in out and out.count("✓ ground truth") == 2 and "timings: encode" in out


def test_analyze_writes_summary_and_cases(small_gallery, tmp_path, capsys):
    out_json = tmp_path / "errors.json"
    main(["analyze", "--gallery", str(small_gallery), "--roles", ROLES, "--k", "3", "--json", str(out_json)])
    report = json.loads(out_json.read_text())
    assert report["queries"] == 60 and report["summary"][0]["matcher"] == "student"
    assert report["summary"][0]["teacher only"] == 0  # same model in both roles: no disagreements
    assert "student, teacher-only: 0 queries" in capsys.readouterr().out


def test_results_table_csv_and_chart(tmp_path, capsys):
    (tmp_path / "eval-test.json").write_text(json.dumps(FIXTURE_EVAL))
    main(["results", "--results-dir", str(tmp_path), "--csv", str(tmp_path / "m.csv"), "--html", str(tmp_path / "t.html")])
    out = capsys.readouterr().out
    assert "teacher" in out and "ablation.json: not measured yet" in out
    assert (tmp_path / "m.csv").read_text().startswith("matcher,") and "plotly" in (tmp_path / "t.html").read_text()


def test_gallery_zip_extracts_and_indexes(small_gallery, tmp_path, capsys):
    archive = tmp_path / "mine.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for photo in sorted(small_gallery.glob("*.jpg"))[:3]:
            zf.write(photo, photo.name)
        zf.writestr("../escape.jpg", b"x")
    main(["gallery-zip", str(archive), "--roles", f"teacher={TINY}"])
    out = capsys.readouterr().out
    assert "3 files" in out and "unsafe path" in out and "teacher: indexed" in out
