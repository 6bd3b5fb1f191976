"""Render ``audit.json`` content as a self-contained ``report.html`` (inline PNG plots, no external URLs)."""
from __future__ import annotations

import base64
import io
import math
from importlib import resources

POP_COLOURS = {"input": "#7f7f7f", "curated": "#1f77b4", "rejected": "#d62728"}


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _fmt_pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f} %"


def _fmt_ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _share(counts: dict[str, int], total: int) -> dict[str, float]:
    return {k: v / total for k, v in counts.items()} if total else {k: 0.0 for k in counts}


#: how the ratio chart draws each kind of group (bar colour, hatch, edge; marker face)
RATIO_STYLES = {
    "in_band": {"label": "inside the band", "color": "#1f77b4", "hatch": None, "edge": "#1f77b4", "face": "#1f77b4"},
    "flagged": {"label": "flagged (outside the band)", "color": "#d62728", "hatch": None, "edge": "#d62728",
                "face": "#d62728"},
    "small": {"label": "outside the band, too few rows to flag", "color": "#d9d9d9", "hatch": "///",
              "edge": "#7f7f7f", "face": "white"},
}


def group_status(g: dict, cfg: dict) -> str | None:
    """How the ratio chart shows a group: ``flagged``, ``small`` (its ratio is outside the band but it
    has fewer than ``min_group_rows`` input rows), ``in_band``; None without a ratio."""
    r = g["representation_ratio"]
    if r is None:
        return None
    if g["flagged"]:
        return "flagged"
    if r < cfg["ratio_low"] or r > cfg["ratio_high"]:
        return "small"
    return "in_band"


def small_out_of_band(audit: dict) -> list[str]:
    """``attribute: group`` of the groups outside the band that are too small to be flagged."""
    return [f"{a['label']}: {gname}" for a in audit["attributes"].values() for gname, g in a["groups"].items()
            if group_status(g, audit["config"]) == "small"]


def plot_ratios(audit: dict) -> str | None:
    plt = _plt()
    from matplotlib.patches import Patch

    cfg = audit["config"]
    labels, values, kinds = [], [], []
    for aname, a in audit["attributes"].items():
        for gname, g in a["groups"].items():
            kind = group_status(g, cfg)
            if kind is None:
                continue
            labels.append(f"{a['label']}: {gname}")
            values.append(g["representation_ratio"])
            kinds.append(kind)
    if not values:
        return None
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(values) + 1.6))
    y = list(range(len(values)))
    ax.axvspan(cfg["ratio_low"], cfg["ratio_high"], color="#2ca02c", alpha=0.12)
    for kind, style in RATIO_STYLES.items():
        idx = [i for i, k in enumerate(kinds) if k == kind]
        if not idx:
            continue
        ax.barh(idx, [values[i] for i in idx], color=style["color"], hatch=style["hatch"],
                edgecolor=style["edge"], linewidth=0.8)
        ax.scatter([values[i] for i in idx], idx, marker="D", s=22, zorder=3,  # visible even at ratio 0
                   facecolors=style["face"], edgecolors=style["edge"])
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("representation ratio = share in curated / share in input")
    ax.set_xlim(0, max(2.0, max(values) * 1.1))
    handles = [Patch(facecolor="#2ca02c", alpha=0.12, label=f"accepted band [{cfg['ratio_low']}, {cfg['ratio_high']}]")]
    handles += [Patch(facecolor=st["color"], hatch=st["hatch"], edgecolor=st["edge"],
                      label=st["label"] + (f" (< {cfg['min_group_rows']} input rows)" if k == "small" else ""))
                for k, st in RATIO_STYLES.items()]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.12 - 0.4 / max(len(values), 1)),
              ncol=2, fontsize=8, frameon=False)
    return _png(fig)


def plot_categories(audit: dict, field: str, title: str, top: int = 12) -> str | None:
    """Grouped bars: share of each category in input / curated / rejected."""
    plt = _plt()
    pops = audit["populations"]
    if field == "language":
        counts = {p: pops[p]["language"] for p in pops}
    else:
        counts = {p: {d["domain"]: d["rows"] for d in pops[p]["domains"]["top"]} for p in pops}
    cats = list(counts["input"])[:top]
    if not cats:
        return None
    fig, ax = plt.subplots(figsize=(8, 3.2))
    width = 0.27
    for i, p in enumerate(("input", "curated", "rejected")):
        share = _share(counts[p], pops[p]["rows"])
        ax.bar([j + (i - 1) * width for j in range(len(cats))], [share.get(c, 0.0) for c in cats], width,
               label=p, color=POP_COLOURS[p])
    ax.set_xticks(range(len(cats)))
    ax.set_xticklabels(cats, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("share of rows")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return _png(fig)


def _edge_labels(edges: list[float], fmt: str, step: float | None = None) -> list[str]:
    """Bin labels; with ``step`` every bin is closed (``lo–lo+step``), else the last one is open."""
    out = []
    for i, lo in enumerate(edges):
        if i < len(edges) - 1:
            out.append(f"{lo:{fmt}}–{edges[i + 1]:{fmt}}")
        else:
            out.append(f"{lo:{fmt}}–{lo + step:{fmt}}" if step else f"≥{lo:{fmt}}")
    return out


def _clip_step(bins: dict) -> float:
    """Width of the clip_score bins (audit.json ``bins.clip_score_step``; older files: the edges' spacing)."""
    edges = bins["clip_score"]
    return bins.get("clip_score_step") or (edges[1] - edges[0] if len(edges) > 1 else 0.025)


def plot_histograms(audit: dict) -> str:
    plt = _plt()
    pops = audit["populations"]
    bins = audit["bins"]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, key, edges, fmt, title, step in (
            (axes[0], "size_hist", bins["size"], "g", "shorter image side (px)", None),
            (axes[1], "aspect_hist", bins["aspect"], ".2g", "aspect ratio (width / height)", None),
            (axes[2], "clip_score_hist", bins["clip_score"], ".3g", "clip_score", _clip_step(bins))):
        labels = _edge_labels(edges, fmt, step)
        width = 0.27
        for i, p in enumerate(("input", "curated", "rejected")):
            share = [v / pops[p]["rows"] if pops[p]["rows"] else 0 for v in pops[p][key]]
            ax.bar([j + (i - 1) * width for j in range(len(labels))], share, width, label=p, color=POP_COLOURS[p])
        step = max(1, len(labels) // 10)
        ax.set_xticks(range(0, len(labels), step))
        ax.set_xticklabels(labels[::step], rotation=40, ha="right", fontsize=7)
        ax.set_title(title, fontsize=10)
    axes[0].set_ylabel("share of rows")
    axes[0].legend(fontsize=8)
    return _png(fig)


def plot_group_clip_scores(audit: dict, aname: str) -> str | None:
    """clip_score distribution of each group's input rows (curated + rejected), one line per group."""
    plt = _plt()
    a = audit["attributes"][aname]
    edges = audit["bins"]["clip_score"]
    centres = [e + _clip_step(audit["bins"]) / 2 for e in edges]
    fig, ax = plt.subplots(figsize=(8, 3))
    drawn = 0
    for gname, g in a["groups"].items():
        hist = g["clip_score"]["input"]["hist"]
        n = sum(hist)
        if not n:
            continue
        ax.plot(centres, [h / n for h in hist], marker=".", label=f"{gname} (n={n})")
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("clip_score")
    ax.set_ylabel("share of the group's rows")
    ax.set_title(f"clip_score by group: {a['label']}", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    return _png(fig)


def summary_sentences(audit: dict) -> list[str]:
    """Plain-language lines about the flagged groups (and the overall outcome)."""
    t = audit["totals"]
    cfg = audit["config"]
    lines = [f"The input had {t['input']:,} rows; {t['curated']:,} were kept "
             f"({_fmt_pct(t['curated'] / t['input'] if t['input'] else None)}) and {t['rejected']:,} rejected."]
    small = small_out_of_band(audit)
    small_line = (f"{len(small)} group(s) outside the band have fewer than {cfg['min_group_rows']} input rows, too "
                  f"few to flag: {', '.join(small)}." if small else None)
    if not audit["flagged"]:
        if small_line:
            lines.append(f"No group is flagged. {small_line}")
        else:
            lines.append(f"No group's representation ratio left the band [{cfg['ratio_low']}, {cfg['ratio_high']}] "
                         f"(groups with fewer than {cfg['min_group_rows']} input rows are not flagged).")
        return lines
    for f in audit["flagged"]:
        word = "under-represented" if f["direction"] == "under" else "over-represented"
        reasons = ", ".join(f"{r} ({n})" for r, n in f["top_rejection_reasons"]) or "none recorded"
        lines.append(
            f"“{f['group']}” ({f['attribute_label']}) is {word} in the curated set: "
            f"{_fmt_pct(f['share_input'])} of input rows but {_fmt_pct(f['share_curated'])} of curated rows "
            f"(ratio {_fmt_ratio(f['representation_ratio'])}, {f['input_rows']} input rows, basis: "
            f"{f['basis'].replace('_', ' ')}). Most common rejection reasons for this group: {reasons}.")
    if small_line:
        lines.append(small_line)
    return lines


def render_report(audit: dict) -> str:
    """The HTML report for ``audit`` (the dict written to audit.json)."""
    import jinja2

    plots = {
        "ratios": plot_ratios(audit),
        "languages": plot_categories(audit, "language", "caption language"),
        "domains": plot_categories(audit, "domains", "top registered domains"),
        "histograms": plot_histograms(audit),
        "group_clip": {a: plot_group_clip_scores(audit, a) for a in audit["attributes"]},
    }
    all_reasons = sorted({r for a in audit["attributes"].values() for g in a["groups"].values()
                          for r in g["rejection_reasons"]})
    template_text = resources.files("clip_curate.data").joinpath("report.html.j2").read_text("utf-8")
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    env.filters["pct"] = _fmt_pct
    env.filters["ratio"] = _fmt_ratio
    template = env.from_string(template_text)
    return template.render(audit=audit, plots=plots, summary=summary_sentences(audit),
                           all_reasons=all_reasons, isnan=math.isnan, small_groups=small_out_of_band(audit))
