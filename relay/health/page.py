"""Server-rendered HTML of the health page: a coverage bar per model and a table of its servers."""

from __future__ import annotations

from html import escape

from relay.health.state import ModelHealth, ServerRow, SwarmState

STYLE = """
:root { --bad:#d93025; --weak:#f29900; --ok:#81c995; --good:#188038; --ink:#202124; --mute:#5f6368; }
* { box-sizing: border-box; }
body {
  margin: 0;
  font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
  color: var(--ink);
  background: #f8f9fa;
}
header {
  padding: 14px 18px;
  background: #fff;
  border-bottom: 1px solid #e0e0e0;
  display: flex;
  flex-wrap: wrap;
  gap: 4px 16px;
  align-items: baseline;
}
header h1 { font-size: 20px; margin: 0; }
header .meta { color: var(--mute); font-size: 13px; }
main { padding: 12px; max-width: 1200px; margin: 0 auto; }
section.model { background: #fff; border: 1px solid #e0e0e0; border-radius: 10px; padding: 14px; margin-bottom: 14px; }
section.model h2 { font-size: 17px; margin: 0 0 8px; word-break: break-all; }
.badge {
  display: inline-block;
  white-space: normal;
  font-size: 12px;
  font-weight: 600;
  padding: 2px 8px;
  border-radius: 10px;
  color: #fff;
  vertical-align: middle;
}
.badge.healthy { background: var(--good); } .badge.broken { background: var(--bad); }
.bar { display: flex; gap: 2px; height: 28px; margin: 8px 0 4px; }
.cell { flex: 1 1 0; min-width: 3px; border-radius: 3px; }
.cell.c0 { background: var(--bad); }
.cell.c1 { background: var(--weak); }
.cell.c2 { background: var(--ok); }
.cell.c3 { background: var(--good); }
.legend { color: var(--mute); font-size: 12px; display: flex; flex-wrap: wrap; gap: 4px 14px; }
.legend i { display: inline-block; width: 10px; height: 10px; border-radius: 2px; margin-right: 4px; }
.scroll { overflow-x: auto; margin-top: 10px; }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
th, td { text-align: left; padding: 6px 8px; border-bottom: 1px solid #eee; white-space: nowrap; }
th { color: var(--mute); font-weight: 600; }
.state-online { color: var(--good); font-weight: 600; }
.state-draining, .state-joining { color: var(--weak); font-weight: 600; }
.state-offline { color: var(--mute); } .unreachable { color: var(--bad); font-weight: 600; }
.empty { color: var(--mute); padding: 24px; text-align: center; }
@media (max-width: 600px) { body { font-size: 14px; } .bar { height: 22px; } main { padding: 8px; } }
"""

SCRIPT = """
setInterval(async () => {
  try {
    const r = await fetch('/?fragment=1', {cache: 'no-store'});
    if (r.ok) document.getElementById('content').innerHTML = await r.text();
  } catch (e) { /* keep the last view */ }
}, REFRESH_MS);
"""


def _level(servers: int) -> int:
    return min(servers, 3)


def _blocks_text(blocks: list[int]) -> str:
    parts, start = [], None
    for i, block in enumerate(blocks):
        start = block if start is None else start
        if i + 1 == len(blocks) or blocks[i + 1] != block + 1:
            parts.append(str(start) if start == block else f"{start}–{block}")
            start = None
    return ", ".join(parts)


def server_row(row: ServerRow) -> str:
    name = escape(row.public_name) if row.public_name else f"…{escape(row.peer_id[-8:])}"
    if row.reachable is None:
        reach = "–"
    elif row.reachable:
        reach = f"yes ({row.rtt_ms:.0f} ms)" if row.rtt_ms is not None else "yes"
    else:
        reach = '<span class="unreachable">no</span>'
    if not row.direct:
        bridges = ", ".join(row.bridge_addrs) or "none yet"
        reach += f' <span class="bridged" title="behind NAT; bridges: {escape(bridges)}">· bridged</span>'
    state = row.state.value if row.available or row.state.value != "online" else "online (off hours)"
    memory = f"{row.memory_total / 2**30:.0f} GiB" if row.memory_total else ""
    cells = [
        f'<td title="{escape(row.peer_id)}">{name}</td>',
        f'<td class="state-{row.state.value}">{escape(state)}</td>',
        f"<td>{row.start_block}:{row.end_block}</td>",
        f"<td>{row.throughput_inference:.1f} tok/s"
        + (f" · {row.network_mbps:.0f} Mbit/s" if row.network_mbps is not None else "")
        + "</td>",
        f"<td>{row.cache_tokens_free}/{row.cache_tokens_total}</td>",
        f"<td>{escape(row.region) or '–'}</td>",
        f"<td>{escape(row.device_type)} · {escape(row.device_name)} {memory}</td>",
        f"<td>{escape(row.version)}</td>",
        f"<td>{reach}</td>",
        f"<td>{escape(row.last_seen or '–')}</td>",
    ]
    return f'<tr class="server" data-peer="{escape(row.peer_id)}" data-state="{row.state.value}">{"".join(cells)}</tr>'


def _model_section(model: ModelHealth) -> str:
    if model.healthy:
        badge = '<span class="badge healthy">all blocks served</span>'
    else:
        badge = f'<span class="badge broken">no server for block(s) {_blocks_text(model.missing_blocks)}</span>'
    cells = "".join(
        f'<div class="cell c{_level(b.servers)}" data-block="{b.index}" data-servers="{b.servers}" '
        f'title="block {b.index}: {b.servers} server(s), {b.throughput:.1f} tok/s"></div>'
        for b in model.blocks
    )
    header = (
        "<tr><th>server</th><th>state</th><th>blocks</th><th>throughput</th><th>free cache</th>"
        "<th>region</th><th>hardware</th><th>version</th><th>reachable</th><th>last seen (UTC)</th></tr>"
    )
    rows = "".join(server_row(row) for row in model.servers)
    return (
        f'<section class="model" data-model="{escape(model.name)}">'
        f"<h2>{escape(model.name)} {badge}</h2>"
        f'<div class="legend"><span>{escape(model.family)} · {model.num_blocks} blocks · '
        f"{len(model.servers)} server(s)</span>"
        '<span><i style="background:var(--bad)"></i>no server</span>'
        '<span><i style="background:var(--weak)"></i>1</span>'
        '<span><i style="background:var(--ok)"></i>2</span><span><i style="background:var(--good)"></i>3+</span></div>'
        f'<div class="bar" role="img" aria-label="coverage of {model.num_blocks} blocks">{cells}</div>'
        f'<div class="scroll"><table><thead>{header}</thead><tbody>{rows}</tbody></table></div></section>'
    )


def render_fragment(state: SwarmState | None) -> str:
    if state is None:
        return '<p class="empty">Crawling the swarm…</p>'
    if not state.models:
        return f'<p class="empty">No model is served in this swarm right now (checked {escape(state.updated_at)}).</p>'
    total = sum(len(model.servers) for model in state.models)
    summary = (
        f'<p class="legend">Updated {escape(state.updated_at)} · {len(state.models)} model(s) · {total} server(s)</p>'
    )
    return summary + "".join(_model_section(model) for model in state.models)


def render_page(state: SwarmState | None, refresh_seconds: float) -> str:
    script = SCRIPT.replace("REFRESH_MS", str(int(refresh_seconds * 1000)))
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>Swarm health</title><style>{STYLE}</style></head><body>"
        '<header><h1>Swarm health</h1><span class="meta">blocks served per model, live from the DHT · '
        '<a href="/api/v1/state">JSON</a></span></header>'
        f'<main id="content">{render_fragment(state)}</main><script>{script}</script></body></html>'
    )
