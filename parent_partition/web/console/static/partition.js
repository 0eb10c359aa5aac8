// A partition's page: its screen live on a canvas (dirty rectangles over a websocket), its keyboard and mouse
// sent back on the same socket, and its channels with their counters, refreshed every second.
"use strict";

(() => {
  const { el, bytes, short, count, since, toast, socket, api } = Console;
  const name = decodeURIComponent(location.pathname.split("/")[2] || "");
  const canvas = document.getElementById("screen");
  const ctx = canvas.getContext("2d", { alpha: false });
  const wrap = document.getElementById("wrap");
  const pointer = document.getElementById("pointer");
  const nosignal = document.getElementById("nosignal");
  const RAW = 0, PNG = 1, HEADER = 10;
  const stats = window.vmbusScreen = { frames: 0, rects: 0, active: false, width: 0, height: 0, serial: -1 };
  let ptr = { x: 0, y: 0, visible: false, w: 0, h: 0 };
  let chain = Promise.resolve();  // messages are applied in order, decoding asynchronously

  document.getElementById("name").textContent = name;
  document.title = `${name} · vmbus-emu`;

  // ---- the screen -------------------------------------------------------------------------------------------
  async function drawRect(buf) {
    const view = new DataView(buf);
    const enc = view.getUint8(0);
    const x = view.getUint16(2, true), y = view.getUint16(4, true);
    const w = view.getUint16(6, true), h = view.getUint16(8, true);
    if (enc === RAW) {
      const src = new Uint8Array(buf, HEADER, w * h * 4);
      const img = new ImageData(w, h);
      const dst = img.data;
      for (let i = 0; i < dst.length; i += 4) {  // BGRX -> RGBA
        dst[i] = src[i + 2]; dst[i + 1] = src[i + 1]; dst[i + 2] = src[i]; dst[i + 3] = 255;
      }
      ctx.putImageData(img, x, y);
    } else if (enc === PNG) {
      const bitmap = await createImageBitmap(new Blob([new Uint8Array(buf, HEADER)], { type: "image/png" }));
      ctx.drawImage(bitmap, x, y);
      bitmap.close();
    }
    stats.rects++;
  }

  function setMode(msg) {
    stats.active = !!msg.active;
    const mode = document.getElementById("mode");
    if (!msg.active) {
      nosignal.hidden = false;
      nosignal.textContent = msg.connected === false ? `${name} is not connected — waiting for it` : "no signal";
      mode.textContent = "–";
      pointer.style.display = "none";
      return;
    }
    nosignal.hidden = true;
    if (canvas.width !== msg.width || canvas.height !== msg.height) {
      canvas.width = msg.width;
      canvas.height = msg.height;
    }
    stats.width = msg.width;
    stats.height = msg.height;
    mode.textContent = `${msg.width}×${msg.height}`;
    placePointer();
  }

  function placePointer() {
    if (!ptr.visible || !stats.active || !ptr.w) { pointer.style.display = "none"; return; }
    pointer.style.display = "block";
    pointer.style.left = `${(100 * ptr.x) / canvas.width}%`;
    pointer.style.top = `${(100 * ptr.y) / canvas.height}%`;
    pointer.style.width = `${(100 * ptr.w) / canvas.width}%`;
  }

  function setPointer(msg) {
    ptr.x = msg.x; ptr.y = msg.y; ptr.visible = msg.visible;
    if (msg.shape) {
      const img = new Image();
      img.onload = () => { ptr.w = img.naturalWidth; ptr.h = img.naturalHeight; pointer.src = img.src; placePointer(); };
      img.src = msg.shape;
    }
    placePointer();
  }

  const frames = document.getElementById("frames");
  function apply(data, ws) {
    if (data instanceof ArrayBuffer) return drawRect(data);
    const msg = JSON.parse(data);
    switch (msg.t) {
      case "mode": setMode(msg); break;
      case "pointer": setPointer(msg); break;
      case "frame":  // drawn: ask for the next update
        stats.frames++;
        stats.serial = msg.serial;
        frames.textContent = `${count(stats.frames)} updates`;
        if (ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ t: "ack" }));
        break;
      case "error": toast(msg.message); break;
    }
    return null;
  }

  const link = socket(`/ws/partitions/${encodeURIComponent(name)}`, {
    binary: true,
    onopen() { held.clear(); },
    onmessage(ev, ws) {
      chain = chain.then(() => apply(ev.data, ws)).catch((e) => toast(`screen update failed: ${e.message}`));
    },
  });

  // ---- keyboard: physical keys (KeyboardEvent.code), the server turns them into set-1 scan codes --------
  const held = new Set();
  function key(code, down) {
    if (down) held.add(code); else held.delete(code);
    link.send({ t: "key", code, down });
  }
  canvas.addEventListener("keydown", (e) => {
    e.preventDefault();
    if (e.code) key(e.code, true);  // a repeat is sent again: the guest sees typematic makes, as from a keyboard
  });
  canvas.addEventListener("keyup", (e) => {
    e.preventDefault();
    if (e.code) key(e.code, false);
  });
  canvas.addEventListener("focus", () => wrap.classList.add("focused"));
  canvas.addEventListener("blur", () => {
    wrap.classList.remove("focused");
    for (const code of [...held]) key(code, false);  // nothing stays pressed in the guest
  });
  document.getElementById("cad").addEventListener("click", () => {
    for (const c of ["ControlLeft", "AltLeft", "Delete"]) key(c, true);
    for (const c of ["Delete", "AltLeft", "ControlLeft"]) key(c, false);
  });

  // ---- mouse: absolute reports in screen pixels; moves at most once an animation frame ---------------------
  let buttons = 0, pendingMove = null;
  function at(e) {
    const r = canvas.getBoundingClientRect();
    const x = Math.floor(((e.clientX - r.left) * canvas.width) / r.width);
    const y = Math.floor(((e.clientY - r.top) * canvas.height) / r.height);
    return { x: Math.max(0, Math.min(canvas.width - 1, x)), y: Math.max(0, Math.min(canvas.height - 1, y)) };
  }
  function mouse(p, wheel = 0) {
    link.send({ t: "mouse", x: p.x, y: p.y, buttons, wheel });
  }
  canvas.addEventListener("mousemove", (e) => {
    if (!stats.active) return;
    const first = pendingMove === null;
    pendingMove = at(e);
    if (first) requestAnimationFrame(() => { mouse(pendingMove); pendingMove = null; });
  });
  canvas.addEventListener("mousedown", (e) => {
    canvas.focus();
    e.preventDefault();
    buttons = e.buttons & 0x1f;  // the DOM's bits are HID's: left 1, right 2, middle 4, back 8, forward 16
    if (stats.active) mouse(at(e));
  });
  canvas.addEventListener("mouseup", (e) => {
    buttons = e.buttons & 0x1f;
    if (stats.active) mouse(at(e));
  });
  canvas.addEventListener("contextmenu", (e) => e.preventDefault());
  canvas.addEventListener("wheel", (e) => {
    e.preventDefault();
    if (stats.active && e.deltaY) mouse(at(e), e.deltaY < 0 ? 1 : -1);
  }, { passive: false });

  // ---- the side panel: the partition and its channels, every second ----------------------------------------
  const facts = document.getElementById("facts");
  const tbody = document.getElementById("channels");
  let devices = [];
  let busy = new Set();  // devices with a remove or add under way

  function fill(used, size) {
    const pct = size ? Math.min(100, (100 * used) / size) : 0;
    const bar = el("span", { class: pct > 75 ? "fill hot" : "fill", title: `${bytes(used)} of ${bytes(size)}` },
      el("i"));
    bar.firstChild.style.width = `${Math.max(pct, used ? 3 : 0)}%`;
    return bar;
  }

  async function hot(device, method) {
    busy.add(device);
    render(last);
    try {
      const r = await api(method, `/api/partitions/${encodeURIComponent(name)}/devices/${encodeURIComponent(device)}`);
      toast(`${device}: ${method === "DELETE" ? "rescinded" : "offered"} (relid ${r.relid})`, true);
    } catch (e) {
      toast(e.message);
    } finally {
      busy.delete(device);
      refresh();
    }
  }

  function actionFor(device, primary) {
    if (busy.has(device)) return el("button", { disabled: "", text: "…" });
    if (!primary) {
      return el("button", { class: "add", "data-action": "add", "data-device": device, text: "Add",
        title: `offer ${device} again (hot add)`, onclick: () => hot(device, "POST") });
    }
    const removable = ["open", "closed", "opening"].includes(primary.state);
    return el("button", { class: "danger", "data-action": "remove", "data-device": device, text: "Remove",
      title: `rescind ${device} (hot remove)`, ...(removable ? {} : { disabled: "" }),
      onclick: () => hot(device, "DELETE") });
  }

  let last = null;
  function render(p) {
    last = p;
    if (!p) {
      facts.replaceChildren(el("dt", { text: "state" }), el("dd", { text: "not connected" }));
      tbody.replaceChildren();
      document.getElementById("uptime").textContent = "";
      return;
    }
    const vm = p.vmbus || {};
    const rows = [["transport", p.peer && p.peer !== p.transport ? `${p.transport} ${p.peer}` : p.transport], ["VMBus", `${vm.version || "–"} (${vm.state})`],
      ["traffic", `${bytes(p.bytes_in)} in · ${bytes(p.bytes_out)} out`], ["GPADLs", String(p.gpadls)]];
    if (p.dropped_messages) rows.push(["dropped", String(p.dropped_messages)]);
    facts.replaceChildren(...rows.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: v })]));
    document.getElementById("uptime").textContent = `up ${since(p.connected_since)}`;
    const byDevice = new Map();
    for (const c of p.channels) {
      if (!byDevice.has(c.device)) byDevice.set(c.device, []);
      byDevice.get(c.device).push(c);
    }
    const names = [...new Set([...devices, ...byDevice.keys()])];
    const out = [];
    for (const device of names) {
      const chans = (byDevice.get(device) || []).sort((a, b) => a.sub_channel_index - b.sub_channel_index);
      const primary = chans.find((c) => c.sub_channel_index === 0);
      if (!chans.length) {
        out.push(el("tr", { "data-device": device },
          el("td", { class: "dev", text: device }), el("td", {}, el("span", { class: "badge st-removed", text: "removed" })),
          el("td", { class: "num", text: "–" }), el("td", { class: "num", text: "–" }), el("td"),
          el("td", {}, actionFor(device, null))));
        continue;
      }
      for (const c of chans) {
        const k = c.counters || {}, ring = c.ring || {};
        const label = c.sub_channel_index ? el("td", { class: "dev" }, el("small", { text: `  └ sub ${c.sub_channel_index}` }))
          : el("td", { class: "dev", title: `relid ${c.relid} · ${c.class_id}` }, device, el("small", { text: ` #${c.relid}` }));
        out.push(el("tr", { "data-device": device, "data-relid": String(c.relid) },
          label,
          el("td", {}, el("span", { class: `badge st-${c.state}`, text: c.state })),
          el("td", { class: "num", text: `${count(k.packets_in)} / ${count(k.packets_out)}` }),
          el("td", { class: "num", text: `${short(k.bytes_in)} / ${short(k.bytes_out)}`,
            title: `${bytes(k.bytes_in)} guest→host, ${bytes(k.bytes_out)} host→guest` }),
          el("td", { class: "num" }, c.ring && ring.in_used != null
            ? el("span", {}, fill(ring.in_used, ring.in_size), fill(ring.out_used, ring.out_size)) : "–"),
          el("td", {}, c.sub_channel_index ? null : actionFor(device, primary))));
      }
    }
    tbody.replaceChildren(...out);
  }

  let refreshing = false;
  async function refresh() {
    if (refreshing) return;
    refreshing = true;
    try {
      if (!devices.length) devices = (await api("GET", "/api/")).devices;
      // The list first: a partition not (yet) connected is no 404 in the browser's console every second.
      const connected = (await api("GET", "/api/partitions")).some((p) => p.name === name);
      render(connected ? await api("GET", `/api/partitions/${encodeURIComponent(name)}`) : null);
    } catch (e) {
      render(null);  // not connected (404) or the parent is gone: the status dot says which
    } finally {
      refreshing = false;
    }
  }
  refresh();
  setInterval(refresh, 1000);
})();
