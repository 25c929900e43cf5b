"""The presentation layer: what every surface (the `kvscope summary` table, the HTML report, the dashboard, the
%kvscope magic and the notebook explorer) shows of a trace, described once.

- `kvscope.present.rows`: the summary rows (key, label, format), value formatting and the metadata rows. Light
  (no pandas, no plotly): the CLI imports it at start-up.
- `kvscope.present.views`: the catalog of views: key, label, title, caption, figure builder (kvscope.analysis ->
  kvscope.viz) and when a view applies to a trace, decided from what the trace contains.
- `kvscope.present.tables`: the summary rows as a DataFrame (notebooks, dashboard).
- `kvscope.present.notebook`: how a notebook displays traces (the %kvscope magic).

Surfaces lay these out; they compute no numbers and write no caption of their own.
"""
