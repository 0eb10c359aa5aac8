// The index: a card per connected partition with a live thumbnail, its VMBus state and its channels.
// The server pushes the partitions whenever they change; a screen's new serial means "fetch a new thumbnail".
"use strict";

(() => {
  const { el, since, socket } = Console;
  const grid = document.getElementById("partitions");
  const empty = document.getElementById("empty");
  const cards = new Map();  // name -> card state
  const THUMB_SCALE = 0.5;
  const THUMB_EVERY = 500;  // ms: at most two thumbnails a second per partition
  window.vmbusIndex = { updates: 0, thumbnails: 0 };

  function thumbnail(card) {
    // Rate-limited: one fetch at a time, at most every THUMB_EVERY ms; the newest serial wins.
    if (card.loading || card.shown === card.serial || card.serial == null) return;
    const wait = card.last + THUMB_EVERY - Date.now();
    if (wait > 0) {
      if (!card.timer) card.timer = setTimeout(() => { card.timer = null; thumbnail(card); }, wait);
      return;
    }
    const serial = card.serial;
    card.loading = true;
    card.last = Date.now();
    const img = new Image();
    img.onload = () => {
      card.loading = false;
      card.shown = serial;
      card.img.src = img.src;
      card.img.hidden = false;
      card.nosignal.hidden = true;
      window.vmbusIndex.thumbnails++;
      thumbnail(card);
    };
    img.onerror = () => { card.loading = false; };  // the screen went meanwhile: the next update says so
    img.src = `/api/partitions/${encodeURIComponent(card.name)}/screen.png?scale=${THUMB_SCALE}&s=${serial}`;
  }

  function makeCard(name) {
    const href = `/partitions/${encodeURIComponent(name)}`;
    const img = el("img", { alt: `${name}'s screen`, hidden: "" });
    const nosignal = el("div", { class: "nosignal", text: "no signal" });
    const title = el("a", { href, text: name });
    const meta = el("span", { class: "meta" });
    const pills = el("div", { class: "pills" });
    const info = el("div", { class: "meta" });
    const node = el("article", { class: "card", "data-partition": name },
      el("a", { class: "thumb", href, title: `open ${name}'s console` }, img, nosignal),
      el("div", { class: "body" }, el("div", { class: "title" }, title, meta), info, pills));
    return { name, node, img, nosignal, meta, info, pills, serial: null, shown: null, last: 0, loading: false,
             timer: null };
  }

  function update(card, p) {
    const vm = p.vmbus || {};
    card.meta.textContent = `${p.transport} · VMBus ${vm.version || vm.state}`;
    card.connected = p.connected_since;
    card.info.textContent = `connected ${since(p.connected_since)} · ${p.gpadls} GPADLs · ${p.channels.length} channels`;
    card.pills.replaceChildren(...p.channels.map((c) => el("span", {
      class: `pill st-${c.state}`, title: `relid ${c.relid}: ${c.state}`,
      text: c.sub_channel_index ? `${c.device}#${c.sub_channel_index}` : c.device })));
    const s = p.screen;
    if (!s || !s.active) {
      card.serial = null;
      card.img.hidden = true;
      card.nosignal.hidden = false;
      card.nosignal.textContent = s ? "screen off" : "no video channel";
      return;
    }
    card.serial = s.serial;
    thumbnail(card);
  }

  function render(msg) {
    document.getElementById("parent-name").textContent = msg.parent;
    const seen = new Set();
    for (const p of msg.partitions) {
      seen.add(p.name);
      let card = cards.get(p.name);
      if (!card) {
        card = makeCard(p.name);
        cards.set(p.name, card);
      }
      update(card, p);
    }
    for (const [name, card] of cards) {
      if (!seen.has(name)) {
        if (card.timer) clearTimeout(card.timer);
        card.node.remove();
        cards.delete(name);
      }
    }
    grid.replaceChildren(...msg.partitions.map((p) => cards.get(p.name).node));
    empty.hidden = msg.partitions.length > 0;
    const n = msg.partitions.length;
    document.getElementById("summary").textContent =
      `${n} child partition${n === 1 ? "" : "s"} connected to ${msg.parent}: screens and VMBus channels, live.`;
    window.vmbusIndex.updates++;
  }

  socket("/ws/partitions", {
    onmessage(ev) {
      const msg = JSON.parse(ev.data);
      if (msg.t === "partitions") render(msg);
    },
  });
  setInterval(() => {  // keep "connected 5m" current between pushes
    for (const card of cards.values()) {
      card.info.textContent = card.info.textContent.replace(/^connected [^·]*·/, `connected ${since(card.connected)} ·`);
    }
  }, 1000);
})();
