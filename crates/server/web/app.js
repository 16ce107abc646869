// parley browser client. Plain JavaScript, no build step; speaks docs/protocol.md.
//
// Every piece of text from the network (content, user names, room names, error messages)
// reaches the page through textContent or attributes, never as parsed HTML markup.
"use strict";

(() => {
  const TYPING_SEND_EVERY_MS = 3000; // send `typing` at most this often
  const TYPING_SHOW_MS = 5000; // show "X is typing…" this long after the last notice
  const PAGE = 50; // history page size
  const BACKOFF_BASE_MS = 500;
  const BACKOFF_MAX_MS = 30000;
  const ABUSE_PAUSE_MS = 30000; // after close 4008
  const MAX_CONTENT_BYTES = 4096;
  const ROOM_RE = /^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$/;

  const $ = (id) => document.getElementById(id);
  const el = (tag, cls, text) => {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  };

  // ------------------------------------------------------------------ state

  const state = {
    creds: null, // { user, token }
    me: null, // { user_id, name }
    ws: null,
    connected: false, // authenticated on the current socket
    wantOnline: false, // signed in: keep a connection
    attempt: 0, // reconnect attempts since the last success
    reconnectTimer: null,
    reconnectAt: 0,
    pauseUntil: 0,
    holdReconnect: false, // debug hook: keep the client offline
    lastFrameAt: 0,
    heartbeatMs: 25000,
    heartbeatTimer: null,
    rooms: new Map(), // name -> Room
    order: [], // room names in the order they were joined
    current: null,
    names: new Map(), // user id -> display name
    pendingJoins: [], // room names with an outstanding `join` on this socket
    idPrefix: "c-" + Math.random().toString(36).slice(2, 8) + "-",
    nextId: 1,
    lastTypingSent: 0,
    everConnected: false,
  };

  function newRoom(name) {
    const log = el("ol", "room-log");
    log.dataset.room = name;
    const pending = el("ol", "room-pending");
    pending.dataset.room = name;
    const wrap = el("div", "room-view");
    wrap.dataset.room = name;
    wrap.hidden = true;
    wrap.append(log, pending);
    $("messages").append(wrap);
    return {
      name,
      view: wrap,
      log, // <ol> of stored events, ordered by seq
      pendingList: pending, // <ol> of own messages not acked yet
      els: new Map(), // seq -> <li>
      seqs: [], // sorted seqs in `log`
      seq: 0, // resume point: every event up to here was seen
      epoch: null,
      headSeq: 0, // joined.seq of the current join
      joined: false, // `joined` received on the current socket
      joining: false,
      members: new Set(),
      usersKnown: true,
      count: 0,
      oldest: null,
      moreOlder: false,
      historyReqs: [], // FIFO of "before" | "after" requests in flight
      forwardPaging: false,
      liveMax: 0,
      pending: new Map(), // client id -> { id, content, li, state, seq, timer }
      typing: new Map(), // user -> expiry timer
      unread: 0,
      li: null, // the entry in the room list
    };
  }

  // ------------------------------------------------------------------ notices

  function notice(text, kind = "warn", ms = 6000) {
    const box = el("div", "notice " + kind);
    box.setAttribute("role", kind === "error" ? "alert" : "status");
    box.append(el("span", "notice-text", text));
    const close = el("button", null, "\u00d7");
    close.type = "button";
    close.setAttribute("aria-label", "Dismiss");
    close.addEventListener("click", () => box.remove());
    box.append(close);
    const list = $("notices");
    list.append(box);
    while (list.children.length > 4) list.firstElementChild.remove();
    if (ms > 0) setTimeout(() => box.remove(), ms);
    return box;
  }

  // ------------------------------------------------------------------ connection

  function setConn(kind, text) {
    $("conn").dataset.state = kind;
    $("conn-text").textContent = text;
    $("conn-retry").hidden = kind !== "offline" || !state.wantOnline;
  }

  function wsUrl() {
    const proto = location.protocol === "https:" ? "wss:" : "ws:";
    const q = new URLSearchParams();
    if (!state.creds.token) q.set("user", state.creds.user);
    const qs = q.toString();
    return `${proto}//${location.host}/ws${qs ? "?" + qs : ""}`;
  }

  function connect() {
    clearTimeout(state.reconnectTimer);
    state.reconnectTimer = null;
    if (!state.wantOnline || state.ws) return;
    if (state.holdReconnect) {
      scheduleReconnect();
      return;
    }
    setConn("connecting", state.everConnected ? "reconnecting…" : "connecting…");
    let ws;
    try {
      ws = new WebSocket(wsUrl());
    } catch (e) {
      scheduleReconnect();
      return;
    }
    state.ws = ws;
    state.pendingJoins = [];
    ws.onopen = () => {
      if (state.ws !== ws) return;
      state.lastFrameAt = Date.now();
      if (state.creds.token) {
        sendRaw({ type: "auth", token: state.creds.token });
      } else {
        // In jwt mode a frame other than `auth` gets close 4001 at once: that is how the
        // page tells that this server wants a token. In anonymous mode it is a plain ping.
        sendRaw({ type: "ping" });
      }
    };
    ws.onmessage = (ev) => {
      if (state.ws !== ws) return;
      state.lastFrameAt = Date.now();
      let frame;
      try {
        frame = JSON.parse(ev.data);
      } catch (e) {
        return;
      }
      try {
        handleFrame(frame);
      } catch (e) {
        console.error("parley: frame handling failed", frame, e);
      }
    };
    ws.onclose = (ev) => {
      if (state.ws !== ws) return;
      onSocketGone(ev.code, ev.reason);
    };
    ws.onerror = () => {
      /* onclose follows */
    };
  }

  function detachSocket() {
    const ws = state.ws;
    state.ws = null;
    state.connected = false;
    clearInterval(state.heartbeatTimer);
    state.heartbeatTimer = null;
    for (const room of state.rooms.values()) {
      room.joined = false;
      room.joining = false;
      room.historyReqs = [];
      room.forwardPaging = false;
      clearTyping(room);
      renderRoomEntry(room);
    }
    if (ws) {
      ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
    }
    return ws;
  }

  function onSocketGone(code, reason) {
    const wasConnected = state.connected;
    detachSocket();
    updateComposer();
    if (!state.wantOnline) return;
    if (code === 4001) {
      // Terminal: no reconnect without a (new) token.
      const msg = state.creds.token
        ? "The server refused the token" + (reason ? `: ${reason}` : ".")
        : "This server requires a token (jwt mode). Paste one to sign in.";
      signOut(msg, !state.creds.token);
      return;
    }
    if (code === 4011) {
      signOut("Your token expired. Paste a new one to continue.", true);
      return;
    }
    if (code === 4008) {
      state.pauseUntil = Date.now() + ABUSE_PAUSE_MS;
      notice("Disconnected for sending too fast. Reconnecting in 30 s.", "error", 10000);
    } else if (code === 4009) {
      notice("The connection fell behind; catching up…", "info", 4000);
    } else if (!wasConnected && !state.everConnected) {
      notice("Cannot reach the server. Retrying…", "warn", 4000);
    }
    scheduleReconnect();
  }

  function backoffDelay() {
    const exp = Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * 2 ** Math.min(state.attempt, 10));
    // "Equal jitter": half fixed, half random, so a crowd of clients spreads out.
    return Math.round(exp / 2 + Math.random() * (exp / 2));
  }

  function scheduleReconnect() {
    clearTimeout(state.reconnectTimer);
    if (!state.wantOnline) return;
    let delay = backoffDelay();
    state.attempt += 1;
    const pause = state.pauseUntil - Date.now();
    if (pause > delay) delay = pause;
    state.reconnectAt = Date.now() + delay;
    state.reconnectTimer = setTimeout(connect, delay);
    const secs = Math.max(1, Math.round(delay / 1000));
    setConn("offline", state.holdReconnect ? "offline (held)" : `offline, retrying in ${secs} s`);
  }

  function reconnectNow() {
    state.attempt = 0;
    state.pauseUntil = 0;
    if (!state.ws) connect();
  }

  function startHeartbeat() {
    clearInterval(state.heartbeatTimer);
    const every = Math.max(5000, Math.min(state.heartbeatMs, 25000));
    state.heartbeatTimer = setInterval(() => {
      if (!state.ws || !state.connected) return;
      const idle = Date.now() - state.lastFrameAt;
      if (idle > every * 2.5) {
        // The network went away without telling us: drop and resume.
        dropSocket(4000, "heartbeat timeout");
        return;
      }
      if (idle > every * 0.8) sendRaw({ type: "ping" });
    }, Math.round(every / 2));
  }

  /** Ends the socket without a logout; the reconnect path runs as after a network loss. */
  function dropSocket(code = 4000, reason = "dropped") {
    const ws = state.ws;
    if (!ws) return;
    detachSocket();
    try {
      ws.close(code, reason);
    } catch (e) {
      /* already closing */
    }
    updateComposer();
    scheduleReconnect();
  }

  function sendRaw(frame) {
    const ws = state.ws;
    if (!ws || ws.readyState !== WebSocket.OPEN) return false;
    ws.send(JSON.stringify(frame));
    return true;
  }

  // ------------------------------------------------------------------ frames

  function handleFrame(f) {
    switch (f.type) {
      case "authenticated":
        return onAuthenticated(f);
      case "joined":
        return onJoined(f);
      case "message":
      case "system":
        return onEvent(f);
      case "left":
        return onLeft(f);
      case "ack":
        return onAck(f);
      case "history":
        return onHistory(f);
      case "typing":
        return onTyping(f);
      case "error":
        return onError(f);
      default:
        return undefined; // pong and anything newer
    }
  }

  function onAuthenticated(f) {
    state.connected = true;
    state.everConnected = true;
    state.attempt = 0;
    state.me = { user_id: String(f.user_id), name: String(f.name || f.user_id) };
    state.names.set(state.me.user_id, state.me.name);
    if (typeof f.heartbeat_ms === "number") state.heartbeatMs = f.heartbeat_ms;
    startHeartbeat();
    setConn("online", "online");
    $("me").textContent = state.me.name;
    $("me").title = `Signed in as ${state.me.user_id}`;
    showScreen("chat");
    for (const name of state.order) sendJoin(state.rooms.get(name));
    updateComposer();
  }

  function sendJoin(room) {
    const frame = { type: "join", room: room.name };
    if (room.epoch !== null && room.seq > 0) {
      frame.since = room.seq;
      frame.epoch = room.epoch;
    }
    if (sendRaw(frame)) {
      room.joining = true;
      state.pendingJoins.push(room.name);
      renderRoomEntry(room);
    }
  }

  function onJoined(f) {
    const room = state.rooms.get(f.room);
    state.pendingJoins = state.pendingJoins.filter((n) => n !== f.room);
    if (!room) {
      // Left while the join was in flight.
      sendRaw({ type: "leave", room: f.room });
      return;
    }
    const history = Array.isArray(f.history) ? f.history : [];
    const resumed = f.recovered === true;
    if (!resumed && room.seq > 0) {
      // The log could not be resumed (new epoch or too old): reload what is shown.
      resetLog(room);
      if (f.recovered === false) notice(`#${room.name}: could not replay everything missed; reloaded the latest messages.`, "info", 5000);
    }
    room.joined = true;
    room.joining = false;
    room.epoch = f.epoch;
    room.headSeq = f.seq;
    for (const ev of history) insertEvent(room, ev, { replay: true });
    if (resumed && f.truncated) {
      // More than max_replay was missed: page forward until caught up.
      room.seq = history.length ? history[history.length - 1].seq : room.seq;
      room.forwardPaging = true;
      room.liveMax = 0;
      requestHistory(room, "after", room.seq);
    } else {
      room.seq = Math.max(room.seq, f.seq);
    }
    if (!resumed) {
      room.moreOlder = room.oldest !== null ? room.oldest > 1 : false;
    }
    if (Array.isArray(f.users)) {
      room.members = new Set(f.users.map(String));
      room.usersKnown = true;
    } else {
      room.usersKnown = false;
    }
    room.count = typeof f.user_count === "number" ? f.user_count : room.members.size;
    renderRoomEntry(room);
    if (room.name === state.current) {
      renderRoomHead();
      renderMembers();
      renderOlderButton();
      scrollToBottom(true);
    }
    // Resend what was never acked, with the same ids: the server de-duplicates.
    for (const p of room.pending.values()) {
      if (p.state === "pending") transmit(room, p);
    }
    updateComposer();
  }

  function resetLog(room) {
    room.log.replaceChildren();
    room.els.clear();
    room.seqs = [];
    room.seq = 0;
    room.oldest = null;
    room.moreOlder = false;
  }

  function onEvent(f) {
    const room = state.rooms.get(f.room);
    if (!room || !room.joined) return;
    insertEvent(room, f, { replay: false });
    if (room.forwardPaging) {
      room.liveMax = Math.max(room.liveMax, f.seq);
    } else if (typeof f.seq === "number") {
      room.seq = Math.max(room.seq, f.seq);
    }
    if (f.type === "system" && room.usersKnown) {
      if (f.event === "join") room.members.add(String(f.user));
      if (f.event === "leave") room.members.delete(String(f.user));
      room.count = room.members.size;
    } else if (f.type === "system") {
      if (f.event === "join") room.count += 1;
      if (f.event === "leave") room.count = Math.max(0, room.count - 1);
    }
    if (f.type === "message") stopTyping(room, String(f.user));
    if (f.type === "system") {
      renderRoomEntry(room);
      if (room.name === state.current) {
        renderRoomHead();
        renderMembers();
      }
    }
  }

  /** Puts a stored event in the room's log, ordered by seq, at most once. */
  function insertEvent(room, ev, { replay, older = false }) {
    const seq = ev.seq;
    if (typeof seq !== "number") return;
    if (ev.type === "message" && ev.user !== undefined) state.names.set(String(ev.user), String(ev.name || ev.user));
    // An own message whose ack got lost: it is stored, so settle the pending copy.
    if (ev.type === "message" && ev.id && state.me && String(ev.user) === state.me.user_id) {
      const p = room.pending.get(ev.id);
      if (p) settlePending(room, p);
    }
    if (room.els.has(seq)) return;
    const li = renderEvent(ev);
    // Find the position: usually the end (live) or the start (older page).
    const seqs = room.seqs;
    let i = seqs.length;
    if (i > 0 && seqs[i - 1] > seq) {
      let lo = 0;
      let hi = seqs.length;
      while (lo < hi) {
        const mid = (lo + hi) >> 1;
        if (seqs[mid] < seq) lo = mid + 1;
        else hi = mid;
      }
      i = lo;
    }
    const atBottom = isNearBottom();
    if (i === seqs.length) room.log.append(li);
    else room.log.insertBefore(li, room.els.get(seqs[i]));
    seqs.splice(i, 0, seq);
    room.els.set(seq, li);
    if (room.oldest === null || seq < room.oldest) room.oldest = seq;
    if (room.name === state.current) {
      $("empty").hidden = true;
      if (!older && (atBottom || (state.me && ev.user === state.me.user_id))) scrollToBottom(false);
    } else if (!replay && ev.type === "message") {
      room.unread += 1;
      renderRoomEntry(room);
    }
  }

  function timeOf(ts) {
    const d = ts ? new Date(ts) : new Date();
    if (Number.isNaN(d.getTime())) return "";
    return d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  }

  function renderEvent(ev) {
    if (ev.type === "system") {
      const li = el("li", "sys", ev.content || `${ev.user} ${ev.event === "join" ? "joined" : "left"}`);
      li.dataset.seq = ev.seq;
      li.dataset.event = ev.event || "";
      if (ev.ts) li.title = new Date(ev.ts).toLocaleString();
      return li;
    }
    const mine = state.me && String(ev.user) === state.me.user_id;
    const li = el("li", mine ? "msg mine" : "msg");
    li.dataset.seq = ev.seq;
    li.dataset.user = String(ev.user);
    if (ev.id) li.dataset.id = String(ev.id);
    const meta = el("div", "meta");
    const author = el("span", "author", ev.name || ev.user);
    author.title = String(ev.user);
    const time = el("time", "time", timeOf(ev.ts));
    if (ev.ts) time.dateTime = String(ev.ts);
    meta.append(author, time);
    li.append(meta, el("div", "text", ev.content));
    return li;
  }

  function onLeft(f) {
    const room = state.rooms.get(f.room);
    if (room && room.leaving) removeRoom(room);
  }

  // ------------------------------------------------------------------ history

  function requestHistory(room, dir, seq) {
    const frame = { type: "history", room: room.name, limit: dir === "after" ? 200 : PAGE };
    frame[dir] = seq;
    if (sendRaw(frame)) room.historyReqs.push(dir);
  }

  function loadOlder() {
    const room = currentRoom();
    if (!room || !room.moreOlder || !state.connected || room.historyReqs.includes("before")) return;
    if (room.oldest === null) return;
    requestHistory(room, "before", room.oldest);
    $("load-older").textContent = "Loading…";
  }

  function onHistory(f) {
    const room = state.rooms.get(f.room);
    if (!room) return;
    const dir = room.historyReqs.shift() || "before";
    const messages = Array.isArray(f.messages) ? f.messages : [];
    if (dir === "before") {
      const scroller = $("scroller");
      const keep = room.name === state.current ? scroller.scrollHeight - scroller.scrollTop : null;
      for (let i = messages.length - 1; i >= 0; i -= 1) insertEvent(room, messages[i], { replay: true, older: true });
      room.moreOlder = Boolean(f.more) && messages.length > 0;
      if (keep !== null) scroller.scrollTop = scroller.scrollHeight - keep;
      renderOlderButton();
    } else {
      for (const ev of messages) insertEvent(room, ev, { replay: true });
      if (messages.length) room.seq = Math.max(room.seq, messages[messages.length - 1].seq);
      if (f.more && messages.length) {
        requestHistory(room, "after", room.seq);
      } else {
        room.forwardPaging = false;
        room.seq = Math.max(room.seq, room.headSeq, room.liveMax);
      }
    }
  }

  // ------------------------------------------------------------------ sending

  function byteLength(s) {
    return new TextEncoder().encode(s).length;
  }

  function submitMessage() {
    const input = $("input");
    const content = input.value;
    const room = currentRoom();
    if (!room || content.trim() === "") return;
    if (byteLength(content) > MAX_CONTENT_BYTES) {
      notice(`Message too long: at most ${MAX_CONTENT_BYTES} bytes (this one is ${byteLength(content)}).`, "error");
      return;
    }
    const id = state.idPrefix + state.nextId++;
    const p = { id, content, state: "pending", seq: null, timer: null, li: null };
    p.li = renderPending(room, p);
    room.pending.set(id, p);
    room.pendingList.append(p.li);
    input.value = "";
    autosize();
    state.lastTypingSent = 0;
    scrollToBottom(true);
    if (room.joined) transmit(room, p);
  }

  function transmit(room, p) {
    clearTimeout(p.timer);
    p.timer = null;
    if (!room.joined) return;
    sendRaw({ type: "send", room: room.name, content: p.content, id: p.id });
  }

  function renderPending(room, p) {
    const li = el("li", "msg mine pending");
    li.dataset.pendingId = p.id;
    const meta = el("div", "meta");
    meta.append(el("span", "author", state.me ? state.me.name : "you"), el("span", "state"));
    li.append(meta, el("div", "text", p.content));
    return li;
  }

  function settlePending(room, p) {
    clearTimeout(p.timer);
    room.pending.delete(p.id);
    p.li.remove();
  }

  function failPending(room, p, why) {
    clearTimeout(p.timer);
    p.state = "failed";
    p.li.classList.remove("pending");
    p.li.classList.add("failed");
    const st = p.li.querySelector(".state");
    st.textContent = `not sent: ${why} `;
    const actions = el("span", "msg-actions");
    const retry = el("button", "link-btn", "retry");
    retry.type = "button";
    retry.addEventListener("click", () => {
      p.state = "pending";
      p.li.classList.add("pending");
      p.li.classList.remove("failed");
      st.textContent = "";
      transmit(room, p);
    });
    const drop = el("button", "link-btn", "discard");
    drop.type = "button";
    drop.addEventListener("click", () => settlePending(room, p));
    actions.append(retry, drop);
    st.append(actions);
  }

  function onAck(f) {
    const room = state.rooms.get(f.room);
    if (!room) return;
    const p = room.pending.get(f.id);
    if (!p) return;
    settlePending(room, p);
    if (!room.els.has(f.seq)) {
      // The ack came before our own copy: show it from what we sent; the copy is de-duplicated.
      insertEvent(room, {
        type: "message",
        room: room.name,
        seq: f.seq,
        user: state.me.user_id,
        name: state.me.name,
        content: p.content,
        id: p.id,
        ts: new Date().toISOString(),
      }, { replay: true });
    }
  }

  function findPending(id) {
    if (!id) return null;
    for (const room of state.rooms.values()) {
      const p = room.pending.get(id);
      if (p) return { room, p };
    }
    return null;
  }

  function onError(f) {
    const code = String(f.code || "error");
    const msg = f.message ? String(f.message) : "";
    const hit = findPending(f.id);
    if (hit) {
      const { room, p } = hit;
      switch (code) {
        case "rate_limited": {
          const wait = Math.max(50, Number(f.retry_after_ms) || 1000);
          notice(`Sending too fast: retrying in ${(wait / 1000).toFixed(1)} s.`, "warn", Math.max(2500, wait));
          clearTimeout(p.timer);
          p.timer = setTimeout(() => transmit(room, p), wait);
          return;
        }
        case "unavailable":
          notice("The server cannot store messages right now; retrying…", "warn");
          clearTimeout(p.timer);
          p.timer = setTimeout(() => transmit(room, p), 2000);
          return;
        case "not_joined":
          // Rejoin in flight: resent after `joined`.
          return;
        case "too_large":
          failPending(room, p, "too large");
          notice("Message too large for this server." + (msg ? ` (${msg})` : ""), "error");
          return;
        default:
          failPending(room, p, code.replace(/_/g, " "));
          notice(`Message not sent: ${msg || code}`, "error");
          return;
      }
    }
    // Errors without an id: a join is the likely cause when one is outstanding.
    if (state.pendingJoins.length && ["forbidden", "bad_request", "too_many_rooms", "unavailable", "unauthorized"].includes(code)) {
      const name = state.pendingJoins.shift();
      const room = state.rooms.get(name);
      if (room && code === "unavailable") {
        room.joining = false;
        notice(`#${name}: the server is unavailable; retrying the join…`, "warn");
        setTimeout(() => {
          if (state.rooms.get(name) === room && !room.joined && state.connected) sendJoin(room);
        }, 2000);
        return;
      }
      if (room && !(code === "bad_request" && /already/i.test(msg))) {
        const why = code === "forbidden" ? "you may not join this room" : msg || code;
        notice(`Cannot join #${name}: ${why}.`, "error");
        removeRoom(room);
        return;
      }
    }
    const labels = {
      unauthorized: "Not authorised",
      forbidden: "Not allowed",
      rate_limited: "Slow down",
      too_large: "Too large",
      not_joined: "Not in that room",
      unavailable: "Server unavailable",
      internal: "Server error",
    };
    notice(`${labels[code] || code}${msg ? ": " + msg : ""}`, code === "rate_limited" || code === "unavailable" ? "warn" : "error");
  }

  // ------------------------------------------------------------------ typing

  function onTyping(f) {
    const room = state.rooms.get(f.room);
    if (!room || !f.user) return;
    const user = String(f.user);
    if (state.me && user === state.me.user_id) return;
    clearTimeout(room.typing.get(user));
    room.typing.set(user, setTimeout(() => stopTyping(room, user), TYPING_SHOW_MS));
    if (room.name === state.current) renderTyping();
  }

  function stopTyping(room, user) {
    if (!room.typing.has(user)) return;
    clearTimeout(room.typing.get(user));
    room.typing.delete(user);
    if (room.name === state.current) renderTyping();
  }

  function clearTyping(room) {
    for (const t of room.typing.values()) clearTimeout(t);
    room.typing.clear();
    if (room.name === state.current) renderTyping();
  }

  function renderTyping() {
    const room = currentRoom();
    const box = $("typing");
    const who = room ? [...room.typing.keys()].map((u) => state.names.get(u) || u) : [];
    let text = "";
    if (who.length === 1) text = `${who[0]} is typing…`;
    else if (who.length === 2) text = `${who[0]} and ${who[1]} are typing…`;
    else if (who.length > 2) text = `${who.length} people are typing…`;
    box.textContent = text;
  }

  function onInput() {
    autosize();
    const room = currentRoom();
    if (!room || !room.joined || $("input").value === "") return;
    const now = Date.now();
    if (now - state.lastTypingSent >= TYPING_SEND_EVERY_MS) {
      state.lastTypingSent = now;
      sendRaw({ type: "typing", room: room.name });
    }
  }

  // ------------------------------------------------------------------ rooms

  function currentRoom() {
    return state.current ? state.rooms.get(state.current) || null : null;
  }

  function addRoom(name, select = true) {
    let room = state.rooms.get(name);
    if (!room) {
      room = newRoom(name);
      state.rooms.set(name, room);
      state.order.push(name);
      const li = el("li", "room");
      li.dataset.room = name;
      const open = el("button", "room-open");
      open.type = "button";
      open.append(el("span", "room-name", name), el("span", "badge"), el("span", "room-users"));
      open.addEventListener("click", () => selectRoom(name));
      const leave = el("button", "room-leave", "\u00d7");
      leave.type = "button";
      leave.title = `Leave #${name}`;
      leave.setAttribute("aria-label", `Leave ${name}`);
      leave.addEventListener("click", () => leaveRoom(name));
      li.append(open, leave);
      room.li = li;
      $("rooms").append(li);
      if (state.connected) sendJoin(room);
    }
    renderRoomEntry(room);
    if (select) selectRoom(name);
    saveRooms();
    return room;
  }

  function leaveRoom(name) {
    const room = state.rooms.get(name);
    if (!room) return;
    if (room.joined && sendRaw({ type: "leave", room: name })) {
      room.leaving = true;
      room.li.classList.add("joining");
      // Gone from the page at once; `left` confirms.
      removeRoom(room);
    } else {
      removeRoom(room);
    }
  }

  function removeRoom(room) {
    if (state.rooms.get(room.name) !== room) return;
    clearTyping(room);
    for (const p of room.pending.values()) clearTimeout(p.timer);
    state.rooms.delete(room.name);
    state.order = state.order.filter((n) => n !== room.name);
    room.li.remove();
    room.view.remove();
    if (state.current === room.name) {
      state.current = null;
      selectRoom(state.order[0] || null);
    }
    saveRooms();
  }

  function selectRoom(name) {
    if (name && !state.rooms.has(name)) return;
    state.current = name;
    for (const room of state.rooms.values()) {
      const on = room.name === name;
      room.view.hidden = !on;
      room.li.classList.toggle("current", on);
      if (on) {
        room.unread = 0;
        renderRoomEntry(room);
      }
    }
    $("app").classList.remove("show-rooms");
    updateScrim();
    renderRoomHead();
    renderMembers();
    renderTyping();
    renderOlderButton();
    updateComposer();
    const room = currentRoom();
    $("empty").hidden = Boolean(room && room.seqs.length);
    $("empty").textContent = room ? "No messages yet. Say hello!" : "Join a room to start chatting.";
    scrollToBottom(true);
    if (room && window.matchMedia("(min-width: 761px)").matches) $("input").focus();
  }

  function renderRoomEntry(room) {
    if (!room.li) return;
    room.li.classList.toggle("joining", !room.joined);
    const users = room.li.querySelector(".room-users");
    users.textContent = room.joined || room.count ? String(room.count) : "…";
    users.title = `${room.count} member${room.count === 1 ? "" : "s"}`;
    const badge = room.li.querySelector(".badge");
    badge.textContent = room.unread ? String(room.unread) : "";
    badge.hidden = !room.unread;
  }

  function renderRoomHead() {
    const room = currentRoom();
    $("room-title").textContent = room ? `#${room.name}` : "No room";
    $("room-count").textContent = room ? `${room.count} member${room.count === 1 ? "" : "s"}` : "";
  }

  function renderMembers() {
    const room = currentRoom();
    const list = $("members");
    list.replaceChildren();
    if (!room) {
      $("members-count").textContent = "";
      return;
    }
    $("members-count").textContent = String(room.count);
    const users = [...room.members].sort((a, b) => a.localeCompare(b));
    for (const u of users) {
      const li = el("li", "member");
      li.dataset.user = u;
      if (state.me && u === state.me.user_id) li.classList.add("me");
      const name = el("span", "member-name", state.names.get(u) || u);
      name.title = u;
      li.append(name);
      list.append(li);
    }
    if (!room.usersKnown) list.append(el("li", "muted member-more", `${room.count} members (large room)`));
  }

  function renderOlderButton() {
    const room = currentRoom();
    const btn = $("load-older");
    btn.hidden = !(room && room.moreOlder);
    btn.textContent = "Load older messages";
  }

  function updateComposer() {
    const room = currentRoom();
    const ok = Boolean(room);
    $("input").disabled = !ok;
    $("send").disabled = !ok;
    $("input").placeholder = !room
      ? "Join a room to chat"
      : room.joined
        ? `Message #${room.name}`
        : `Message #${room.name} (sent when back online)`;
  }

  function saveRooms() {
    try {
      sessionStorage.setItem("parley.rooms", JSON.stringify(state.order));
    } catch (e) {
      /* storage disabled */
    }
  }

  // ------------------------------------------------------------------ layout helpers

  function isNearBottom() {
    const s = $("scroller");
    return s.scrollHeight - s.scrollTop - s.clientHeight < 80;
  }

  function scrollToBottom(force) {
    const s = $("scroller");
    if (force || isNearBottom()) s.scrollTop = s.scrollHeight;
  }

  function autosize() {
    const input = $("input");
    input.style.height = "auto";
    input.style.height = Math.min(input.scrollHeight + 2, 144) + "px";
  }

  function updateScrim() {
    const app = $("app");
    $("scrim").hidden = !(app.classList.contains("show-rooms") || app.classList.contains("show-members"));
  }

  function showScreen(name) {
    $("app").dataset.screen = name;
  }

  // ------------------------------------------------------------------ sign in / out

  function validName(name) {
    // 1 to 64 printable characters (what the server accepts for ?user=).
    return name.length >= 1 && [...name].length <= 64 && !/[\u0000-\u001f\u007f]/.test(name);
  }

  function signIn({ user, token, room }) {
    state.creds = { user, token };
    state.wantOnline = true;
    state.attempt = 0;
    state.everConnected = false;
    try {
      if (user) localStorage.setItem("parley.user", user);
    } catch (e) {
      /* storage disabled */
    }
    const rooms = [];
    try {
      const saved = JSON.parse(sessionStorage.getItem("parley.rooms") || "[]");
      if (Array.isArray(saved)) for (const r of saved) if (typeof r === "string" && ROOM_RE.test(r)) rooms.push(r);
    } catch (e) {
      /* ignore */
    }
    if (room && !rooms.includes(room)) rooms.push(room);
    for (const r of rooms) addRoom(r, false);
    selectRoom(room || rooms[0] || null);
    $("signin-submit").disabled = true;
    connect();
  }

  function signOut(reason, wantToken) {
    state.wantOnline = false;
    clearTimeout(state.reconnectTimer);
    const ws = detachSocket();
    if (ws) {
      try {
        ws.close(1000, "bye");
      } catch (e) {
        /* ignore */
      }
    }
    for (const room of [...state.rooms.values()]) removeRoom(room);
    try {
      sessionStorage.removeItem("parley.rooms");
    } catch (e) {
      /* ignore */
    }
    state.me = null;
    setConn("offline", "offline");
    showScreen("signin");
    $("signin-submit").disabled = false;
    const err = $("signin-error");
    err.textContent = reason || "";
    err.hidden = !reason;
    if (wantToken) $("signin-token").focus();
  }

  function init() {
    const params = new URLSearchParams(location.search);
    const urlToken = params.get("token");
    const urlUser = params.get("user");
    const urlRoom = params.get("room");
    let savedUser = "";
    try {
      savedUser = localStorage.getItem("parley.user") || "";
    } catch (e) {
      /* ignore */
    }
    $("signin-name").value = urlUser || savedUser;
    if (urlRoom && ROOM_RE.test(urlRoom)) $("signin-room").value = urlRoom;
    if (urlToken) $("signin-token").value = urlToken;

    $("signin-form").addEventListener("submit", (e) => {
      e.preventDefault();
      const user = $("signin-name").value.trim();
      const token = $("signin-token").value.trim();
      const room = $("signin-room").value.trim();
      const err = $("signin-error");
      let problem = "";
      if (!token && !validName(user)) problem = "Pick a name (1 to 64 characters), or paste a token.";
      else if (room && !ROOM_RE.test(room)) problem = "Room names are 1 to 64 of A-Z a-z 0-9 _ . : - and start with a letter or digit.";
      err.textContent = problem;
      err.hidden = !problem;
      if (problem) return;
      signIn({ user: token ? "" : user, token, room });
    });

    $("composer").addEventListener("submit", (e) => {
      e.preventDefault();
      submitMessage();
    });
    $("input").addEventListener("input", onInput);
    $("input").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
        e.preventDefault();
        submitMessage();
      }
    });
    $("join-form").addEventListener("submit", (e) => {
      e.preventDefault();
      const name = $("join-room").value.trim().replace(/^#/, "");
      if (!ROOM_RE.test(name)) {
        notice("Room names are 1 to 64 of A-Z a-z 0-9 _ . : - and start with a letter or digit.", "error");
        return;
      }
      $("join-room").value = "";
      addRoom(name, true);
    });
    $("scroller").addEventListener("scroll", () => {
      if ($("scroller").scrollTop < 40) loadOlder();
    });
    $("load-older").addEventListener("click", loadOlder);
    $("signout").addEventListener("click", () => signOut("", false));
    $("conn-retry").addEventListener("click", reconnectNow);
    $("toggle-rooms").addEventListener("click", () => {
      $("app").classList.toggle("show-rooms");
      $("app").classList.remove("show-members");
      updateScrim();
    });
    $("toggle-members").addEventListener("click", () => {
      const app = $("app");
      if (window.matchMedia("(max-width: 760px)").matches) {
        app.classList.toggle("show-members");
        app.classList.remove("show-rooms");
      } else {
        app.classList.toggle("no-members");
      }
      updateScrim();
    });
    $("scrim").addEventListener("click", () => {
      $("app").classList.remove("show-rooms", "show-members");
      updateScrim();
    });
    window.addEventListener("online", () => {
      if (state.wantOnline && !state.ws && !state.holdReconnect) reconnectNow();
    });
    window.addEventListener("offline", () => {
      if (state.ws) dropSocket(4000, "offline");
    });
    document.addEventListener("visibilitychange", () => {
      if (document.visibilityState === "visible" && state.wantOnline && !state.ws && !state.holdReconnect) reconnectNow();
    });

    if (urlToken) {
      signIn({ user: "", token: urlToken, room: $("signin-room").value.trim() || "general" });
    } else {
      $("signin-name").focus();
    }
  }

  // ------------------------------------------------------------------ test hook

  window.parley = {
    /** Closes the socket abruptly (no logout); the reconnect path runs. */
    dropConnection() {
      dropSocket(4000, "dropped by test hook");
    },
    /** While held, reconnect attempts wait (as if the network were down). */
    holdReconnect(on) {
      state.holdReconnect = Boolean(on);
      if (!on && state.wantOnline && !state.ws) {
        state.attempt = 0;
        scheduleReconnect();
      }
    },
    /** A snapshot for tests and debugging. */
    status() {
      return {
        connected: state.connected,
        user: state.me ? state.me.user_id : null,
        current: state.current,
        rooms: [...state.rooms.values()].map((r) => ({
          name: r.name,
          joined: r.joined,
          seq: r.seq,
          epoch: r.epoch,
          count: r.count,
          members: [...r.members],
          pending: r.pending.size,
        })),
      };
    },
  };

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
