"""The candidate report rendered twice from the same dict: Markdown, and one self-contained HTML page (inline CSS,
plots as inline SVG with text drawn as paths: no font, script, stylesheet or image is fetched from anywhere)."""

from __future__ import annotations

import io
from html import escape
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from tasks.report_speed import isa_label

SECTIONS = (("verdict", "Verdict"), ("comparison", "Challenger vs champion"), ("baselines", "Baselines"),
            ("export", "Export"), ("speed", "Speed and size"), ("lineage", "Lineage"),
            ("model-card", "Model card"))  # fmt: skip
LADDER_HEAD = ["rung", "macro-F1 %", "macro Δ pt", "worst class Δ pt", "batch-1 ms", "verdict"]


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}"


def _signed(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:+.{digits}f}"


def summary_lines(r: dict[str, Any]) -> list[str]:
    """The comparison in sentences (both renderings use them)."""
    c, h = r["comparison"], r["header"]
    metric = c["metric"]
    if c["champion"] is None:
        return [f"No champion to compare with: v{h['version']} {metric} {_pct(c['challenger'][metric])} on "
                f"{c['test_size']} test examples."]  # fmt: skip
    b, m = c["bootstrap"], c["mcnemar"]
    return [
        f"{metric}: challenger v{h['version']} {_pct(c['challenger'][metric])} vs champion v{h['champion_version']} "
        f"{_pct(c['champion'][metric])} on the same {c['test_size']} test examples.",
        f"Difference {_signed(100 * b['difference'])} pt, {b['confidence']:.0%} paired bootstrap CI "
        f"[{_signed(100 * b['low'])}, {_signed(100 * b['high'])}] pt ({b['n_resamples']} resamples).",
        f"McNemar ({'exact' if m['exact'] else 'chi-square'}): only the challenger right on "
        f"{m['challenger_only_right']}, only the champion on {m['champion_only_right']}; p = {m['p_value']:.3g}.",
        f"Significant at level {c['level']:g}: {'yes' if c['significant'] else 'no'}.",
    ]


def _md_table(head: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    return out + ["| " + " | ".join(str(x).replace("|", "\\|") for x in row) + " |" for row in rows]


def per_class_rows(r: dict[str, Any]) -> list[list[Any]]:
    return [[p["class"], p["support"], _pct(p["challenger_f1"]), _pct(p["champion_f1"]), _signed(p["delta_pt"])]
            for p in r["comparison"]["per_class"]]  # fmt: skip


def ladder_rows(r: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for rung in (r["export"].get("ladder") or {}).get("rungs", []):
        verdict = "ships" if rung.get("shipped") else rung.get("verdict", "")
        worst = f"{_signed(rung.get('worst_class_drop_pt'))} ({rung.get('worst_class') or '-'})"
        rows.append([rung["rung"], _pct(rung.get("macro_f1")), _signed(rung.get("macro_drop_pt")), worst,
                     rung.get("latency_b1_ms", "n/a"), verdict])  # fmt: skip
    return rows


def int8_class_rows(r: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """int8 vs fp32 per class: each rung's F1 drop (points) per class, from the bundle's ladder."""
    rungs = [g for g in (r["export"].get("ladder") or {}).get("rungs", []) if g.get("per_class_drop_pt")]
    classes = list(rungs[0]["per_class_drop_pt"]) if rungs else []
    return ["class", *(g["rung"] for g in rungs)], [[c, *(_signed(g["per_class_drop_pt"][c]) for g in rungs)]
                                                    for c in classes]  # fmt: skip


def latency_rows(r: dict[str, Any]) -> list[list[Any]]:
    isa = isa_label(r["speed"]["cpu"])
    return [[x["runtime"], x["batch"], x["p50_ms"], x["p95_ms"], isa] for x in r["speed"]["latency"]]


def baseline_rows(r: dict[str, Any]) -> list[list[Any]]:
    scores = r["baselines"].get("scores") or {}
    return [[name, _pct(m.get("accuracy")), _pct(m.get("macro_f1"))] for name, m in scores.items()]


def render_markdown(r: dict[str, Any]) -> str:
    h, e = r["header"], r["export"]
    out = [
        f"# Candidate report: {h['model']} v{h['version']} against {h['against']}",
        "",
        f"Built {h['built']} on data version `{h.get('data_version')}`; {h['test_size']} test examples.",
        "",
    ]
    out += ["## Verdict", ""] + [f"- `{v['name']}` {'PASS' if v['ok'] else 'FAIL'}: {v['detail']}"
                                 for v in r["verdict"]]  # fmt: skip
    out += ["", "## Challenger vs champion", ""] + [f"- {line}" for line in summary_lines(r)] + [""]
    out += _md_table(["class", "support", "challenger F1 %", "champion F1 %", "Δ pt"], per_class_rows(r))
    out += ["", "Normalised confusion matrices (rows: true class) are in report.json and report.html.", ""]
    b = r["baselines"]
    out += ["## Baselines", "", f"- baselines.passed: {b['passed']}; {b['detail'] or 'no baselines recorded'}"]
    if b.get("selected_stage"):
        out.append(f"- selected stage: {b['selected_stage'].get('name')}: {b['selected_stage'].get('why')}")
    table = _md_table(["baseline", "accuracy %", "macro-F1 %"], baseline_rows(r)) if baseline_rows(r) else []
    out += ["", *table, ""]
    parity, int8 = e.get("parity") or {}, e.get("int8") or {}
    out += ["## Export", "", f"- default model: `{e.get('default_model')}`; {int8.get('reason', '')}",
            f"- fp32 parity: max |Δlogit| {parity.get('fp32_max_abs_diff')}, argmax agreement "
            f"{parity.get('argmax_agreement')}, passed {parity.get('passed')}", ""]  # fmt: skip
    if ladder_rows(r):
        out += [*_md_table(LADDER_HEAD, ladder_rows(r)), ""]
    head, rows = int8_class_rows(r)
    if rows:
        out += ["int8 vs fp32, F1 drop per class (points):", "", *_md_table(head, rows), ""]
    out += ["## Speed and size", "", f"CPU: {isa_label(r['speed']['cpu'])}", ""]
    out += [*_md_table(["runtime", "batch", "p50 ms", "p95 ms", "CPU ISA"], latency_rows(r)), ""]
    out += [*_md_table(["file", "bytes"], [[s["file"], s["bytes"]] for s in r["speed"]["sizes"]]), ""]
    out += ["## Lineage", ""] + [f"- {k}: `{v}`" for k, v in r["lineage"].items() if k != "libraries"]
    out += [f"- libraries: {', '.join(f'{k} {v}' for k, v in r['lineage'].get('libraries', {}).items())}", ""]
    out += ["## Model card", "", r["model_card"].strip(), ""]
    return "\n".join(out) + "\n"


# --- plots: inline SVG -----------------------------------------------------------------------------------------


def _svg(fig: Any) -> str:
    buffer = io.StringIO()
    with plt.rc_context({"svg.fonttype": "path", "svg.hashsalt": "transflow"}):  # text as paths, stable ids
        fig.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)
    text = buffer.getvalue()
    return text[text.index("<svg") :]


def plot_confusions(r: dict[str, Any], classes: list[str]) -> str:
    c = r["comparison"]
    panels = [("challenger", c["challenger"]["confusion"])]
    if c["champion"]:
        panels.append(("champion", c["champion"]["confusion"]))
    size = max(3.0, 0.45 * len(classes) + 1.8)
    fig, axes = plt.subplots(1, len(panels), figsize=(size * len(panels), size), squeeze=False, layout="constrained")
    for ax, (title, matrix) in zip(axes[0], panels, strict=True):
        m = np.asarray(matrix)
        ax.imshow(m, cmap="Blues", vmin=0, vmax=1)
        ax.set(title=f"{title} (row-normalised)", xticks=range(len(classes)), yticks=range(len(classes)),
               xlabel="predicted", ylabel="true")  # fmt: skip
        ax.set_xticklabels(classes, rotation=45, ha="right", fontsize=8)
        ax.set_yticklabels(classes, fontsize=8)
        for (i, j), v in np.ndenumerate(m):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v > 0.5 else "black")
    return _svg(fig)


def plot_per_class(r: dict[str, Any]) -> str:
    rows = sorted(r["comparison"]["per_class"], key=lambda p: p["class"])
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(rows) + 2), 3))
    ax.bar(x - 0.2, [p["challenger_f1"] for p in rows], 0.4, label="challenger")
    if rows and rows[0]["champion_f1"] is not None:
        ax.bar(x + 0.2, [p["champion_f1"] for p in rows], 0.4, label="champion")
    ax.set_xticks(x, [p["class"] for p in rows], rotation=30, ha="right")
    ax.set(ylim=(0, 1), ylabel="test F1", title="per-class F1")
    ax.legend(fontsize=8, loc="lower right")
    return _svg(fig)


def plot_latency(r: dict[str, Any]) -> str:
    runtimes = list(dict.fromkeys(x["runtime"] for x in r["speed"]["latency"]))
    fig, axes = plt.subplots(1, 2, figsize=(8, 2.8), sharey=True, layout="constrained")
    for ax, batch in zip(axes, (1, 32), strict=True):
        rows = {x["runtime"]: x for x in r["speed"]["latency"] if x["batch"] == batch}
        p50 = [rows[n]["p50_ms"] if n in rows else 0 for n in runtimes]
        p95 = [rows[n]["p95_ms"] if n in rows else 0 for n in runtimes]
        ax.barh(runtimes, p50, label="p50")
        ax.scatter(p95, runtimes, marker="|", s=200, color="black", label="p95")
        ax.set(title=f"batch {batch}", xlabel="ms")
    axes[1].legend(fontsize=8, loc="lower right")
    fig.suptitle(isa_label(r["speed"]["cpu"]), fontsize=8)
    return _svg(fig)


# --- HTML ------------------------------------------------------------------------------------------------------

CSS = """body{font:14px/1.45 system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#f3f3f3}.pass{color:#176a1a;font-weight:600}.fail{color:#b00020;font-weight:600}
pre{background:#f7f7f7;padding:1em;white-space:pre-wrap}nav a{margin-right:1em}svg{max-width:100%;height:auto}
.neg{color:#b00020}.banner{padding:.6em 1em;border-radius:4px;font-size:1.1em}
.ok{background:#e6f4e6}.no{background:#fde8ea}"""


def _html_table(head: list[str], rows: list[list[Any]], classes: list[str] | None = None) -> str:
    th = "".join(f"<th>{escape(str(x))}</th>" for x in head)
    body = "".join(
        f"<tr{f' class={chr(34)}{classes[i]}{chr(34)}' if classes else ''}>"
        + "".join(f"<td>{escape(str(x))}</td>" for x in row) + "</tr>"
        for i, row in enumerate(rows)
    )  # fmt: skip
    return f"<table><tr>{th}</tr>{body}</table>"


def plots(r: dict[str, Any]) -> dict[str, str]:
    """Each plot once, as SVG text: inlined in the HTML and also written as files (MLflow shows them)."""
    classes = sorted(p["class"] for p in r["comparison"]["per_class"])
    return {"per_class_f1.svg": plot_per_class(r), "confusion.svg": plot_confusions(r, classes),
            "latency.svg": plot_latency(r)}  # fmt: skip


def render_html(r: dict[str, Any], svgs: dict[str, str] | None = None) -> str:
    svgs = svgs or plots(r)
    h, e, b = r["header"], r["export"], r["baselines"]
    passed = all(v["ok"] for v in r["verdict"])
    verdict = "".join(
        f'<li id="line-{escape(v["name"])}"><code>{escape(v["name"])}</code> <span class='
        f'"{"pass" if v["ok"] else "fail"}">{"PASS" if v["ok"] else "FAIL"}</span> {escape(v["detail"])}</li>'
        for v in r["verdict"]
    )
    parity, int8 = e.get("parity") or {}, e.get("int8") or {}
    stage = b.get("selected_stage") or {}
    parts = [
        f"<h1>Candidate report: {escape(h['model'])} v{escape(str(h['version']))} against {escape(h['against'])}</h1>",
        f"<p>Built {escape(h['built'])} · data version <code>{escape(str(h.get('data_version')))}</code> · "
        f"{h['test_size']} test examples · bundle <code>{escape(r['lineage']['bundle_sha256'])}</code></p>",
        "<nav>" + "".join(f'<a href="#{k}">{t}</a>' for k, t in SECTIONS) + "</nav>",
        f'<section id="verdict"><h2>Verdict</h2><p class="banner {"ok" if passed else "no"}">'
        f"{'Every gate line passes' if passed else 'At least one gate line fails'}</p><ul>{verdict}</ul></section>",
        '<section id="comparison"><h2>Challenger vs champion</h2><ul>'
        + "".join(f"<li>{escape(s)}</li>" for s in summary_lines(r)) + "</ul>"
        + _html_table(["class", "support", "challenger F1 %", "champion F1 %", "Δ pt"], per_class_rows(r))
        + svgs["per_class_f1.svg"] + svgs["confusion.svg"] + "</section>",
        '<section id="baselines"><h2>Baselines</h2>'
        f"<p>baselines.passed: <b>{escape(str(b['passed']))}</b>; {escape(b['detail'] or 'no baselines recorded')}</p>"
        + (f"<p>Selected stage {escape(str(stage.get('name')))}: {escape(str(stage.get('why')))}</p>" if stage else "")
        + (_html_table(["baseline", "accuracy %", "macro-F1 %"], baseline_rows(r)) if baseline_rows(r) else "")
        + "</section>",
        f'<section id="export"><h2>Export</h2><p>Ships <code>{escape(str(e.get("default_model")))}</code>: '
        f"{escape(str(int8.get('reason', '')))}</p><p>fp32 parity: max |Δlogit| "
        f"{escape(str(parity.get('fp32_max_abs_diff')))}, argmax agreement "
        f"{escape(str(parity.get('argmax_agreement')))}, passed {escape(str(parity.get('passed')))}</p>"
        + (_html_table(LADDER_HEAD, ladder_rows(r)) if ladder_rows(r) else "")
        + (f"<p>int8 vs fp32, F1 drop per class (points):</p>{_html_table(*int8_class_rows(r))}"
           if int8_class_rows(r)[1] else "") + "</section>",
        f'<section id="speed"><h2>Speed and size</h2><p>CPU: {escape(isa_label(r["speed"]["cpu"]))}</p>'
        + _html_table(["runtime", "batch", "p50 ms", "p95 ms", "CPU ISA"], latency_rows(r)) + svgs["latency.svg"]
        + _html_table(["file", "bytes"], [[s["file"], s["bytes"]] for s in r["speed"]["sizes"]]) + "</section>",
        '<section id="lineage"><h2>Lineage</h2>'
        + _html_table(["", ""], [[k, v] for k, v in r["lineage"].items() if k != "libraries"])
        + _html_table(["library", "version"], list((r["lineage"].get("libraries") or {}).items())) + "</section>",
        f'<section id="model-card"><h2>Model card</h2><pre>{escape(r["model_card"])}</pre></section>',
    ]  # fmt: skip
    title = f"{h['model']} v{h['version']} candidate report"
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f"<style>{CSS}</style></head><body>{''.join(parts)}</body></html>\n")  # fmt: skip
