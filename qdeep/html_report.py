"""One self-contained HTML page per run (`OUT/report.html`): every picture embedded as a data URI, no
script and no network, so the file opens anywhere, mails as one attachment and shows in MLflow's
artifact view. Jinja2 templates (HTML autoescaped); one function per command: DeepCluster, ladder, tune.
"""

from __future__ import annotations

import base64
from pathlib import Path

from qdeep import io

STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;line-height:1.4}
h1{font-size:1.6em}h2{margin-top:1.6em;border-bottom:1px solid #ddd}h3{margin:.2em 0}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}th{background:#f3f3f3}
img{max-width:100%}.plots img{max-width:49%;vertical-align:top}
.group{border:1px solid #ccc;border-radius:6px;padding:.8em 1em;margin:1em 0}
.cols{display:flex;gap:1.2em;flex-wrap:wrap}.cols>div{flex:1;min-width:300px}
.words{font-size:1.1em;font-style:italic;color:#345}.swatch{display:inline-block;width:1em;height:1em;
border:1px solid #999;vertical-align:middle;margin-right:.3em}.best{font-weight:bold;background:#eef6ee}
dl{display:grid;grid-template-columns:max-content auto;gap:0 1em;font-size:.85em}dt{color:#666}
"""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title><style>{{ style|safe }}</style></head>
<body><h1>{{ title }}</h1>{% block body %}{% endblock %}
<h2>Settings</h2><dl>{% for k, v in settings.items() %}<dt>{{ k }}</dt><dd>{{ v }}</dd>{% endfor %}</dl>
</body></html>"""

DEEPCLUSTER = """{% extends "page" %}{% block body %}
<p>{{ n_images }} images, {{ groups|length }} groups.{% if final.nmi_true is defined %} Against the given classes:
NMI {{ "%.3f"|format(final.nmi_true) }}, ARI {{ "%.3f"|format(final.ari_true) }},
purity {{ "%.3f"|format(final.purity_true) }}.{% endif %}</p>
<h2>Iterations</h2>
{% if iterations %}<table><tr><th>iteration</th><th>clustering score</th><th>train acc</th><th>ctrl acc</th>
<th>NMI(t-1, t)</th><th>NMI (truth)</th><th>seconds</th></tr>
{% for h in iterations %}<tr><td>{{ h.iteration }}</td><td>{{ "%.4f"|format(h.score) }}</td>
<td>{{ "%.3f"|format(h.train_acc) }}</td><td>{{ "%.3f"|format(h.ctrl_acc) }}</td>
<td>{{ "%.3f"|format(h.nmi_prev) if h.nmi_prev is not none else "" }}</td>
<td>{{ "%.3f"|format(h.nmi_true) if h.nmi_true is defined else "" }}</td><td>{{ h.seconds }}</td></tr>{% endfor %}
</table>{% else %}<p>No iteration: the groups come from the starting network.</p>{% endif %}
<div class="plots">{% for alt, src in plots %}<img alt="{{ alt }}" src="{{ src }}">{% endfor %}</div>
<h2>Groups</h2>
{% for g in groups %}<section class="group" id="group-{{ g.group }}">
<h3>Group {{ g.group }}: {{ g.size }} images</h3><p class="words">{{ g.words }}</p>
<div class="cols"><div><img alt="group {{ g.group }} members" src="{{ g.grid }}"></div><div>
<img alt="group {{ g.group }} palette" src="{{ g.swatch }}">
<p>{% for c in g.palette %}<span class="swatch" style="background:{{ c.hex }}"></span>{{ c.hex }}
{{ "%.0f"|format(100 * c.share) }}%&nbsp; {% endfor %}</p>
<table><tr><th>feature</th><th>median</th><th>spread (IQR)</th><th>z vs collection</th></tr>
{% for f in features %}<tr><td>{{ f }}</td><td>{{ "%.3g"|format(g.median[f]) }}</td><td>{{ "%.3g"|format(g.spread[f]) }}</td>
<td>{{ "%+.2f"|format(g.z[f]) }}</td></tr>{% endfor %}</table>
{% if g.saliency is defined %}<p>Where the last network sees pseudo-class {{ g.target }} in the most central members:</p>
<img alt="group {{ g.group }} saliency" src="{{ g.saliency }}">{% endif %}
</div></div></section>{% endfor %}
{% endblock %}"""

LADDER = """{% extends "page" %}{% block body %}
<p>{{ metric }} on one held-out split; every rung scored the same way (per-label {{ prefix }} below).</p>
<h2>Rungs</h2><table><tr><th>rung</th><th>{{ metric }}</th></tr>
{% for rung, r in results.items() %}<tr{% if rung == best %} class="best"{% endif %}><td>{{ rung }}</td>
<td>{{ "%.4f"|format(r.score) }}</td></tr>{% endfor %}</table>
<div class="plots">{% for alt, src in plots %}<img alt="{{ alt }}" src="{{ src }}">{% endfor %}</div>
<h2>Per label</h2><table><tr><th>label</th>{% for rung in results %}<th>{{ rung }}</th>{% endfor %}<th>winner</th></tr>
{% for t in vocab %}<tr><td>{{ t }}</td>{% for rung, r in results.items() %}
<td{% if rung == winners[t] %} class="best"{% endif %}>{{ "%.3f"|format(r.per_label.get(t, 0.0)) }}</td>{% endfor %}
<td>{{ winners[t] }}</td></tr>{% endfor %}</table>
{% endblock %}"""

TUNE = """{% extends "page" %}{% block body %}
{% if rows %}<p>Best: <b>{{ rows[0].arch }}</b>, weights {{ rows[0].weights }}, freeze {{ rows[0].freeze }},
lr {{ "%g"|format(rows[0].lr) }}: {{ metric }} {{ "%.4f"|format(rows[0][metric]) }}.</p>{% endif %}
<h2>Trials</h2><table><tr><th>rank</th><th>trial</th><th>arch</th><th>weights</th><th>freeze</th><th>lr</th>
<th>{{ metric }}</th><th>epochs</th><th>status</th><th>seconds</th></tr>
{% for r in rows %}<tr{% if loop.first %} class="best"{% endif %}><td>{{ loop.index }}</td><td>{{ r.trial_id }}</td>
<td>{{ r.arch }}</td><td>{{ r.weights }}</td><td>{{ r.freeze }}</td><td>{{ "%g"|format(r.lr) }}</td>
<td>{{ "%.4f"|format(r[metric]) }}</td><td>{{ r.epochs }}</td><td>{{ r.status }}</td><td>{{ r.seconds }}</td></tr>{% endfor %}
</table><div class="plots">{% for alt, src in plots %}<img alt="{{ alt }}" src="{{ src }}">{% endfor %}</div>
{% endblock %}"""


def data_uri(path: str | Path) -> str:
    """A PNG file as a `data:` URI, to embed in the page."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _render(template: str, path: str | Path, **context) -> Path:
    from jinja2 import DictLoader, Environment, StrictUndefined, select_autoescape

    env = Environment(loader=DictLoader({"page": PAGE, "body": template}), autoescape=select_autoescape(default=True),
                      undefined=StrictUndefined)
    context.setdefault("settings", {})
    io.write_text(path, env.get_template("body").render(style=STYLE, **context))
    return Path(path)


def _plots(folder: Path, names: dict[str, str]) -> list[tuple[str, str]]:
    return [(alt, data_uri(folder / name)) for name, alt in names.items() if (folder / name).exists()]


def deepcluster_report(folder: Path, metrics: dict, groups: list[dict], features: list[str], settings: dict,
                       title: str = "DeepCluster") -> Path:
    """`folder`/report.html from a finished run's metrics.json content and its `groups`, one dict per
    group: a `profiles.GroupProfile.to_dict()` plus the PNG paths `grid`, `swatch` and (optional) `saliency`
    and its `target` pseudo-class."""
    shown = [{**g, **{k: data_uri(g[k]) for k in ("grid", "swatch", "saliency") if g.get(k)}} for g in groups]
    return _render(DEEPCLUSTER, folder / "report.html", title=title, settings=settings, features=features,
                   iterations=metrics.get("iterations", []), final=metrics.get("final", {}),
                   n_images=metrics.get("n_images"), groups=shown,
                   plots=_plots(folder, {"curves.png": "per-iteration curves", "sizes.png": "group sizes"}))


def ladder_report(folder: Path, results: dict[str, dict], vocab: list[str], winners: dict[str, str], metric: str,
                  prefix: str, settings: dict) -> Path:
    """`folder`/report.html for `qdeep ladder`: the rungs, per-label scores and winners, the plots."""
    best = max(results, key=lambda r: results[r]["score"]) if results else None
    return _render(LADDER, folder / "report.html", title="Experiment ladder", settings=settings, results=results,
                   vocab=vocab, winners=winners, metric=metric, prefix=prefix, best=best,
                   plots=_plots(folder, {"ladder.png": "score per rung", "per_label.png": "per-label scores"}))


def tune_report(folder: Path, rows: list[dict], metric: str, settings: dict) -> Path:
    """`folder`/report.html for `qdeep tune`: the trials best first, the plots."""
    return _render(TUNE, folder / "report.html", title="Sweep", settings=settings, rows=rows, metric=metric,
                   plots=_plots(folder, {"ladder.png": "best score per arch and freeze depth",
                                         "per_label.png": "per-label scores of every trial"}))
