"""What every self-contained HTML page kvscope writes is made with (the report, the sweep page): one Jinja
environment over kvscope/templates, figures handed to the template as plotly's own JSON, and plotly.js inlined, so
a page needs no network to be read."""

from __future__ import annotations

import json
from typing import Any

import jinja2
import plotly.graph_objects as go
from markupsafe import Markup
from plotly.offline import get_plotlyjs


def _json_dumps(obj: Any, **kwargs: Any) -> str:
    """Jinja's tojson serializer: a plotly figure as plotly's own JSON (typed arrays as base64), anything else as
    plain JSON. tojson then escapes <, >, & and ' for the HTML page."""
    if isinstance(obj, go.Figure):
        return obj.to_json()
    return json.dumps(obj, **kwargs)


def template(name: str) -> jinja2.Template:
    """A template of kvscope/templates: autoescaped, strict about undefined names, figures through tojson."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("kvscope", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.policies["json.dumps_function"] = _json_dumps
    return env.get_template(name)


def plotly_js() -> Markup:
    """plotly's own bundle, the same text plotly's write_html(include_plotlyjs=True) inlines."""
    return Markup(get_plotlyjs())
