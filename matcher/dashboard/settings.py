"""What an operator sets for a deployment, from the environment (``Settings.from_env``).

``MATCHER_PUBLIC=1`` is the switch for a page anyone can reach: heavy work that any visitor could
start is off or smaller unless the operator turns it back on. Every value has its own variable:

=============================  ==========================  =======================================
variable                       default (private / public)  what
=============================  ==========================  =======================================
``MATCHER_PUBLIC``             ``0``                       public mode
``MATCHER_DISK_BUDGET_MB``     ``2048``                    uploads + embedding cache + thumbnails +
                                                           Gradio temp files, together
``MATCHER_MAX_UPLOAD_MB``      ``200`` / ``100``           largest file the server accepts
``MATCHER_TEMP_MAX_AGE_S``     ``3600``                    Gradio temp files older than this go
``MATCHER_ZIP_MAX_IMAGES``     ``5000`` / ``500``          images in one uploaded zip
``MATCHER_ALLOW_FOLDERS``      on / off                    index a folder on the server
``MATCHER_ALLOW_RERUN``        on / off                    re-run the evaluation (minutes of CPU)
``MATCHER_ALLOW_UPLOADS``      on / on                     index an uploaded zip
``MATCHER_ALLOW_ANALYSIS``     on / on                     error analysis (computed once per setting)
``MATCHER_GALLERY``            bundled / (required)        the gallery served; public mode refuses
                                                           the bundled Flickr8k photos (research use)
``MATCHER_SERVE_BUNDLED``      ``0``                       ``1``: serve them anyway, for benchmarks of
                                                           public mode on loopback only
=============================  ==========================  =======================================

Heavy work that is on runs one task at a time, in its own queue, on a low-priority thread
(``matcher.dashboard.heavy``), so searches keep their latency while it runs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from matcher.data.uploads import MAX_FILE_BYTES, MAX_FILES, MAX_TOTAL_BYTES

MB = 1024 * 1024


def _flag(env: dict, name: str, default: bool) -> bool:
    value = env.get(name)
    if value is None or not value.strip():
        return default
    return value.strip().lower() in ("1", "true", "yes", "on")


def _number(env: dict, name: str, default: int) -> int:
    value = env.get(name)
    try:
        return max(0, int(float(value))) if value and value.strip() else default
    except ValueError:
        raise ValueError(f"{name} must be a number (got {value!r})") from None


@dataclass(frozen=True)
class Settings:
    public: bool = False
    disk_budget_mb: int = 2048
    max_upload_mb: int = 200
    temp_max_age_s: int = 3600
    zip_max_images: int = MAX_FILES
    zip_max_file_bytes: int = MAX_FILE_BYTES
    zip_max_total_bytes: int = MAX_TOTAL_BYTES
    allow_folders: bool = True
    allow_rerun: bool = True
    allow_uploads: bool = True
    allow_analysis: bool = True

    @classmethod
    def from_env(cls, env: dict | None = None) -> "Settings":
        env = dict(os.environ if env is None else env)
        public = _flag(env, "MATCHER_PUBLIC", False)
        return cls(
            public=public,
            disk_budget_mb=_number(env, "MATCHER_DISK_BUDGET_MB", 2048),
            max_upload_mb=_number(env, "MATCHER_MAX_UPLOAD_MB", 100 if public else 200),
            temp_max_age_s=_number(env, "MATCHER_TEMP_MAX_AGE_S", 3600),
            zip_max_images=_number(env, "MATCHER_ZIP_MAX_IMAGES", 500 if public else MAX_FILES),
            allow_folders=_flag(env, "MATCHER_ALLOW_FOLDERS", not public),
            allow_rerun=_flag(env, "MATCHER_ALLOW_RERUN", not public),
            allow_uploads=_flag(env, "MATCHER_ALLOW_UPLOADS", True),
            allow_analysis=_flag(env, "MATCHER_ALLOW_ANALYSIS", True),
        )

    @property
    def disk_budget_bytes(self) -> int:
        return self.disk_budget_mb * MB

    @property
    def delete_cache(self) -> tuple[int, int]:
        """Gradio's ``Blocks(delete_cache=(every, older_than))`` in seconds."""
        age = max(60, self.temp_max_age_s)
        return (max(60, min(600, age // 4)), age)

    def describe(self) -> str:
        off = [name for name, on in (("server folders", self.allow_folders), ("re-running the evaluation", self.allow_rerun),
                                     ("zip uploads", self.allow_uploads), ("error analysis", self.allow_analysis)) if not on]
        mode = "public" if self.public else "private"
        return (f"{mode} mode; disk budget {self.disk_budget_mb} MB; uploads up to {self.max_upload_mb} MB and "
                f"{self.zip_max_images} images per zip" + (f"; off: {', '.join(off)}" if off else ""))
