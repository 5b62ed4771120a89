"""matcher dashboard: the preset's matchers side by side, trade-offs, error analysis, own galleries.

    python app.py                      # http://localhost:7860 (PORT / GRADIO_SERVER_PORT to change)
    python app.py --preset clip        # hub models; falls back to 'offline' without hub access

This file only wires the page to the backend (``matcher.dashboard.workspace`` / ``compare`` / ``results`` /
``analysis`` / ``uploads``); everything it shows can be computed with ``python -m matcher`` too.
A public deployment sets ``MATCHER_PUBLIC=1`` (see ``matcher.dashboard.settings``): a disk budget,
upload limits, and heavy work (indexing, re-running the evaluation) bounded or off.
"""
from __future__ import annotations

import argparse
import functools
import logging
import mimetypes
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

from matcher.dashboard.errors import report_unexpected
from matcher.dashboard.matchers import Column, example_queries
from matcher.dashboard.services import Services, discard_upload, usable_cache_dir
from matcher.dashboard.settings import Settings
from matcher.data.cache import cache_problems
from matcher.data.gallery import GalleryError
from matcher.data.images import UnreadableImage, load_rgb
from matcher.eval.results import ACCURACY_METRICS, PUBLISHED_LABEL, PUBLISHED_SOURCE, SPEED_METRICS, metrics_table, tradeoff_figure, write_csv
from matcher.search.protocol import MAX_K, QueryError, SearchOptions
from matcher.data.uploads import UploadError, check_folder, extract_zip, folder_roots, touch
from matcher.dashboard.workspace import Workspace

log = logging.getLogger("matcher.app")

INTRO = """# matcher: efficient image-text matching
Search a photo gallery by text or by image with every matcher of the active preset side by side:
the **teacher** (accurate, slower), the distilled **student** and the **hashed** index (binary codes,
candidate search + re-rank); the `offline+fine` preset adds a fourth column, **fine**: the teacher's top C
re-scored region × word by a scorer with its own trained copies of the teacher's top layers (text queries),
and `offline+cross` fills that column with the cross-encoder instead (the teacher's top MiniLM layers
reading the words and the photo's regions together, on its top C).
Scores are cosine similarities (fine: cosine + weighted alignment or cross-encoder score); ✓ marks a
ground-truth image when the query is one of the gallery's captions. Timings are per stage, measured on
this server."""

ANALYSIS_NOTE = """For every caption of the gallery (the query) the right answer is the photo it describes.
Listed: queries where the teacher finds it in its top K and the chosen matcher does not (or the reverse)."""


# Searches in flight at once. More than the cores: text queries in flight together are encoded in one
# batch (matcher.dashboard.batching), which is where a loaded server gains most.
SEARCH_CONCURRENCY = int(os.environ.get("MATCHER_SEARCH_CONCURRENCY", "16"))
STANDARD_CODE_LENGTHS = [16, 32, 64, 128, 256]   # what an API call may name; the page offers the loaded ones


def _guard(fn):
    """Unexpected exceptions become one short message with an id (details in the log), never raw text."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as exc:  # noqa: BLE001 - the point: nothing unexpected reaches the visitor verbatim
            raise gr.Error(report_unexpected(exc, fn.__name__)) from None
    return wrapper


def _result_gallery(**kwargs) -> gr.Gallery:
    """A ``gr.Gallery`` whose (image path, caption) answers become Gallery data in the calling thread.

    Gradio's own ``Gallery.postprocess`` starts a thread pool for every answer of every column, which
    on a loaded 2-core server costs more than the list itself. Bound to the instance, not a subclass:
    Gradio writes a ``.pyi`` stub next to any module that defines a component subclass. Any other
    value goes to Gradio's own.
    """
    gallery = gr.Gallery(**kwargs)
    general = gallery.postprocess

    def postprocess(value):
        if isinstance(value, list) and all(isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str) for v in value):
            from gradio.components.gallery import GalleryData, GalleryImage
            from gradio.data_classes import ImageData

            return GalleryData(root=[GalleryImage(image=ImageData(path=path, orig_name=Path(path).name,
                                                                  mime_type=mimetypes.guess_type(path)[0]),
                                                  caption=caption) for path, caption in value])
        return general(value)

    gallery.postprocess = postprocess
    return gallery


def _hits_gallery(column: Column, shown) -> list[tuple[str, str]]:
    return [(str(shown(h.path)), f"#{h.rank} · {h.score:.3f}" + (" · ✓ ground truth" if h.match else ""))
            for h in column.hits]


def _header(column: Column, truth: int) -> str:
    head = f"### {column.role}\n`{column.spec}`"
    if column.error:
        return head + f"\n\n⚠️ {column.error}"
    found = sum(h.match for h in column.hits)
    lines = [head, f"timings: {column.timings_text()}"]
    if truth:
        lines.append(f"✓ {found} of {truth} ground-truth image{'s' if truth > 1 else ''} in the top {len(column.hits)}")
    return "\n\n".join(lines)


def _thumbs_per_row(visible_columns: int) -> int:
    return {1: 4, 2: 3}.get(visible_columns, 2)


def _gallery_label(root: str, size: int) -> str:
    from matcher.data.gallery import gallery_terms
    from matcher.paths import REPO_ROOT

    path = Path(root)
    shown = path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path
    terms = gallery_terms(path)
    return f"Gallery: `{shown}` ({size} images)" + (f"<br>{terms}" if terms else "")


def _discard_upload(path: str | None) -> None:
    discard_upload(path, gr.utils.get_upload_folder())


@dataclass
class _Page:
    """What more than one tab reads or writes: the workspace, the preset, the active gallery, the options."""

    demo: gr.Blocks
    ws: Workspace
    server: Services
    preset: gr.Dropdown
    root: gr.State
    active_md: gr.Markdown
    gallery_md: gr.Markdown
    tmp_dir: Path
    search_inputs: list = field(default_factory=list)  # k, bits, candidates, rerank (made by the search tab)

    @property
    def slots(self) -> int:
        return self.ws.max_roles

    @property
    def options(self) -> list:
        """Inputs of every search call: preset, gallery root, then the search options."""
        return [self.preset, self.root, *self.search_inputs]


def _whole(value, what: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        raise QueryError(f"{what} must be a whole number (got {value!r}).") from None


def _search_options(k, bits, candidates, rerank) -> SearchOptions:
    return SearchOptions(k=_whole(k, "K"), bits=_whole(bits, "The code length"),
                         candidates=_whole(candidates, "The candidate pool C"), rerank=bool(rerank))


def _cache_note() -> str:
    problems = cache_problems()
    return "".join(f"\n\n⚠️ {p}" for p in problems)


def build_app(workspace: Workspace | None = None, settings: Settings | None = None, temp_dir: str | Path | None = None,
              **workspace_kwargs) -> gr.Blocks:
    """The page. Tests pass a ``Workspace`` with tiny models and a small gallery, and ``Settings``.

    ``temp_dir``: Gradio's upload/temp folder when it belongs to this server alone (``main`` points
    ``GRADIO_TEMP_DIR`` into the cache): it then counts against the disk budget.
    """
    ws = workspace or Workspace(**workspace_kwargs)
    settings = settings or Settings.from_env()
    server = Services(settings, temp_dir)
    removed = server.clean_at_start()
    if removed:
        log.info("start-up: removed %d leftover or over-budget entries", len(removed))
    with gr.Blocks(title="matcher: efficient image-text matching", delete_cache=settings.delete_cache) as demo:
        root_state = gr.State(ws.default_gallery)
        gr.Markdown(INTRO)
        with gr.Row():
            preset_dd = gr.Dropdown(list(ws.presets), value=ws.default_preset, label="Matcher preset", scale=1,
                                    elem_id="preset")
            active_md = gr.Markdown(ws.active().describe(), elem_id="active-preset")
        gallery_md = gr.Markdown(_gallery_label(ws.default_gallery, len(ws.gallery())), elem_id="gallery-info")
        page = _Page(demo, ws, server, preset_dd, root_state, active_md, gallery_md,
                     Path(tempfile.mkdtemp(prefix="matcher-app-")))
        with gr.Tabs():
            with gr.Tab("Search", id="search"):
                _search_tab(page)
            with gr.Tab("Trade-offs", id="tradeoffs"):
                _tradeoffs_tab(page)
            with gr.Tab("Error analysis", id="errors"):
                _analysis_tab(page)
            with gr.Tab("Own gallery", id="own"):
                _own_gallery_tab(page)
    demo.workspace = ws  # for tests and the launcher
    demo.matcher_server = server
    _serve_as_static(_served_folders(ws, settings, server))
    return demo


def _serve_as_static(folders: list[str]) -> None:
    """Gallery images are served from where they are: no hashing, no copy into Gradio's temp folder.

    Gradio tests each result image against every static folder in order (resolving both paths each
    time), twice per answer, and its own icons come first in that list; ours are moved to the front,
    so an image matches at the first test instead of the third. Only the order changes, so without
    that private list the page still works, a little slower.
    """
    gr.set_static_paths(folders)
    try:
        from gradio.data_classes import _StaticFiles

        ours = [Path(f).resolve() for f in folders]
        _StaticFiles.all_paths[:] = ours + [p for p in _StaticFiles.all_paths if p not in ours]
    except (ImportError, AttributeError, TypeError):
        pass


def _served_folders(ws: Workspace, settings: Settings, server: Services) -> list[str]:
    """Folders whose images the page shows: the gallery, extracted uploads, thumbnails, and (when
    server folders are allowed) the folder roots. The bundled gallery comes first: Gradio tests every
    result image against these folders in order (resolving both paths each time), on every answer."""
    folders = [str(Path(ws.default_gallery))] + [str(f) for f in (server.uploads, server.thumbs_dir) if f]
    if settings.allow_folders:
        folders += [str(r) for r in folder_roots()]
    return list(dict.fromkeys(folders))


# -- search ---------------------------------------------------------------------------------------

def _code_length_choices(ws: Workspace) -> list[int]:
    """Before the hashed matchers are open: every standard length (an API call may name any; a length
    the heads lack is refused in the hashed column). The page load narrows it to the loaded heads."""
    return sorted(set(STANDARD_CODE_LENGTHS) | {SearchOptions.bits})


def _search_tab(page: _Page) -> None:
    """Query inputs, options, one result column per role slot, "more like this"; and their events."""
    ws, slots = page.ws, page.slots
    with gr.Row():
        with gr.Column(scale=3):
            query = gr.Textbox(label="Text query", placeholder="a dog running on the beach", elem_id="query", max_lines=2)
            with gr.Row():
                search_btn = gr.Button("Search", variant="primary", elem_id="search-btn")
            example_box = gr.Examples([[e] for e in example_queries(ws.gallery(), 8)], inputs=[query],
                                      label="Example queries (captions from the test split; click to search)")
        with gr.Column(scale=2):
            image_in = gr.File(label="…or search by image (upload a photo)", type="filepath", elem_id="image-upload",
                               height=140)
            image_preview = gr.Image(label="Query image", height=140, interactive=False, show_label=True)
    with gr.Accordion("Options", open=False):
        with gr.Row():
            bits_dd = gr.Dropdown(_code_length_choices(ws), value=SearchOptions.bits, label="Code length (bits, hashed)",
                                  elem_id="bits")
            page.search_inputs = [
                gr.Slider(1, min(MAX_K, 50), value=8, step=1, label="K (results per matcher)", elem_id="k"),
                bits_dd,
                gr.Slider(10, 1000, value=100, step=10, label="Candidate pool C (hashed)"),
                gr.Checkbox(value=True, label="Re-rank candidates with float similarity (hashed)"),
            ]
    status_md = gr.Markdown("", elem_id="search-status")
    hits_state = gr.State([[] for _ in range(slots)])
    selected_state = gr.State("")
    col_blocks, headers, galleries = _result_columns(ws)
    with gr.Row():
        selected_md = gr.Markdown("Click a result to select it, then:", elem_id="selected")
        more_btn = gr.Button("More like this", elem_id="more-like")

    run_text, run_image, run_more_like, change_preset, code_lengths = _search_handlers(page)
    # Answers carry plain values (markdown text, image lists), no component updates: an update makes
    # Gradio rebuild the component and its config for the session on every answer.
    outs = [status_md, hits_state] + [b for pair in zip(headers, galleries) for b in pair]
    search_kw = dict(concurrency_limit=SEARCH_CONCURRENCY, concurrency_id="search")
    search_btn.click(run_text, [query] + page.options, outs, api_name="search_text", **search_kw)
    query.submit(run_text, [query] + page.options, outs, api_visibility="private", **search_kw)
    if getattr(example_box, "load_input_event", None) is not None:  # clicking an example also runs it
        example_box.load_input_event.then(run_text, [query] + page.options, outs, api_visibility="private", **search_kw)
    image_in.upload(run_image, [image_in] + page.options, outs + [image_preview], api_name="search_image", **search_kw)
    more_btn.click(run_more_like, [selected_state] + page.options, outs, api_name="more_like", **search_kw)
    for i, gal in enumerate(galleries):
        gal.select(_guard(_select_hit(i)), [hits_state], [selected_state, selected_md], api_visibility="private")
    column_outs = [b for trio in zip(col_blocks, headers, galleries) for b in trio]
    page.preset.change(change_preset, [page.preset, page.root], [page.active_md, hits_state] + column_outs,
                       api_visibility="private")
    page.preset.change(code_lengths, [page.preset, page.root], [bits_dd], api_visibility="private",
                       concurrency_id="setup")
    page.demo.load(code_lengths, [page.preset, page.root], [bits_dd], api_visibility="private", concurrency_id="setup")


def _result_columns(ws: Workspace) -> tuple[list, list, list]:
    """One (column, header, gallery) per role slot; slots beyond the active preset start hidden."""
    cols, headers, galleries = [], [], []
    active_roles = list(ws.active().roles)
    with gr.Row(equal_height=False):
        for i in range(ws.max_roles):
            visible = i < len(active_roles)
            with gr.Column(visible=visible, elem_id=f"col-{i}", min_width=220) as col:
                header = gr.Markdown(f"### {active_roles[i]}" if visible else "", elem_id=f"col-{i}-header")
                gal = _result_gallery(label="top K", columns=_thumbs_per_row(len(active_roles)), height=520, object_fit="cover",
                                 elem_id=f"col-{i}-gallery", allow_preview=True, show_label=False)
            cols.append(col)
            headers.append(header)
            galleries.append(gal)
    return cols, headers, galleries


def _select_hit(i: int):
    def handler(hits, evt: gr.SelectData):
        names = hits[i] if isinstance(hits, list) and i < len(hits) else []
        index = evt.index if isinstance(evt.index, int) else 0
        if not 0 <= index < len(names):
            return "", "Click a result to select it, then:"
        return names[index], f"Selected **{names[index]}**; now:"
    return handler


def _search_handlers(page: _Page):
    """(run_text, run_image, run_more_like, change_preset, code_lengths): the answers are the status,
    the hit names per slot, then (header, images) per slot."""
    ws, server, slots = page.ws, page.server, page.slots

    def columns_out(columns: list[Column], truth: int) -> list:
        out = []
        for i in range(slots):
            if i < len(columns):
                out += [_header(columns[i], truth), _hits_gallery(columns[i], server.thumbs)]
            else:
                out += ["", []]
        return out

    def names_of(columns: list[Column]) -> list[list[str]]:
        return [[h.name for h in c.hits] for c in columns] + [[] for _ in range(slots - len(columns))]

    def empty_out(message: str) -> list:
        return [message, [[] for _ in range(slots)]] + [gr.skip(), gr.skip()] * slots

    @_guard
    def run_text(text, preset, root, k, bits, candidates, rerank):
        try:
            options = _search_options(k, bits, candidates, rerank)
            mset = ws.matchers(preset, root)
            columns = mset.search_text(text, options)
        except (QueryError, GalleryError) as exc:
            return empty_out(f"⚠️ {exc}")
        truth = len(mset.ground_truth(text))
        status = f"Text query: “{text.strip()}”" + (f" (a caption of this gallery: {truth} ground-truth image{'s' if truth > 1 else ''})" if truth else "")
        return [status + _cache_note(), names_of(columns)] + columns_out(columns, truth)

    @_guard
    def run_image(path, preset, root, k, bits, candidates, rerank):
        if not path:
            return empty_out("Upload an image to search with it.") + [None]
        name = "".join(c for c in Path(str(path)).name if c.isprintable())
        try:
            image = load_rgb(path)
        except UnreadableImage as exc:
            gr.Warning(f"{name} is not an image we can read: {exc}.")
            return empty_out(f"⚠️ **{name}** is not an image we can read: {exc}. Upload a JPEG, PNG, WebP, GIF or BMP photo.") + [None]
        finally:
            _discard_upload(path)  # read or refused: the upload is not needed any more
            server.enforce(ws.open_galleries(), every_s=30)
        try:
            columns = ws.matchers(preset, root).search_image(image, _search_options(k, bits, candidates, rerank))
        except (QueryError, GalleryError) as exc:
            return empty_out(f"⚠️ {exc}") + [None]
        return [f"Image query: {name}" + _cache_note(), names_of(columns)] + columns_out(columns, 0) + [image]

    @_guard
    def run_more_like(selected, preset, root, k, bits, candidates, rerank):
        if not selected:
            return empty_out("Click a result in any column first, then “More like this”.")
        try:
            columns = ws.matchers(preset, root).more_like(str(selected), _search_options(k, bits, candidates, rerank))
        except (QueryError, GalleryError) as exc:
            return empty_out(f"⚠️ {exc}")
        return [f"More like {selected} (image → image, from stored embeddings)", names_of(columns)] + columns_out(columns, 0)

    @_guard
    def change_preset(preset, root):
        active = ws.active(preset)
        updates = []
        roles = list(active.roles)
        for i in range(slots):
            visible = i < len(roles)
            header = f"### {roles[i]}\n`{active.roles[roles[i]]}`" if visible else ""
            updates += [gr.update(visible=visible), header, gr.update(value=[], columns=_thumbs_per_row(len(roles)))]
        return [active.describe(), [[] for _ in range(slots)]] + updates

    @_guard
    def code_lengths(preset, root):
        """The code lengths the preset's hashed heads provide (waits for them to load)."""
        bits = ws.code_lengths(preset, root)
        if not bits:
            return gr.update(choices=[SearchOptions.bits], value=SearchOptions.bits, interactive=False,
                             info="this preset has no hashed matcher")
        value = min(bits, key=lambda b: (abs(b - SearchOptions.bits), b))  # the default, else the nearest
        return gr.update(choices=bits, value=value, interactive=True, info=None)

    return run_text, run_image, run_more_like, change_preset, code_lengths


# -- trade-offs -----------------------------------------------------------------------------------

def _tradeoffs_tab(page: _Page) -> None:
    """The speed/accuracy chart over every measured result file, its table and CSV, and a re-run button."""
    ws, settings = page.ws, page.server.settings
    with gr.Row():
        speed_in = gr.Radio(list(SPEED_METRICS), value="text-query latency (ms)", label="Speed")
        acc_in = gr.Radio(list(ACCURACY_METRICS), value="rsum", label="Accuracy")
    plot = gr.Plot(label="Speed vs accuracy", elem_id="tradeoff-plot")
    notes_md = gr.Markdown(elem_id="tradeoff-notes")
    table = gr.Dataframe(label="Measured metrics (Flickr8k test split, this machine)", interactive=False,
                         elem_id="metrics-table", wrap=True)
    with gr.Row():
        csv_btn = gr.DownloadButton("Download CSV", elem_id="csv-download")
        rerun_btn = gr.Button("Re-run evaluation of the active preset (minutes)", elem_id="rerun",
                              visible=settings.allow_rerun)

    @_guard
    def show_tradeoffs(speed, accuracy):
        results = ws.results()
        fig, tp = tradeoff_figure(results, speed, accuracy)
        df = metrics_table(results)
        csv = write_csv(df, page.tmp_dir / "matcher-metrics.csv")
        notes = [f"Dotted lines: {PUBLISHED_LABEL} — {PUBLISHED_SOURCE}. They have no speed here "
                 "(measured on other hardware), only accuracy; compare with care. Hover over a point for its name; "
                 "click a legend entry to hide or show a group."]
        notes += [f"- {n}" for n in results.notes + tp.skipped]
        machine = results.meta.get("eval", {}).get("machine")
        if machine:
            notes.append(f"Measured on: {machine}")
        return fig, "\n".join(notes), df, gr.update(value=str(csv))

    @_guard
    def rerun(preset, root, speed, accuracy, progress=gr.Progress(track_tqdm=True)):
        if not settings.allow_rerun:
            raise gr.Error("Re-running the evaluation is switched off on this server.")
        try:
            path = page.server.heavy.run(ws.rerun_eval, preset, root)
        except (ValueError, GalleryError) as exc:
            raise gr.Error(f"Evaluation failed: {exc}")
        gr.Info(f"Re-measured; wrote {path}")
        return show_tradeoffs(speed, accuracy)

    tradeoff_outs = [plot, notes_md, table, csv_btn]
    speed_in.change(show_tradeoffs, [speed_in, acc_in], tradeoff_outs, api_visibility="private")
    acc_in.change(show_tradeoffs, [speed_in, acc_in], tradeoff_outs, api_visibility="private")
    page.demo.load(show_tradeoffs, [speed_in, acc_in], tradeoff_outs, api_name="tradeoffs")
    if settings.allow_rerun:
        rerun_btn.click(rerun, [page.preset, page.root, speed_in, acc_in], tradeoff_outs, api_visibility="private",
                        concurrency_limit=1, concurrency_id="heavy")


# -- error analysis -------------------------------------------------------------------------------

def _analysis_tab(page: _Page) -> None:
    """Queries where a fast matcher and the teacher disagree: summary, plots, cases, one case side by side."""
    ws, slots, settings = page.ws, page.slots, page.server.settings
    gr.Markdown(ANALYSIS_NOTE if settings.allow_analysis else "The error analysis is switched off on this server.")
    with gr.Row(visible=settings.allow_analysis):
        ak_in = gr.Slider(1, 50, value=10, step=1, label="K")
        role_in = gr.Dropdown([], label="Fast matcher", elem_id="analysis-role")
        direction_in = gr.Radio(["teacher-only", "fast-only"], value="teacher-only",
                                label="Cases: teacher finds it, matcher does not (or the reverse)")
        analyse_btn = gr.Button("Analyse", variant="primary", elem_id="analyse")
    analysis_md = gr.Markdown(elem_id="analysis-status")
    summary_df = gr.Dataframe(label="Summary", interactive=False)
    with gr.Row():
        overlap_plot = gr.Plot(label="Top-K overlap")
        disp_plot = gr.Plot(label="Rank displacement")
    cases_df = gr.Dataframe(label="Cases (worst first); pick one below", interactive=False, max_height=300)
    case_dd = gr.Dropdown([], label="Show a case", elem_id="case")
    case_md = gr.Markdown(elem_id="case-info")
    case_gals = []
    with gr.Row():
        for i in range(slots):
            case_gals.append(gr.Gallery(columns=2, height=420, object_fit="cover", label=f"slot {i}", visible=False,
                                        elem_id=f"case-{i}-gallery"))
    _, bits_in, cand_in, rerank_in = page.search_inputs

    @_guard
    def analysis_roles(preset):
        roles = [r for r in ws.active(preset).roles if r != "teacher"]
        return gr.update(choices=roles, value=roles[0] if roles else None)

    @_guard
    def run_analysis(preset, root, k, role, direction, bits, candidates, rerank, progress=gr.Progress(track_tqdm=True)):
        hidden = [gr.update(visible=False, value=[]) for _ in range(slots)]
        if not settings.allow_analysis:
            return ["The error analysis is switched off on this server.", None, None, None, None,
                    gr.update(choices=[], value=None)] + hidden
        try:
            options = _search_options(k, bits, candidates, rerank)
            result = page.server.heavy.run(ws.analysis, preset, root, int(k), options)
        except (ValueError, GalleryError) as exc:
            return [f"⚠️ {exc}", None, None, None, None, gr.update(choices=[], value=None)] + hidden
        if not result.fast_roles:
            return (["The active preset has only one matcher; nothing to compare with the teacher yet.", result.summary(),
                     None, None, None, gr.update(choices=[], value=None)] + hidden)
        role = role if role in result.fast_roles else result.fast_roles[0]
        cases = result.cases(role, direction if direction in ("teacher-only", "fast-only") else "teacher-only")
        shown = cases.head(50)
        choices = [(f"{c} (teacher rank {int(rt) + 1}, {role} rank {int(rr) + 1})", int(i))
                   for i, c, rt, rr in zip(shown.index, shown["caption"], shown[f"rank_{result.reference}"], shown[f"rank_{role}"])]
        msg = (f"{len(result.per_query)} caption queries, K = {result.k}: {len(cases)} {direction} cases for **{role}**. "
               "Ranks are 1-based.")
        table = shown[["caption", "image", f"rank_{result.reference}", f"rank_{role}", f"overlap_{role}"]].copy()
        table[[f"rank_{result.reference}", f"rank_{role}"]] += 1
        return ([msg, result.summary(), result.overlap_figure(), result.displacement_figure(), table,
                 gr.update(choices=choices, value=choices[0][1] if choices else None)] + hidden)

    @_guard
    def show_case(preset, root, k, index, bits, candidates, rerank):
        if index is None:
            return [""] + [gr.update(visible=False) for _ in range(slots)]
        try:
            options = _search_options(k, bits, candidates, rerank)
        except QueryError as exc:
            return [f"⚠️ {exc}"] + [gr.update(visible=False) for _ in range(slots)]
        result = ws.cached_analysis(preset, root, int(k), options)
        if result is None:  # not computed with these settings (or evicted): never computed here, outside the heavy queue
            return ["Press **Analyse** again: the analysis for these settings is not in memory."] + \
                [gr.update(visible=False) for _ in range(slots)]
        index = int(index)
        if not 0 <= index < len(result.texts):
            return [""] + [gr.update(visible=False) for _ in range(slots)]
        caption, owner = result.texts[index], result.owners[index]
        mset = ws.matchers(preset, root)
        out = [f"**Query:** {caption}  \n**Right image:** {owner} (✓ where it appears)"]
        roles = list(result.rankings)
        for i in range(slots):
            if i < len(roles):
                role = roles[i]
                rank = int(result.rankings[role].gt_rank[index])
                items = [(str(page.server.thumbs(mset.gallery.path(n))), f"#{r} " + ("✓" if n == owner else ""))
                         for r, n in enumerate(result.topk(role, index), 1)]
                label = f"{role}: right image at rank {rank + 1}" if rank < result.rankings[role].cap else f"{role}: right image not in top {result.rankings[role].cap}"
                out.append(gr.update(visible=True, value=items, label=label))
            else:
                out.append(gr.update(visible=False))
        return out

    page.preset.change(analysis_roles, [page.preset], [role_in], api_visibility="private")
    page.demo.load(analysis_roles, [page.preset], [role_in], api_visibility="private")
    if not settings.allow_analysis:
        return
    analysis_inputs = [page.preset, page.root, ak_in, role_in, direction_in, bits_in, cand_in, rerank_in]
    analysis_outs = [analysis_md, summary_df, overlap_plot, disp_plot, cases_df, case_dd] + case_gals
    analyse_btn.click(run_analysis, analysis_inputs, analysis_outs, api_name="analyse", concurrency_limit=1,
                      concurrency_id="heavy")
    case_dd.change(show_case, [page.preset, page.root, ak_in, case_dd, bits_in, cand_in, rerank_in], [case_md] + case_gals,
                   api_visibility="private")


# -- own gallery ----------------------------------------------------------------------------------

def _own_gallery_tab(page: _Page) -> None:
    """Index an uploaded zip or a server folder with every matcher of the preset; report unusable files."""
    ws, demo, server = page.ws, page.demo, page.server
    settings = server.settings
    limits = (f"Up to {settings.zip_max_images} images and {settings.max_upload_mb} MB per zip"
              + ("; one gallery is indexed at a time." if settings.public else "."))
    gr.Markdown("Upload a **zip** of images (optionally with a `captions.jsonl`: one "
                "`{\"image\": name, \"captions\": [...]}` per line)"
                + (" or give a folder on the server" if settings.allow_folders else "") + ". "
                "It is indexed once with every matcher of the active preset and cached; "
                "the Search and Error-analysis tabs then use it. " + limits)
    with gr.Row():
        zip_in = gr.File(label="Zip of images", type="filepath", elem_id="zip-upload", visible=settings.allow_uploads)
        with gr.Column():
            folder_in = gr.Textbox(label="…or a folder on the server", visible=settings.allow_folders, elem_id="folder",
                                   placeholder=str(folder_roots()[0]) if folder_roots() else "/path/to/photos")
            folder_btn = gr.Button("Index folder", visible=settings.allow_folders, elem_id="folder-btn")
            reset_btn = gr.Button("Back to the bundled gallery")
    own_md = gr.Markdown(elem_id="own-status")
    skipped_df = gr.Dataframe(headers=["file", "reason"], label="Files not used", interactive=False,
                              elem_id="own-skipped")

    def index_gallery(root: Path, preset, current, skipped) -> list:
        try:
            gallery = ws.gallery(str(root))
        except GalleryError as exc:
            return [current, f"⚠️ {exc}", [list(s) for s in skipped], gr.update()]
        mset = ws.matchers(preset, str(root))
        status = mset.warm()
        problems = [f"{role}: {err}" for role, err in status.items() if err]
        embedded = [mset.matcher(r).embeddings for r in mset.roles if not status.get(r) and hasattr(mset.matcher(r), "embeddings")]
        bad = list(skipped) + (list(embedded[0].skipped) if embedded else list(gallery.problems))
        captions = sum(len(gallery.captions.get(n, [])) for n in gallery.names)
        msg = (f"Indexed **{len(gallery)} images** ({captions} captions) from `{root}` with "
               f"{', '.join(mset.roles)}. {len(bad)} file(s) not used." + ("".join(f"\n\n⚠️ {p}" for p in problems))
               + _cache_note())
        info = _gallery_label(str(root), len(gallery))
        return [str(root), msg, [list(s) for s in bad], info]

    def extract_and_index(path, preset, root) -> list:
        try:
            extracted = extract_zip(path, max_files=settings.zip_max_images, max_file_bytes=settings.zip_max_file_bytes,
                                    max_total_bytes=settings.zip_max_total_bytes)
        except UploadError as exc:
            return [root, f"⚠️ {exc}", [], gr.update()]
        finally:
            _discard_upload(path)  # extracted (cached by content hash) or refused: the zip itself is not kept
        fits = server.enforce([*ws.open_galleries(), extracted.root])
        if fits is not None and not fits.fits and not extracted.from_cache:
            shutil.rmtree(extracted.root, ignore_errors=True)
            return [root, f"⚠️ This server's disk budget ({settings.disk_budget_mb} MB for uploads and caches) is "
                          "full right now; try a smaller zip, or later.", [], gr.update()]
        touch(extracted.root)
        out = index_gallery(extracted.root, preset, root, extracted.skipped)
        server.enforce([*ws.open_galleries(), extracted.root])  # the new embeddings count too
        return out

    @_guard
    def upload_zip(path, preset, root, progress=gr.Progress(track_tqdm=True)):
        if not path:
            return [root, "", [], gr.update()]
        if not settings.allow_uploads:
            _discard_upload(path)
            return [root, "⚠️ Uploading galleries is switched off on this server.", [], gr.update()]
        return server.heavy.run(extract_and_index, path, preset, root)

    @_guard
    def use_folder(folder, preset, root, progress=gr.Progress(track_tqdm=True)):
        if not settings.allow_folders:
            return [root, "⚠️ Indexing server folders is switched off on this server.", [], gr.update()]
        try:
            path = check_folder(folder)
        except UploadError as exc:
            return [root, f"⚠️ {exc}", [], gr.update()]
        if str(path) not in demo.allowed_paths:
            demo.allowed_paths.append(str(path))  # so the result images can be served
        return server.heavy.run(index_gallery, path, preset, root, [])

    @_guard
    def reset_gallery():
        return [ws.default_gallery, "Back to the bundled gallery.", [],
                _gallery_label(ws.default_gallery, len(ws.gallery()))]

    own_outs = [page.root, own_md, skipped_df, page.gallery_md]
    if settings.allow_uploads:
        zip_in.upload(upload_zip, [zip_in, page.preset, page.root], own_outs, api_name="upload_zip", concurrency_limit=1,
                      concurrency_id="heavy")
    if settings.allow_folders:
        folder_btn.click(use_folder, [folder_in, page.preset, page.root], own_outs, api_name="use_folder",
                         concurrency_limit=1, concurrency_id="heavy")
    reset_btn.click(reset_gallery, None, own_outs, api_visibility="private")


def launch_kwargs(ws: Workspace, settings: Settings | None = None) -> dict:
    """What ``launch`` needs: where images may be served from (the gallery, extracted uploads,
    thumbnails; server folder roots only where server folders are allowed), the upload size limit,
    and no raw exception text for visitors (``show_error=False``: only ``gr.Error`` messages show)."""
    settings = settings or Settings.from_env()
    root = usable_cache_dir()
    allowed = {str(Path(ws.default_gallery))} | ({str(root / "uploads"), str(root / "thumbs")} if root else set())
    if settings.allow_folders:
        allowed |= {str(r) for r in folder_roots()}
    return dict(allowed_paths=sorted(allowed), max_file_size=f"{settings.max_upload_mb}mb", show_error=False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=os.environ.get("MATCHER_PRESET"), help="matcher preset (default: offline)")
    parser.add_argument("--gallery", default=os.environ.get("MATCHER_GALLERY"), help="gallery folder (default: bundled)")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "0.0.0.0"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT") or os.environ.get("GRADIO_SERVER_PORT") or 7860))
    parser.add_argument("--preset-file", default=os.environ.get("MATCHER_PRESET_FILE"),
                        help="a preset of your own: a JSON object role -> spec (docs/models.md)")
    parser.add_argument("--roles", help="a 'custom' preset: a comma list of the preset's roles and/or ROLE=SPEC "
                        "additions, e.g. teacher,student=open_clip:matcher-tiny-vit")
    parser.add_argument("--train-gallery", default=os.environ.get("MATCHER_TRAIN_GALLERY"),
                        help="captioned gallery that hashed:/distilled: heads train on (never the searched one)")
    parser.add_argument("--no-warm", action="store_true", help="do not load the models in the background at start-up")
    parser.add_argument("--public", action="store_true", help="public mode (same as MATCHER_PUBLIC=1)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.public:
        os.environ["MATCHER_PUBLIC"] = "1"
    try:
        settings = Settings.from_env()
    except ValueError as exc:
        parser.error(str(exc))
    # Gradio's temp files (uploads, copies of result files) live in the cache folder, under the disk
    # budget, unless the operator chose a folder for them.
    temp_dir = None
    if not os.environ.get("GRADIO_TEMP_DIR"):
        root = usable_cache_dir()
        if root is not None:
            temp_dir = root / "gradio"
            os.environ["GRADIO_TEMP_DIR"] = str(temp_dir)
    # Gradio recomputes its request analytics (a pandas frame over up to 10000 past events) after every
    # event by default; every 100 events is plenty for its monitoring page and saves that per query.
    os.environ.setdefault("GRADIO_ANALYTICS_CACHE_FREQUENCY", "100")
    # Gradio switches matplotlib to "agg" around every call; already "agg", that switch costs nothing.
    os.environ.setdefault("MPLBACKEND", "agg")
    # One intra-op thread per query: batch-1 queries gain nothing from more, and on a small shared CPU
    # several threads per request spin against each other (measured: 1 ms vs 200 ms per text query).
    import torch

    torch.set_num_threads(int(os.environ.get("MATCHER_THREADS", "1")))
    from matcher.data.training import TRAIN_GALLERY_ENV
    from matcher.paths import DEFAULT_GALLERY
    from matcher.presets import DEFAULT_PRESET, PRESETS, load_preset_file, parse_roles

    if args.train_gallery:
        os.environ[TRAIN_GALLERY_ENV] = str(Path(args.train_gallery).resolve())
    bundled = Path(args.gallery or DEFAULT_GALLERY).resolve() == DEFAULT_GALLERY.resolve()
    if settings.public and bundled and os.environ.get("MATCHER_SERVE_BUNDLED") != "1":
        # MATCHER_SERVE_BUNDLED=1 is for benchmarks of public mode on loopback (bench/load_test.py), never a deployment.
        # The bundled Flickr8k photos are for research use and may not be redistributed.
        parser.error("public mode serves no bundled Flickr8k photo: name the gallery to serve with --gallery "
                     "or MATCHER_GALLERY (any format python -m matcher reads; docs/models.md, 'Public Space')")
    presets = dict(PRESETS)
    try:
        if args.preset_file:
            args.preset = Path(args.preset_file).stem
            presets = {args.preset: load_preset_file(args.preset_file), **PRESETS}
        base = args.preset or DEFAULT_PRESET
        if base not in presets:
            parser.error(f"unknown preset {base!r}; choose one of: {', '.join(presets)}")
        if args.roles:
            presets = {"custom": parse_roles(args.roles, presets[base]), **presets}
            args.preset = "custom"
    except ValueError as exc:
        parser.error(str(exc))
    ws = Workspace(presets=presets, default_preset=args.preset, gallery=args.gallery)
    log.info(ws.active().describe())
    log.info("settings: %s", settings.describe())
    demo = build_app(ws, settings=settings, temp_dir=temp_dir)
    if not args.no_warm:  # models and embeddings load once, in the background, from the cache when possible
        threading.Thread(target=lambda: log.info("warm: %s", ws.warm()), daemon=True).start()
    demo.queue(default_concurrency_limit=2, max_size=256)
    demo.launch(server_name=args.host, server_port=args.port, **launch_kwargs(ws, settings))


if __name__ == "__main__":
    main()
