"""mkdocs hook: render the Sphinx roles of fpsolve's docstrings as code.

fpsolve's docstrings name other objects the Sphinx way (``:class:`~fpsolve.Solution```), which
Markdown renders as the literal role followed by code. This hook keeps just the code, shortened
as Sphinx would (a leading ``~`` keeps the last component only). It runs on the finished HTML of
every page, so it sees docstrings rendered by mkdocstrings too.
"""

from __future__ import annotations

import re
from typing import Any

_ROLE = re.compile(r":(?:class|func|meth|attr|mod|data|obj|exc):<code>(~?)([^<]+)</code>")


def _short(match: re.Match[str]) -> str:
    tilde, target = match.groups()
    return f"<code>{target.rsplit('.', 1)[-1] if tilde else target}</code>"


def on_page_content(html: str, **kwargs: Any) -> str:
    """Replace ``:role:<code>target</code>`` by ``<code>target</code>``."""
    return _ROLE.sub(_short, html)
