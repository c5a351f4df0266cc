"""Figures: pure functions from stored arrays to plotly figures, plus the table behind each.

Every ``*_figure`` function takes plain arrays / rows (what ``analysis.json`` and the run folder
hold) and returns a ``plotly.graph_objects.Figure``; every ``*_table`` returns the data behind it
as a ``pandas.DataFrame``. :func:`export` writes a figure as standalone HTML and its table as CSV.
Nothing here computes an analysis or touches a model.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..registry import DEFENSES, LOCPHYLAX, stage_key

GROUP_COLORS = {"clean": ["#4C78A8", "#72B7B2", "#54A24B", "#B279A2"], "unknown": "#E45756",
                "known:t1": "#F58518", "known:t2": "#EECA3B", "known": "#9D755D"}
READABLE_FONT = 15  # px: the layer figures' text, legible on a projected page (plotly's default is 12)
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


def _point_data(part: pd.DataFrame):
    if not len(part):
        return None
    return np.stack([part["text"], part["group"], part["answer"].fillna("?"), part["index"].astype(object)], axis=-1)


def _stage_short(key: str) -> str:
    """A stage's name for one tick of the slider under an animated plot: nine of them must fit side
    by side, so the method goes on one line and the stage on the next."""
    short = {"victim": "victim", "stage1": "Stage 1", "stage2": "Stage 2"}
    if key in short:
        return short[key]
    method, _, stage = key.partition("/")
    return f"{method}<br>{short.get(stage, stage)}"


def projection_figure(coords: Mapping[str, np.ndarray], probe: Sequence[dict], preds: Mapping[str, np.ndarray],
                      label_words: Sequence[str], method: str = "tsne", groups: Sequence[str] | None = None,
                      active: str | None = None, animate: bool | None = None,
                      marked: Sequence[int] | None = None, title: str | None = None) -> go.Figure:
    """Scatter of the probe set at stage ``active`` (default: the first). Hover shows the input
    text, its group and the model's answer; ``groups`` limits the groups drawn. The axis ranges
    cover every stage, so points keep their place when the stage changes. Each point's
    ``customdata`` is ``[text, group, answer, probe index]``, so a selection names its inputs;
    ``marked`` (probe indices, e.g. a text search's hits) are ringed in black on top, in their own
    legend entry. ``title`` replaces the default title (the method and stage).

    ``animate`` (default: when there is more than one stage) adds one frame per stage, a slider and
    Play / Pause under the plot, and the title names the stage shown. A page that picks the stage
    with its own control passes ``animate=False``: the figure then cannot drift from that control."""
    hover = "%{customdata[0]}<br>group: %{customdata[1]}<br>answer: %{customdata[2]}<extra></extra>"
    df = projection_table(coords, probe, preds, label_words)
    if groups is not None:
        df = df[df["group"].isin(list(groups))]
    order = list(dict.fromkeys(r["group"] for r in probe))
    clean_order = [g for g in order if g.startswith("clean:")]
    stages = list(coords)
    animate = len(stages) > 1 if animate is None else animate

    def traces(stage):
        sub = df[df["stage"] == stage]
        out = []
        for g in order:
            part = sub[sub["group"] == g]
            out.append(go.Scatter(
                x=part["x"], y=part["y"], mode="markers", name=g,
                marker=dict(size=7, color=_group_color(g, clean_order), opacity=0.8,
                            symbol="circle" if g.startswith("clean:") else "diamond"),
                customdata=_point_data(part), hovertemplate=hover))
        if marked is not None:
            part = sub[sub["index"].isin([int(i) for i in marked])]
            out.append(go.Scatter(
                x=part["x"], y=part["y"], mode="markers", name=f"found ({len(part)})",
                marker=dict(size=12, color="rgba(0,0,0,0)", line=dict(color="black", width=1.5)),
                customdata=_point_data(part), hovertemplate=hover))
        return out

    def heading(stage):
        return title or f"Hidden states ({method.upper()}): {stage_title(stage)}"

    first = stages.index(active) if active in stages else 0
    pad = 0.05 * max(1e-9, float(np.ptp(df["x"])) if len(df) else 1.0)
    layout = dict(
        title=heading(stages[first]),
        xaxis=dict(range=[df["x"].min() - pad, df["x"].max() + pad] if len(df) else None, title=f"{method.upper()} 1"),
        yaxis=dict(range=[df["y"].min() - pad, df["y"].max() + pad] if len(df) else None, title=f"{method.upper()} 2"),
        legend_title="group", template="plotly_white")
    if not animate:
        return go.Figure(data=traces(stages[first]), layout=layout)
    # each frame also sets the title, so the stage shown is named in full above the plot while the
    # slider's ticks stay short
    fig = go.Figure(data=traces(stages[first]),
                    frames=[go.Frame(data=traces(s), name=s, layout=dict(title_text=heading(s))) for s in stages])
    step_args = dict(mode="immediate", frame=dict(duration=0, redraw=True), transition=dict(duration=0))
    fig.update_layout(
        **layout,
        # the slider and the buttons sit below the x-axis title (pad), in room kept for them (margin)
        margin=dict(b=170),
        sliders=[dict(active=first, x=0.14, len=0.86, y=0, yanchor="top", pad=dict(t=70, b=10),
                      currentvalue=dict(visible=False),
                      steps=[dict(label=_stage_short(s), method="animate", args=[[s], step_args]) for s in stages])],
        updatemenus=[dict(type="buttons", direction="left", showactive=False, x=0.13, xanchor="right", y=0,
                          yanchor="top", pad=dict(t=78, r=10), buttons=[
                              dict(label="▶ Play", method="animate",
                                   args=[None, dict(frame=dict(duration=900, redraw=True), fromcurrent=True)]),
                              dict(label="❚❚", method="animate", args=[[None], step_args])])])
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


def _points_text(arr: np.ndarray) -> np.ndarray:
    """Cell labels: the value in points (percentage points of the rate), blank where undefined."""
    def one(v: float) -> str:
        if not np.isfinite(v):
            return ""
        return "0" if abs(100 * v) < 0.5 else f"{100 * v:+.0f}"
    return np.vectorize(one, otypes=[object])(arr)


def _points_ticks(zlim: float) -> dict:
    """Colour-bar ticks in points, for a scale stored as a fraction (one tick at 0 when every value
    is 0, so the bar does not repeat "0")."""
    if 100 * zlim < 0.05:
        return dict(tickvals=[0.0], ticktext=["0"])
    digits = 0 if 100 * zlim >= 2 else 1
    vals = np.linspace(-zlim, zlim, 5)
    text = ["0" if i == 2 else f"{100 * v:+.{digits}f}" for i, v in enumerate(vals)]  # the middle one is 0
    return dict(tickvals=vals.tolist(), ticktext=text)


def head_heatmaps(before: np.ndarray, after: np.ndarray, before_name: str = "victim", after_name: str = "stage2",
                  quantity: str = "ΔASR (unknown)", pickable: bool = False,
                  highlight: tuple[int, int] | None = None) -> go.Figure:
    """Before / after / difference heatmaps of a ``[layer, head]`` array, on one diverging scale
    centred at 0 (the difference gets its own, also centred). Each cell prints its value in points.

    The colour bars lie under the panels, one shared by before and after and one for the
    difference, so that no bar covers a neighbouring panel's labels. ``pickable`` adds an invisible
    marker at the centre of every cell (plotly selects markers, not heatmap cells) whose
    ``customdata`` starts with ``[layer, head]``, for a page that lets a click pick a head: the
    nearest marker takes the hover and the click, so a click anywhere in a cell picks it.
    ``highlight`` (layer, head) outlines that cell in all three panels."""
    before, after = np.asarray(before, float), np.asarray(after, float)
    diff = after - before
    # NaN marks an undefined cell (no eligible input); it is drawn blank and ignored by the scale
    lim = float(max(np.nanmax(np.abs(before), initial=0), np.nanmax(np.abs(after), initial=0), 1e-9))
    dlim = float(max(np.nanmax(np.abs(diff), initial=0), 1e-9))
    fig = make_subplots(rows=1, cols=3, subplot_titles=(stage_title(before_name), stage_title(after_name),
                                                        "difference (after - before)"), horizontal_spacing=0.06)
    n_layers, n_heads = before.shape
    xs, ys = [f"h{h}" for h in range(n_heads)], [f"L{layer}" for layer in range(n_layers)]
    domains = [fig.layout[f"xaxis{'' if c == 1 else c}"].domain for c in (1, 2, 3)]
    bar_y = -0.2  # under the head labels of the x axes
    shared_bar = dict(orientation="h", x=(domains[0][0] + domains[1][1]) / 2, xanchor="center",
                      len=domains[1][1] - domains[0][0], y=bar_y, yanchor="top", thickness=14,
                      title=dict(text=f"{quantity}, points (before and after)", side="top"), **_points_ticks(lim))
    diff_bar = dict(orientation="h", x=sum(domains[2]) / 2, xanchor="center", len=domains[2][1] - domains[2][0],
                    y=bar_y, yanchor="top", thickness=14, title=dict(text="difference, points", side="top"),
                    **_points_ticks(dlim))
    for col, (arr, zlim, bar) in enumerate([(before, lim, shared_bar), (after, lim, None), (diff, dlim, diff_bar)], 1):
        fig.add_trace(go.Heatmap(
            z=arr, colorscale="RdBu_r", zmid=0, zmin=-zlim, zmax=zlim, x=xs, y=ys,
            text=_points_text(arr), texttemplate="%{text}", customdata=100 * arr,
            hovertemplate="layer %{y}, head %{x}<br>" + quantity + ": %{customdata:+.1f} points<extra></extra>",
            hoverinfo="skip" if pickable else None,  # the cell's marker says it instead
            showscale=bar is not None, colorbar=bar), row=1, col=col)
    if pickable:
        cells = [(layer, head) for layer in range(n_layers) for head in range(n_heads)]
        for col, arr in zip((1, 2, 3), (before, after, diff)):
            fig.add_trace(go.Scatter(
                x=[xs[h] for _, h in cells], y=[ys[layer] for layer, _ in cells], mode="markers",
                customdata=[[layer, head, 100 * arr[layer, head]] for layer, head in cells], showlegend=False,
                marker=dict(symbol="square", size=18, color="rgba(0,0,0,0)"),
                hovertemplate="layer L%{customdata[0]}, head h%{customdata[1]}<br>" + quantity
                + ": %{customdata[2]:+.1f} points<br>click to show this head<extra></extra>"),
                row=1, col=col)
    if highlight is not None:
        layer, head = highlight
        for col in (1, 2, 3):
            fig.add_shape(type="rect", x0=head - 0.5, x1=head + 0.5, y0=layer - 0.5, y1=layer + 0.5,
                          line=dict(color="black", width=3), row=1, col=col)
    fig.update_layout(title=f"Head ablation (uniform attention): {quantity}", template="plotly_white",
                      # r: room for the half of the difference bar's last tick label past the plot
                      # (a theme without a right margin, such as Streamlit's, would cut it off)
                      margin=dict(b=120, r=48), hoverdistance=-1 if pickable else None)
    fig.update_yaxes(autorange="reversed")
    return fig


# ----------------------------------------------------------------------------------------------
# Curves over steps, with stage boundaries


CURVE_STAGES = ["clean", "victim", "stage1", "stage2"]


def curve_table(rows: Sequence[dict], method: str = LOCPHYLAX) -> pd.DataFrame:
    """metrics.jsonl rows of one method's path (clean -> victim -> stage1 -> stage2) on a global
    step axis. Curve rows come from the in-stage subset; the final test rows are kept apart."""
    keys = {"clean": "clean", "victim": "victim", "stage1": stage_key(method, "stage1"),
            "stage2": stage_key(method, "stage2")}
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


# One colour per quantity, whatever the method (CACC blue and the hidden trigger's ASR red, as the
# Live demo's captions say); methods differ by dash.
QUANTITY_COLORS = {"cacc": "#4C78A8", "asr_unknown": "#E45756", "asr_t1": "#F58518", "asr_t2": "#B8860B"}
EXTRA_COLORS = ["#54A24B", "#B279A2", "#9D755D", "#72B7B2"]
METHOD_DASHES = ["solid", "dash", "dot", "dashdot", "longdash", "longdashdot"]
SHARED_STAGES = ("clean", "victim")  # every method's path starts with the same clean model and victim


def _quantity_name(col: str) -> str:
    return "CACC" if col == "cacc" else "ASR " + col[4:]


def curves_figure(rows: Sequence[dict], methods: Sequence[str] = (LOCPHYLAX,)) -> go.Figure:
    """ASR (unknown, known) and CACC against the global step, a dotted line at each stage start.

    Each quantity keeps one colour whatever the method. With several methods, the clean and victim
    part that they all share is drawn once, and each method's own stages continue from the victim's
    last point in that method's dash; the legend then lists the colours (quantities) and the dashes
    (methods, a click shows or hides one method's lines)."""
    fig = go.Figure()
    tables = {m: curve_table(rows, m) for m in methods}
    tables = {m: df for m, df in tables.items() if not df.empty}
    several = len(tables) > 1
    quantities: list[str] = []
    for df in tables.values():
        quantities += [c for c in ["cacc", *[c for c in df.columns if c.startswith("asr_")]] if c not in quantities]
    others = [q for q in quantities if q not in QUANTITY_COLORS]  # a trigger beyond t1 / t2
    colors = {q: QUANTITY_COLORS.get(q) or EXTRA_COLORS[others.index(q) % len(EXTRA_COLORS)] for q in quantities}

    def line(part: pd.DataFrame, col: str, name: str, dash: str, **kw) -> go.Scatter:
        return go.Scatter(x=part["global_step"], y=part[col], mode="lines+markers", name=name,
                          line=dict(color=colors[col], dash=dash), marker=dict(color=colors[col]), **kw)

    boundaries: dict[float, str] = {}
    shared_drawn = False
    for m_i, (method, df) in enumerate(tables.items()):
        curve = df[df["split"] == "curve"]
        cols = [c for c in quantities if c in df.columns]
        if not several:  # one method: one line per quantity over the whole path
            for col in cols:
                fig.add_trace(line(curve, col, _quantity_name(col), METHOD_DASHES[0]))
        else:
            shared = curve[curve["stage"].isin(SHARED_STAGES)]
            own = curve[~curve["stage"].isin(SHARED_STAGES)]
            if not shared_drawn and len(shared):
                for q_i, col in enumerate(cols):
                    fig.add_trace(line(shared, col, _quantity_name(col), "solid", legendgroup=f"quantity-{col}",
                                       legendgrouptitle_text="colour: quantity" if q_i == 0 else None))
                shared_drawn = True
            if len(shared) and len(own):  # branch off the victim's last point
                own = pd.concat([shared[shared["global_step"] == shared["global_step"].max()], own])
            label = DEFENSES.label(method)
            dash = METHOD_DASHES[m_i % len(METHOD_DASHES)]
            # the method's legend entry: its dash in grey; a click on it toggles the whole group
            fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", name=label, legendgroup=method,
                                     line=dict(color="grey", dash=dash),
                                     legendgrouptitle_text="line: method" if m_i == 0 else None))
            for col in cols:
                fig.add_trace(line(own, col, f"{_quantity_name(col)} ({label})", dash, legendgroup=method,
                                   showlegend=False))
        for stage in CURVE_STAGES[1:]:
            part = df[df["stage"] == stage]
            if len(part):  # a stage of no steps (a shipped victim) starts where the next one does: the next names it
                boundaries[float(part["global_step"].min() - part["step"].min())] = stage
    for x, stage in boundaries.items():
        fig.add_vline(x=x, line_dash="dot", line_color="grey", annotation_text=stage, annotation_position="top")
    fig.update_layout(title="ASR and clean accuracy over training steps", xaxis_title="step (all stages)",
                      yaxis=dict(title="rate", range=[-0.02, 1.02]), template="plotly_white")
    return fig


# ----------------------------------------------------------------------------------------------
# CASD matrix


def casd_table(labels: Sequence[str], matrix: np.ndarray) -> pd.DataFrame:
    """The CASD matrix with the trainings as row and column labels; the index is named, so the CSV's
    first column has a header."""
    table = pd.DataFrame(np.asarray(matrix, float), index=list(labels), columns=list(labels))
    table.index.name = "training"
    return table


def casd_figure(labels: Sequence[str], matrix: np.ndarray, metric: str = "cosine") -> go.Figure:
    m = np.asarray(matrix, float)
    fig = go.Figure(go.Heatmap(z=m, x=list(labels), y=list(labels), colorscale="Viridis", zmin=0,
                               text=np.round(m, 2), texttemplate="%{text}", colorbar=dict(title="CASD"),
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
    fig.write_html(str(html), include_plotlyjs=True, full_html=True, auto_play=False)  # an animation starts on its first stage
    table.to_csv(csv, index=not isinstance(table.index, pd.RangeIndex))
    return html, csv


# ----------------------------------------------------------------------------------------------
# Layer analyses: logit lens, patching maps, attention patterns, salience


LENS_LINES = (("target_triggered", "target answer, triggered inputs", "#E45756", "solid"),
              ("correct_triggered", "correct answer, triggered inputs", "#4C78A8", "solid"),
              ("target_clean", "target answer, clean inputs", "#E45756", "dot"),
              ("correct_clean", "correct answer, clean inputs", "#4C78A8", "dot"))


def logit_lens_table(lens: Mapping[str, Mapping]) -> pd.DataFrame:
    rows = []
    for stage, r in lens.items():
        for key, *_ in LENS_LINES:
            for layer, v in enumerate(np.asarray(r[key], float)):
                rows.append({"stage": stage, "layer": layer, "quantity": key, "probability": float(v)})
    return pd.DataFrame(rows)


def logit_lens_figure(lens: Mapping[str, Mapping]) -> go.Figure:
    """One panel per stage: after each block, the probability of the attacker's target answer and
    of the correct answer, on triggered (solid) and clean (dotted) probe inputs. ``lens``:
    ``{stage: {target_triggered, correct_triggered, target_clean, correct_clean: [layer]}}``."""
    stages = list(lens)
    fig = make_subplots(rows=1, cols=max(1, len(stages)), subplot_titles=[stage_title(s) for s in stages],
                        shared_yaxes=True, horizontal_spacing=0.04)
    for col, stage in enumerate(stages, 1):
        for key, name, color, dash in LENS_LINES:
            y = np.asarray(lens[stage][key], float)
            fig.add_trace(go.Scatter(x=np.arange(len(y)), y=y, mode="lines+markers", name=name, legendgroup=key,
                                     showlegend=col == 1, line=dict(color=color, dash=dash),
                                     hovertemplate=f"{stage_title(stage)}<br>after block %{{x}}<br>{name}: "
                                                   "%{y:.3f}<extra></extra>"), row=1, col=col)
        fig.update_xaxes(title_text="after block", dtick=1, row=1, col=col)
    fig.update_yaxes(range=[0, 1], title_text="probability (whole vocabulary)", row=1, col=1)
    fig.update_layout(title="Logit lens: where the answer appears", template="plotly_white", height=460,
                      font=dict(size=READABLE_FONT), legend=dict(orientation="h", y=-0.3))
    return fig


def patching_table(arrays: Mapping[str, np.ndarray], x_labels: Sequence[str]) -> pd.DataFrame:
    rows = []
    for name, arr in arrays.items():
        arr = np.asarray(arr, float)
        for layer in range(arr.shape[0]):
            for j in range(arr.shape[1]):
                rows.append({"panel": name, "layer": layer, "site": x_labels[j], "restoration": float(arr[layer, j])})
    return pd.DataFrame(rows)


def patching_heatmaps(before: np.ndarray, after: np.ndarray, before_name: str = "victim", after_name: str = "stage2",
                      x_labels: Sequence[str] | None = None, quantity: str = "restoration") -> go.Figure:
    """Before / after / difference maps of an activation-patching array ``[layer, site]`` (sites:
    token roles for the residual stream, heads for head outputs). 1 = patching that site restores
    the clean answer fully, 0 = not at all; NaN (a role no input has) is blank."""
    before, after = np.asarray(before, float), np.asarray(after, float)
    diff = after - before
    lim = float(max(np.nanmax(np.abs(before), initial=0), np.nanmax(np.abs(after), initial=0), 1e-9))
    dlim = float(max(np.nanmax(np.abs(diff), initial=0), 1e-9))
    n_layers, n_sites = before.shape
    xs = list(x_labels) if x_labels is not None else [f"h{h}" for h in range(n_sites)]
    ys = [f"L{layer}" for layer in range(n_layers)]
    fig = make_subplots(rows=1, cols=3, subplot_titles=(stage_title(before_name), stage_title(after_name),
                                                        "difference (after - before)"), horizontal_spacing=0.06)
    for col, (arr, zlim, show) in enumerate([(before, lim, True), (after, lim, False), (diff, dlim, True)], 1):
        text = np.vectorize(lambda v: "" if not np.isfinite(v) else f"{v:.2f}", otypes=[object])(arr)
        fig.add_trace(go.Heatmap(z=arr, x=xs, y=ys, colorscale="RdBu_r", zmid=0, zmin=-zlim, zmax=zlim, text=text,
                                 texttemplate="%{text}", showscale=show,
                                 # below the x tick labels (token roles are long and drawn slanted)
                                 colorbar=dict(orientation="h", y=-0.42, yanchor="top", x=0.33 if col == 1 else 0.87,
                                               len=0.3, thickness=14),
                                 hovertemplate="layer %{y}, %{x}<br>" + quantity + ": %{z:.3f}<extra></extra>"),
                      row=1, col=col)
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(title=f"Activation patching (clean into triggered): {quantity}", template="plotly_white",
                      margin=dict(b=190), height=540, font=dict(size=READABLE_FONT))
    return fig


def attention_figure(pattern: np.ndarray, tokens: Sequence[str], layer: int = 0,
                     heads: Sequence[int] | None = None) -> go.Figure:
    """The attention pattern ``[head, query, key]`` of one layer on one input, one panel per head."""
    pattern = np.asarray(pattern, float)
    heads = list(range(pattern.shape[0])) if heads is None else [int(h) for h in heads]
    labels = [f"{i}:{t}" for i, t in enumerate(tokens)]
    fig = make_subplots(rows=1, cols=len(heads), subplot_titles=[f"L{layer} h{h}" for h in heads],
                        horizontal_spacing=0.03)
    for col, h in enumerate(heads, 1):
        fig.add_trace(go.Heatmap(z=pattern[h], x=labels, y=labels, colorscale="Blues", zmin=0, zmax=1,
                                 showscale=col == len(heads),
                                 hovertemplate="query %{y}<br>key %{x}<br>weight %{z:.3f}<extra></extra>"),
                      row=1, col=col)
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(title=f"Attention patterns, layer {layer}", template="plotly_white", height=460,
                      font=dict(size=READABLE_FONT))
    return fig


# What Markdown (CommonMark, GitHub's extensions, Streamlit's :color[...] and $math$) or HTML could
# read as markup, written as numeric character references: a reference is always literal text, so it
# shows as the character and never opens a link, an image, a format or a tag
# (a "]" alone opens nothing, and an "_" between two letters or digits neither: foo_bar stays)
_MARKUP = {ord(c): f"&#{ord(c)};" for c in "&<>\\`*[|~$@"}
# GitHub's bare www. and scheme:// links, and the "(" of a link's target
_AUTOLINK = re.compile(r"(?i)(?<=www)\.|(?<=[a-z]):(?=//)|(?<=\])\(")
_EMPHASIS = re.compile(r"(?<![^\W_])_|_(?![^\W_])")  # an underscore that could open or close emphasis
_BLOCK_START = re.compile(r"^(\s*)([-+=#>]|\d+[.)])")  # a list, heading or quote marker opening a block


def markup_safe(text) -> str:
    """``text`` (typed by a user, read from a link or from a run's files) as Markdown and HTML that
    show it as it is: in ``st.markdown`` (with or without HTML), a caption, an alert, a table cell
    or a label, ``![i](http://host/x.png)`` is those characters, not an image fetched from that host."""
    s = _AUTOLINK.sub(lambda m: f"&#{ord(m[0])};", _EMPHASIS.sub("&#95;", str(text).translate(_MARKUP)))
    return _BLOCK_START.sub(lambda m: m[1] + "".join(f"&#{ord(c)};" for c in m[2]), s)


def _token_text(tok: str) -> str:
    return tok.replace("Ġ", " ").replace("▁", " ").replace("Ċ", " ")


def salience_html(tokens: Sequence[str], scores: Sequence[float], in_text: Sequence[bool]) -> str:
    """The input's tokens as HTML spans coloured by salience (red: pushes toward the answer
    attributed, blue: away; opacity by |score| relative to the largest), template tokens omitted; a
    token's text is never read as markup (:func:`markup_safe`)."""
    scores = np.asarray(scores, float)
    mask = np.asarray(in_text, bool)
    scale = float(np.max(np.abs(scores[mask]), initial=0.0)) or 1.0
    parts = []
    for tok, s, inside in zip(tokens, scores, mask):
        if not inside:
            continue
        a = min(1.0, abs(s) / scale)
        rgb = "228,87,86" if s > 0 else "76,120,168"
        parts.append(f'<span title="{s:+.3f}" style="background: rgba({rgb},{a:.2f}); padding: 1px 0;">'
                     f"{markup_safe(_token_text(str(tok)))}</span>")
    return "".join(parts)
