// vmbus-emu web console: what both pages share (the websocket with reconnect and its status dot, formatting).
"use strict";

const Console = (() => {
  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v);
    }
    for (const c of children) if (c != null) node.append(c);
    return node;
  }

  function bytes(n) {
    if (n == null) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i === 0 ? n.toFixed(0) : n.toFixed(n < 10 ? 1 : 0)) + " " + units[i];
  }

  function short(n) {  // bytes in a table cell: 968, 1.1K, 14M
    if (n == null) return "–";
    const units = ["", "K", "M", "G", "T"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i === 0 ? n.toFixed(0) : n.toFixed(n < 10 ? 1 : 0)) + units[i];
  }

  function count(n) {
    if (n == null) return "–";
    if (n < 10000) return String(n);
    if (n < 1e6) return (n / 1e3).toFixed(n < 1e5 ? 1 : 0) + "k";
    return (n / 1e6).toFixed(n < 1e7 ? 2 : 1) + "M";
  }

  function since(iso) {
    if (!iso) return "–";
    let s = Math.max(0, Math.round((Date.now() - Date.parse(iso)) / 1000));
    const d = Math.floor(s / 86400); s -= d * 86400;
    const h = Math.floor(s / 3600); s -= h * 3600;
    const m = Math.floor(s / 60); s -= m * 60;
    if (d) return `${d}d ${h}h`;
    if (h) return `${h}h ${m}m`;
    if (m) return `${m}m ${s}s`;
    return `${s}s`;
  }

  function toast(message, ok = false) {
    const box = document.getElementById("toasts");
    if (!box) return;
    const t = el("div", { class: ok ? "toast ok" : "toast", text: message });
    box.append(t);
    while (box.children.length > 4) box.firstChild.remove();
    setTimeout(() => t.remove(), 5000);
  }

  // A websocket that reconnects (with backoff) and drives the status dot: green live, yellow connecting, red down.
  function socket(path, { onopen, onmessage, binary = false }) {
    const dot = document.getElementById("ws-dot");
    const label = document.getElementById("ws-label");
    const state = { ws: null, delay: 500 };
    function show(cls, text) {
      if (dot) dot.className = "dot " + cls;
      if (label) label.textContent = text;
    }
    function connect() {
      show("wait", "connecting…");
      const proto = location.protocol === "https:" ? "wss:" : "ws:";
      const ws = new WebSocket(`${proto}//${location.host}${path}`);
      if (binary) ws.binaryType = "arraybuffer";
      state.ws = ws;
      ws.onopen = () => { state.delay = 500; show("live", "live"); if (onopen) onopen(ws); };
      ws.onmessage = (ev) => onmessage(ev, ws);
      ws.onclose = () => {
        if (state.ws !== ws) return;
        show("down", "disconnected — retrying");
        setTimeout(connect, state.delay);
        state.delay = Math.min(state.delay * 2, 5000);
      };
      ws.onerror = () => {};  // onclose follows and says so
    }
    connect();
    return {
      send(obj) {
        const ws = state.ws;
        if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(obj));
      },
    };
  }

  async function api(method, path) {
    const resp = await fetch(path, { method, headers: { "Accept": "application/json" } });
    let body = null;
    try { body = await resp.json(); } catch (e) { body = null; }
    if (!resp.ok) throw new Error((body && body.error) || `${method} ${path}: ${resp.status}`);
    return body;
  }

  return { el, bytes, short, count, since, toast, socket, api };
})();
