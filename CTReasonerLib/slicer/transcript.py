"""The chat transcript as HTML for a ``QTextBrowser``: messages, full reasoning, and links to what was created.

Links use the ``ctreasoner:`` scheme so the Widget can tell them from web links:
``ctreasoner:segment/<segmentation node id>/<segment id>`` and ``ctreasoner:node/<node id>``.
Pure Python: tested without Qt.
"""
from __future__ import annotations

import html
from dataclasses import dataclass
from typing import List, Optional, Tuple
from urllib.parse import quote, unquote

LINK_SCHEME = "ctreasoner"
ROLE_STYLES = {"user": ("You", "#1f5fa8"), "assistant": ("CTReasoner", "#2e7d32"),
               "error": ("Problem", "#b71c1c"), "info": ("", "#555555")}


@dataclass
class TranscriptLink:
    label: str
    kind: str                        # "segment" or "node"
    node_id: str
    segment_id: Optional[str] = None

    @property
    def href(self) -> str:
        parts = [self.kind, quote(self.node_id, safe="")]
        if self.segment_id is not None:
            parts.append(quote(self.segment_id, safe=""))
        return f"{LINK_SCHEME}:" + "/".join(parts)


def parse_link(href: str) -> Optional[Tuple[str, str, Optional[str]]]:
    """``(kind, node_id, segment_id or None)`` of a transcript link; None for any other URL."""
    if not href.startswith(LINK_SCHEME + ":"):
        return None
    parts = [unquote(p) for p in href[len(LINK_SCHEME) + 1:].split("/")]
    if parts[0] == "segment" and len(parts) == 3:
        return "segment", parts[1], parts[2]
    if parts[0] == "node" and len(parts) == 2:
        return "node", parts[1], None
    return None


def message_html(role: str, text: str, links: Optional[List[TranscriptLink]] = None, hint: str = "") -> str:
    """One transcript entry. The text is shown in full (line breaks kept), escaped so model output stays text."""
    title, color = ROLE_STYLES.get(role, ROLE_STYLES["info"])
    body = html.escape(text).replace("\n", "<br>")
    out = f'<p style="margin:4px 0"><b style="color:{color}">{html.escape(title)}</b>' if title else '<p>'
    out += (": " if title else "") + body
    if hint:
        out += f'<br><i>Fix: {html.escape(hint)}</i>'
    if links:
        anchors = ", ".join(f'<a href="{html.escape(link.href)}">{html.escape(link.label)}</a>' for link in links)
        out += f"<br>Created: {anchors}"
    return out + "</p>"
