"""Plot the Grafana dashboard's panels from a real Prometheus: every panel's queries, as Grafana would
draw them, into one PNG (matplotlib), for machines without Grafana and for the README's picture.

    .venv/bin/python tools/plot_dashboard.py --prometheus http://localhost:9090 --minutes 15 \
        --out build/monitoring/dashboard.png

Each query runs through Prometheus's range API with Grafana's `$__rate_interval` replaced by
`--rate-interval`. A panel whose queries return nothing is drawn empty, titled "no data".
"""

from __future__ import annotations

import argparse
import json
import math
import time
import urllib.parse
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "dashboards" / "llmserve.json"


def panel_queries(dashboard: dict, rate_interval: str) -> list[tuple[str, list[tuple[str, str]]]]:
    """[(panel title, [(PromQL, legend format)])] of every graph panel, `$__rate_interval` filled in."""
    return [(panel["title"], [(t["expr"].replace("$__rate_interval", rate_interval), t.get("legendFormat", ""))
                              for t in panel["targets"]])
            for panel in dashboard["panels"] if panel["type"] != "row"]


def query_range(prometheus: str, expr: str, start: float, end: float, step: float) -> list[dict]:
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    with urllib.request.urlopen(f"{prometheus}/api/v1/query_range?{params}", timeout=30) as response:
        body = json.load(response)
    if body["status"] != "success":
        raise RuntimeError(f"{expr}: {body.get('error')}")
    return body["data"]["result"]


def legend(fmt: str, labels: dict[str, str]) -> str:
    for key, value in labels.items():
        fmt = fmt.replace("{{" + key + "}}", value)
    return fmt or json.dumps(labels)


def plot(prometheus: str, out: Path, minutes: float, rate_interval: str, end: float | None = None) -> int:
    """Write the PNG; the number of panels with data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dashboard = json.loads(DASHBOARD.read_text())
    panels = panel_queries(dashboard, rate_interval)
    end = end or time.time()
    start = end - minutes * 60
    step = max(1.0, minutes * 60 / 240)
    columns = 4
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.2 * rows), squeeze=False)
    with_data = 0
    for ax, (title, queries) in zip(axes.flat, panels):
        drawn = False
        for expr, fmt in queries:
            for series in query_range(prometheus, expr, start, end, step):
                points = [(float(t), float(v)) for t, v in series["values"] if math.isfinite(float(v))]
                if points:
                    ax.plot([(t - end) / 60 for t, _ in points], [v for _, v in points], linewidth=1,
                            label=legend(fmt, series["metric"]))
                    drawn = True
        with_data += drawn
        ax.set_xlim(-minutes, 0)
        ax.set_title(title if drawn else f"{title} (no data)", fontsize=9)
        ax.set_xlabel("minutes", fontsize=8)
        ax.tick_params(labelsize=7)
        if drawn:
            ax.legend(fontsize=6, loc="upper left")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    figure.suptitle(dashboard["title"], fontsize=12)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=90)
    plt.close(figure)
    return with_data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prometheus", default="http://localhost:9090")
    parser.add_argument("--minutes", type=float, default=15.0, help="the time range")
    parser.add_argument("--end", type=float, default=None, help="its end (Unix seconds; default now)")
    parser.add_argument("--rate-interval", default="1m", help="what Grafana's $__rate_interval becomes")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "build" / "monitoring" / "dashboard.png")
    args = parser.parse_args()
    with_data = plot(args.prometheus.rstrip("/"), args.out, args.minutes, args.rate_interval, args.end)
    print(f"{args.out}: {with_data} panels with data")


if __name__ == "__main__":
    main()
