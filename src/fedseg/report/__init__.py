"""A finished study's report: figures, tables rendered once for Markdown and HTML, report.md and report.html."""
