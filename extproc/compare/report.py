"""The report as text, JSON and one static HTML file; one request side by side (pure)."""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from typing import Any

from .judge import Comparison
from .summary import TargetSummary


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


def report_data(summaries: Sequence[TargetSummary], generated_at: str) -> dict[str, Any]:
    return {"generated_at": generated_at, "targets": [s.as_dict() for s in summaries]}


def render_text(summaries: Sequence[TargetSummary]) -> str:
    if not summaries:
        return "nothing compared yet\n"
    lines = []
    for s in summaries:
        role = " (secondary: its differences are the noise)" if s.is_secondary else ""
        lines.append(f"{s.rule} -> {s.target}{role}")
        results = ", ".join(f"{k} {v}" for k, v in s.results.items())
        lines.append(f"  compared {s.compared}, matched {_pct(s.matched_share)} (identical {_pct(s.identical_share)}); {results}")
        for side in ("primary", "shadow"):
            lat = s.latency_ms[side]
            lines.append(f"  {side:7} latency ms: p50 {_ms(lat['p50'])}  p90 {_ms(lat['p90'])}  p99 {_ms(lat['p99'])}")
        pairs = ", ".join(f"{p or '-'}->{sh or '-'} x{n}" for p, sh, n in s.status_pairs)
        lines.append(f"  status (primary->shadow): {pairs}")
        if s.fields:
            lines.append(f"  {'field':40} {'rate':>7} {'noise':>7}  verdict  examples")
            for f in s.fields:
                verdict = "noise" if not f.real else "REAL"
                lines.append(f"  {f.path:40} {_pct(f.rate):>7} {_pct(f.noise_rate):>7}  {verdict:7}  {', '.join(f.examples)}")
        lines.append("")
    return "\n".join(lines)


def render_show(request_id: str, comparisons: Sequence[Comparison]) -> str:
    if not comparisons:
        return f"no comparison for request {request_id} (not mirrored, not compared, not yet joined, or past retention)\n"
    lines = [f"request {request_id}: {comparisons[0].method} {comparisons[0].path}"]
    for c in comparisons:
        lines.append(f"  {c.rule} -> {c.target}: {c.result.value}")
        lines.append(f"    {'':12} {'primary':>24} {'shadow':>24}")
        lines.append(f"    {'status':12} {c.primary_status or '-':>24} {c.shadow_status or '-':>24}")
        lines.append(f"    {'latency ms':12} {_ms(c.primary_ms):>24} {_ms(c.shadow_ms):>24}")
        for f in c.fields:
            lines.append(f"  * {f['path']:12} {f.get('primary', '(not stored)'):>24} {f.get('shadow', '(not stored)'):>24}")
    return "\n".join(lines) + "\n"


def show_data(request_id: str, comparisons: Sequence[Comparison]) -> dict[str, Any]:
    return {
        "request_id": request_id,
        "comparisons": [
            {
                "rule": c.rule,
                "target": c.target,
                "result": c.result.value,
                "method": c.method,
                "path": c.path,
                "status": {"primary": c.primary_status, "shadow": c.shadow_status},
                "latency_ms": {"primary": c.primary_ms, "shadow": c.shadow_ms},
                "differing_fields": list(c.fields),
            }
            for c in comparisons
        ],
    }


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>mirror-sampler: shadow comparison</title>
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.1em; margin-top: 2em; }
table { border-collapse: collapse; margin: .5em 0; } td, th { padding: .2em .7em; border-bottom: 1px solid #ddd; text-align: left; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
tr.real td { background: #fde2e1; } tr.noise td { color: #777; }
.empty { color: #777; }
</style></head>
<body>
<h1>Shadow comparison</h1>
<p>Generated __GENERATED__. A field is <b>real</b> when the target differs on it more often than the secondary
(the primary's own code) does, by more than the margin; otherwise it is noise.</p>
<div id="report" class="empty">Nothing compared yet.</div>
<script type="application/json" id="data">__DATA__</script>
<script>
"use strict";
const data = JSON.parse(document.getElementById("data").textContent);
const pct = x => x === null ? "-" : (100 * x).toFixed(1) + "%";
const ms = x => x === null ? "-" : Math.round(x).toString();
function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}
function table(head, rows) {
  const t = el("table", {}, el("tr", {}, ...head.map(h => el("th", {}, h))));
  for (const r of rows) t.append(r);
  return t;
}
const root = document.getElementById("report");
if (data.targets.length) { root.textContent = ""; root.className = ""; }
for (const t of data.targets) {
  const section = el("section", {"data-rule": t.rule, "data-target": t.target});
  section.append(el("h2", {}, t.rule + " \\u2192 " + t.target + (t.secondary ? " (secondary)" : "")));
  section.append(el("p", {"class": "summary"}, "compared " + t.compared + ", matched " + pct(t.matched_share) +
    " (identical " + pct(t.identical_share) + "); " +
    Object.entries(t.results).map(([k, v]) => k + " " + v).join(", ")));
  section.append(table(["field", "rate", "noise rate", "verdict", "examples"], t.fields.map(f =>
    el("tr", {"class": f.real ? "real" : "noise", "data-path": f.path},
      el("td", {}, f.path), el("td", {"class": "n"}, pct(f.rate)), el("td", {"class": "n"}, pct(f.noise_rate)),
      el("td", {}, f.real ? "real" : "noise"), el("td", {}, f.examples.join(", "))))));
  section.append(table(["primary status", "shadow status", "count"], t.status_pairs.map(p =>
    el("tr", {}, el("td", {}, p.primary ?? "-"), el("td", {}, p.shadow ?? "-"), el("td", {"class": "n"}, p.count)))));
  section.append(table(["latency ms", "p50", "p90", "p99"], ["primary", "shadow"].map(side =>
    el("tr", {}, el("td", {}, side), ...["p50", "p90", "p99"].map(p => el("td", {"class": "n"}, ms(t.latency_ms[side][p])))))));
  root.append(section);
}
</script>
</body></html>
"""


def render_html(data: dict[str, Any]) -> str:
    """One file, no server, nothing fetched: the data is embedded, the page draws it."""
    # "<" occurs only inside JSON strings: as \u003c no text can close the script element.
    embedded = json.dumps(data, ensure_ascii=True).replace("<", "\\u003c")
    return _PAGE.replace("__GENERATED__", html.escape(str(data["generated_at"]))).replace("__DATA__", embedded)
