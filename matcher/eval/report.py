"""The one evaluation report: ``python -m matcher eval`` and the page's "Re-run evaluation" both
write what ``build_report`` returns.

Every role's matcher is opened through the registry and evaluated by its kind's row function
(``matcher.eval.rows``), on top of the float row of the encoder that encodes its queries. Encoders
shared by several roles (the student and the hashed student) are measured once, and all of them
are timed together in one process (``matcher.eval.costs``), so speed ratios compare models under
the same load.
"""
from __future__ import annotations

from typing import Callable

from matcher.data.gallery import Gallery
from matcher.eval.costs import SPEED_PROBE_NOTE, machine_description, measure_encoders
from matcher.registry import KINDS, open_matcher, parse_spec


def build_report(roles: dict[str, str], gallery: Gallery, *, gallery_label: str | None = None, split: str | None = None,
                 preset: str | None = None, measure: Callable[[list[str], Gallery], dict[str, dict]] | None = None,
                 log: Callable[[str], None] = lambda message: None) -> dict:
    """``{"gallery", "split", "preset", "machine", "speed_probe", "matchers": {row: entry}}``."""
    specs = {role: parse_spec(text) for role, text in roles.items()}
    bases = (measure or measure_encoders)(list(dict.fromkeys(spec.base for spec in specs.values())), gallery)
    report = {"gallery": gallery_label or str(gallery.root), "split": split, "preset": preset,
              "machine": machine_description(), "speed_probe": SPEED_PROBE_NOTE, "matchers": {}}
    for role, spec in specs.items():
        log(f"{role}: evaluating {spec.text} ({spec.kind})")
        matcher = open_matcher(spec.text, gallery)
        report["matchers"].update(KINDS[spec.kind].report(role, matcher, bases[spec.base]))
    return report
