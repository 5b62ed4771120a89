"""Error analysis: where a fast matcher disagrees with the teacher on the gallery's own captions.

For every caption (a text->image query whose right answer is the image it describes) we get each
matcher's top-K and the rank of the right image. From that:

- *teacher-only* cases: the teacher ranks the right image in its top K, the fast matcher does not;
  *fast-only* cases: the reverse;
- top-K overlap with the teacher (|teacher top-K ∩ fast top-K| / K) per query;
- rank displacement of the right image (fast rank - teacher rank; positive = the fast matcher
  pushed it down).

Every matcher answers the batch of caption queries through the protocol's ``rank_captions``:
float matchers exactly from their cached embeddings, the hashed matcher through its shortlist
(ranks censored at C), the fine re-rank query by query (censored at its depth).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pandas as pd

from matcher.data.gallery import Gallery
from matcher.search.protocol import Matcher, Ranking, SearchOptions

def caption_queries(gallery: Gallery, limit: int | None = None) -> tuple[list[str], list[str]]:
    """(caption, right image name) for every caption of the gallery, in gallery order."""
    texts, owners = [], []
    for name in gallery.names:
        for caption in gallery.captions.get(name, []):
            texts.append(caption)
            owners.append(name)
    if limit is not None and len(texts) > limit:
        idx = np.linspace(0, len(texts) - 1, limit).round().astype(int)
        texts, owners = [texts[i] for i in idx], [owners[i] for i in idx]
    return texts, owners


@dataclass
class ErrorAnalysis:
    k: int
    reference: str
    texts: list[str]
    owners: list[str]
    rankings: dict[str, Ranking]
    per_query: pd.DataFrame = field(default_factory=pd.DataFrame)

    def __post_init__(self) -> None:
        ref = self.rankings[self.reference]
        df = pd.DataFrame({"caption": self.texts, "image": self.owners, f"rank_{self.reference}": ref.gt_rank})
        for role, r in self.rankings.items():
            if role == self.reference:
                continue
            df[f"rank_{role}"] = r.gt_rank
            df[f"overlap_{role}"] = [len(set(a) & set(b)) / self.k for a, b in zip(ref.topk, r.topk)]
            cap = min(ref.cap, r.cap)
            censored = (ref.gt_rank >= cap) | (r.gt_rank >= cap)
            df[f"displacement_{role}"] = np.where(censored, np.nan, r.gt_rank.astype(float) - ref.gt_rank)
        self.per_query = df

    @property
    def fast_roles(self) -> list[str]:
        return [r for r in self.rankings if r != self.reference]

    def cases(self, role: str, direction: str = "teacher-only") -> pd.DataFrame:
        """Queries where the reference finds the right image in the top K and ``role`` does not
        (``teacher-only``), or the reverse (``fast-only``); worst displacement first."""
        df = self.per_query
        ref_hit, hit = df[f"rank_{self.reference}"] < self.k, df[f"rank_{role}"] < self.k
        mask = (ref_hit & ~hit) if direction == "teacher-only" else (~ref_hit & hit)
        out = df[mask].copy()
        out["gap"] = (out[f"rank_{role}"] - out[f"rank_{self.reference}"]).abs()
        return out.sort_values("gap", ascending=False, kind="stable").drop(columns="gap")

    def summary(self) -> pd.DataFrame:
        df, rows = self.per_query, []
        ref_hit = df[f"rank_{self.reference}"] < self.k
        for role in self.fast_roles:
            hit = df[f"rank_{role}"] < self.k
            disp = df[f"displacement_{role}"].dropna()
            rows.append({
                "matcher": role, "queries": len(df),
                f"{self.reference} R@{self.k}": round(100 * ref_hit.mean(), 2), f"matcher R@{self.k}": round(100 * hit.mean(), 2),
                f"{self.reference} only": int((ref_hit & ~hit).sum()), "matcher only": int((~ref_hit & hit).sum()),
                f"mean top-{self.k} overlap": round(float(df[f"overlap_{role}"].mean()), 3),
                "median rank displacement": float(disp.median()) if len(disp) else float("nan"),
            })
        return pd.DataFrame(rows)

    def topk(self, role: str, query_index: int) -> list[str]:
        return self.rankings[role].topk[query_index]

    def overlap_figure(self):
        import plotly.graph_objects as go

        fig = go.Figure()
        for role in self.fast_roles:
            fig.add_trace(go.Histogram(x=self.per_query[f"overlap_{role}"], name=role, opacity=0.7,
                                       xbins=dict(start=-0.05, end=1.05, size=1 / self.k)))
        fig.update_layout(barmode="overlay", title=f"Top-{self.k} overlap with the {self.reference} (per caption query)",
                          xaxis_title=f"|{self.reference} top-{self.k} ∩ matcher top-{self.k}| / {self.k}",
                          yaxis_title="queries", template="plotly_white", height=360, margin=dict(t=50, b=40))
        fig.update_xaxes(range=[-0.05, 1.05])
        return fig

    def displacement_figure(self, clip: int = 50):
        import plotly.graph_objects as go

        fig = go.Figure()
        for role in self.fast_roles:
            disp = self.per_query[f"displacement_{role}"].dropna().clip(-clip, clip)
            fig.add_trace(go.Histogram(x=disp, name=role, opacity=0.7, xbins=dict(start=-clip - 0.5, end=clip + 0.5, size=1)))
        fig.update_layout(barmode="overlay", title=f"Rank displacement of the right image vs the {self.reference}",
                          xaxis_title=f"matcher rank − {self.reference} rank (>0: ranked lower; clipped to ±{clip})", yaxis_title="queries", yaxis_type="log",
                          template="plotly_white", height=360, margin=dict(t=50, b=40))
        fig.update_xaxes(range=[-clip - 1, clip + 1])
        return fig


def analyse(matchers: dict[str, Matcher], gallery: Gallery, k: int = 10, options: SearchOptions = SearchOptions(),
            reference: str = "teacher", limit: int | None = None, progress: Callable | None = None) -> ErrorAnalysis:
    """Error analysis of ``matchers`` (role -> matcher) on the gallery's captions."""
    if reference not in matchers:
        reference = next(iter(matchers))
    texts, owners = caption_queries(gallery, limit)
    if not texts:
        raise ValueError("this gallery has no captions, so there is nothing to analyse")
    rankings = {role: m.rank_captions(texts, owners, k, options, progress=progress) for role, m in matchers.items()}
    return ErrorAnalysis(k, reference, texts, owners, rankings)
