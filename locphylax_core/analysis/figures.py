"""Figures: pure functions from stored arrays to plotly figures, plus the table behind each.

Every ``*_figure`` function takes plain arrays / rows (what ``analysis.json`` and the run folder
hold) and returns a ``plotly.graph_objects.Figure``; every ``*_table`` returns the data behind it
as a ``pandas.DataFrame``. :func:`export` writes a figure as standalone HTML and its table as CSV.
Nothing here computes an analysis or touches a model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

GROUP_COLORS = {"clean": ["#4C78A8", "#72B7B2", "#54A24B", "#B279A2"], "unknown": "#E45756",
                "known:t1": "#F58518", "known:t2": "#EECA3B", "known": "#9D755D"}
STAGE_TITLES = {"victim": "victim", "stage1": "after Stage 1", "stage2": "after Stage 2 (Locphylax)"}


def _group_color(group: str, clean_order: list[str]) -> str:
    if group.startswith("clean:"):
        return GROUP_COLORS["clean"][clean_order.index(group) % len(GROUP_COLORS["clean"])]
    return GROUP_COLORS.get(group, GROUP_COLORS["known"])


def stage_title(key: str) -> str:
    if key in STAGE_TITLES:
        return STAGE_TITLES[key]
    method, _, stage = key.partition("/")
    return f"{method} ({stage})"


# ----------------------------------------------------------------------------------------------
# Projection scatter, one frame per stage


def projection_table(coords: Mapping[str, np.ndarray], probe: Sequence[dict],
                     preds: Mapping[str, np.ndarray], label_words: Sequence[str]) -> pd.DataFrame:
    rows = []
    for stage, xy in coords.items():
        pred = preds.get(stage)
        for i, (row, (x, y)) in enumerate(zip(probe, np.asarray(xy))):
            rows.append({"stage": stage, "index": i, "x": float(x), "y": float(y), "group": row["group"],
                         "label": label_words[row["label"]], "text": row["text"],
                         "answer": label_words[int(pred[i])] if pred is not None else None})
    return pd.DataFrame(rows)


def projection_figure(coords: Mapping[str, np.ndarray], probe: Sequence[dict], preds: Mapping[str, np.ndarray],
                      label_words: Sequence[str], method: str = "tsne", groups: Sequence[str] | None = None,
                      active: str | None = None) -> go.Figure:
    """Scatter of the probe set, one frame per stage with a slider and a play button. Hover shows
    the input text, its group and the model's answer. ``groups`` limits the groups drawn;
    ``active`` is the stage shown first (default: the first)."""
    df = projection_table(coords, probe, preds, label_words)
    if groups is not None:
        df = df[df["group"].isin(list(groups))]
    order = list(dict.fromkeys(r["group"] for r in probe))
    clean_order = [g for g in order if g.startswith("clean:")]
    stages = list(coords)

    def traces(stage):
        sub = df[df["stage"] == stage]
        out = []
        for g in order:
            part = sub[sub["group"] == g]
            out.append(go.Scatter(
                x=part["x"], y=part["y"], mode="markers", name=g,
                marker=dict(size=7, color=_group_color(g, clean_order), opacity=0.8,
                            symbol="circle" if g.startswith("clean:") else "diamond"),
                customdata=np.stack([part["text"], part["group"], part["answer"].fillna("?")], axis=-1)
                if len(part) else None,
                hovertemplate="%{customdata[0]}<br>group: %{customdata[1]}<br>answer: %{customdata[2]}<extra></extra>"))
        return out

    first = stages.index(active) if active in stages else 0
    fig = go.Figure(data=traces(stages[first]), frames=[go.Frame(data=traces(s), name=s) for s in stages])
    pad = 0.05 * max(1e-9, float(np.ptp(df["x"])) if len(df) else 1.0)
    fig.update_layout(
        title=f"Probe-set hidden states ({method.upper()}, aligned across stages)",
        xaxis=dict(range=[df["x"].min() - pad, df["x"].max() + pad] if len(df) else None, title=f"{method}-1"),
        yaxis=dict(range=[df["y"].min() - pad, df["y"].max() + pad] if len(df) else None, title=f"{method}-2"),
        legend_title="group", template="plotly_white",
        sliders=[dict(active=first, currentvalue=dict(prefix="stage: "), steps=[
            dict(label=stage_title(s), method="animate",
                 args=[[s], dict(mode="immediate", frame=dict(duration=0, redraw=True), transition=dict(duration=0))])
            for s in stages])],
        updatemenus=[dict(type="buttons", showactive=False, x=0.0, y=-0.15, buttons=[
            dict(label="Play", method="animate",
                 args=[None, dict(frame=dict(duration=900, redraw=True), fromcurrent=True)])])])
    return fig


def projection_grid_figure(panels: Mapping[str, tuple[Mapping[str, np.ndarray], Sequence[dict]]],
                           stages: Sequence[str] = ("victim", "stage1", "stage2"), method: str = "tsne",
                           title: str | None = None) -> go.Figure:
    """One row per model (``panels``: row title -> (coords per stage, probe rows)), one column per
    stage: the same probe groups in the same colours, so two models' stages can be read side by
    side (e.g. a victim fine-tuned from the pretrained base against one trained from scratch)."""
    rows = list(panels)
    fig = make_subplots(rows=len(rows), cols=len(stages), horizontal_spacing=0.04, vertical_spacing=0.1,
                        subplot_titles=[f"{r}: {stage_title(s)}" for r in rows for s in stages])
    shown: set[str] = set()
    for i, row in enumerate(rows, 1):
        coords, probe = panels[row]
        order = list(dict.fromkeys(p["group"] for p in probe))
        clean_order = [g for g in order if g.startswith("clean:")]
        groups = np.array([p["group"] for p in probe])
        for j, stage in enumerate(stages, 1):
            if stage not in coords:
                continue
            xy = np.asarray(coords[stage])
            for g in order:
                sel = groups == g
                fig.add_trace(go.Scatter(x=xy[sel, 0], y=xy[sel, 1], mode="markers", name=g, legendgroup=g,
                                         showlegend=g not in shown, marker=dict(
                                             size=8, color=_group_color(g, clean_order), opacity=0.8,
                                             symbol="circle" if g.startswith("clean:") else "diamond")), i, j)
                shown.add(g)
            fig.update_xaxes(showticklabels=False, row=i, col=j)
            fig.update_yaxes(showticklabels=False, row=i, col=j)
    fig.update_layout(title=title or f"Probe-set hidden states ({method.upper()}) per stage", template="plotly_white",
                      legend_title="group", height=380 * len(rows) + 90, width=1200, font=dict(size=19))
    fig.update_annotations(font_size=19)  # the panel titles
    return fig


# ----------------------------------------------------------------------------------------------
# Head-ablation heatmaps


def head_table(arrays: Mapping[str, np.ndarray]) -> pd.DataFrame:
    rows = []
    for name, arr in arrays.items():
        arr = np.asarray(arr)
        for layer in range(arr.shape[0]):
            for head in range(arr.shape[1]):
                rows.append({"panel": name, "layer": layer, "head": head, "value": float(arr[layer, head])})
    return pd.DataFrame(rows)


def head_heatmaps(before: np.ndarray, after: np.ndarray, before_name: str = "victim", after_name: str = "stage2",
                  quantity: str = "ΔASR (unknown)") -> go.Figure:
    """Before / after / difference heatmaps of a ``[layer, head]`` array, on one diverging scale
    centred at 0 (the difference gets its own, also centred)."""
    before, after = np.asarray(before, float), np.asarray(after, float)
    diff = after - before
    # NaN marks an undefined cell (no eligible input); it is drawn blank and ignored by the scale
    lim = float(max(np.nanmax(np.abs(before), initial=0), np.nanmax(np.abs(after), initial=0), 1e-9))
    dlim = float(max(np.nanmax(np.abs(diff), initial=0), 1e-9))
    fig = make_subplots(rows=1, cols=3, subplot_titles=(stage_title(before_name), stage_title(after_name),
                                                        "difference (after - before)"), horizontal_spacing=0.08)
    for col, (arr, zlim, show) in enumerate([(before, lim, False), (after, lim, True), (diff, dlim, True)], 1):
        fig.add_trace(go.Heatmap(
            z=arr, colorscale="RdBu_r", zmid=0, zmin=-zlim, zmax=zlim,
            x=[f"h{h}" for h in range(arr.shape[1])], y=[f"L{layer}" for layer in range(arr.shape[0])],
            hovertemplate="layer %{y}, head %{x}<br>" + quantity + ": %{z:.3f}<extra></extra>",
            showscale=show, colorbar=dict(x=1.0 if col == 3 else 0.63, len=0.9)), row=1, col=col)
    fig.update_layout(title=f"Head ablation (uniform attention): {quantity}", template="plotly_white")
    fig.update_yaxes(autorange="reversed")
    return fig


# ----------------------------------------------------------------------------------------------
# Curves over steps, with stage boundaries


CURVE_STAGES = ["clean", "victim", "stage1", "stage2"]


def curve_table(rows: Sequence[dict], method: str = "locphylax") -> pd.DataFrame:
    """metrics.jsonl rows of one method's path (clean -> victim -> stage1 -> stage2) on a global
    step axis. Curve rows come from the in-stage subset; the final test rows are kept apart."""
    prefix = "" if method == "locphylax" else f"{method}/"
    keys = {"clean": "clean", "victim": "victim", "stage1": f"{prefix}stage1", "stage2": f"{prefix}stage2"}
    out, offset = [], 0
    for stage in CURVE_STAGES:
        sel = [r for r in rows if r.get("key") == keys[stage]]
        if not sel:
            continue
        for r in sel:
            base = {"method": method, "stage": stage, "step": r["step"], "global_step": offset + r["step"],
                    "split": r["split"], "cacc": r["cacc"]}
            base.update({f"asr_{k}": v for k, v in r["asr"].items()})
            out.append(base)
        offset += max(r["step"] for r in sel)
    return pd.DataFrame(out)


def curves_figure(rows: Sequence[dict], methods: Sequence[str] = ("locphylax",)) -> go.Figure:
    """ASR (unknown, known) and CACC against the global step, a dotted line at each stage start."""
    fig = go.Figure()
    dashes = ["solid", "dash", "dot", "dashdot"]
    boundaries: dict[float, str] = {}
    for m_i, method in enumerate(methods):
        df = curve_table(rows, method)
        if df.empty:
            continue
        curve = df[df["split"] == "curve"]
        asr_cols = [c for c in df.columns if c.startswith("asr_")]
        for c_i, col in enumerate(["cacc", *asr_cols]):
            name = "CACC" if col == "cacc" else "ASR " + col[4:]
            fig.add_trace(go.Scatter(x=curve["global_step"], y=curve[col], mode="lines+markers",
                                     name=f"{name} ({method})" if len(methods) > 1 else name,
                                     line=dict(dash=dashes[m_i % len(dashes)]), legendgroup=method))
        for stage in CURVE_STAGES[1:]:
            part = df[df["stage"] == stage]
            if len(part):
                boundaries.setdefault(float(part["global_step"].min() - part["step"].min()), stage)
    for x, stage in boundaries.items():
        fig.add_vline(x=x, line_dash="dot", line_color="grey", annotation_text=stage, annotation_position="top")
    fig.update_layout(title="ASR and clean accuracy over training steps", xaxis_title="step (all stages)",
                      yaxis=dict(title="rate", range=[-0.02, 1.02]), template="plotly_white")
    return fig


# ----------------------------------------------------------------------------------------------
# CASD matrix


def casd_table(labels: Sequence[str], matrix: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame(np.asarray(matrix, float), index=list(labels), columns=list(labels))


def casd_figure(labels: Sequence[str], matrix: np.ndarray, metric: str = "cosine") -> go.Figure:
    m = np.asarray(matrix, float)
    fig = go.Figure(go.Heatmap(z=m, x=list(labels), y=list(labels), colorscale="Viridis", zmin=0,
                               text=np.round(m, 3), texttemplate="%{text}",
                               hovertemplate="%{y} vs %{x}: %{z:.3f}<extra></extra>"))
    fig.update_layout(title=f"CASD between trainings ({metric} distance of activation shifts from the victim)",
                      template="plotly_white")
    fig.update_yaxes(autorange="reversed")
    return fig


# ----------------------------------------------------------------------------------------------


def export(fig: go.Figure, table: pd.DataFrame, stem: str | Path) -> tuple[Path, Path]:
    """Write ``<stem>.html`` (standalone: plotly.js inlined, opens offline) and ``<stem>.csv``."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    html, csv = stem.with_suffix(".html"), stem.with_suffix(".csv")
    fig.write_html(str(html), include_plotlyjs=True, full_html=True)
    table.to_csv(csv, index=not isinstance(table.index, pd.RangeIndex))
    return html, csv
