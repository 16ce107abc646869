// parley browser client: the page (UI only). The protocol -- reconnects, resume, exactly-once
// delivery, acks and resends, token refresh, heartbeats -- lives in parley-client
// (clients/js/src/index.js), which the server serves as /parley-client.js.
//
// Every piece of text from the network (content, user names, room names, error messages)
// reaches the page through textContent or attributes, never as parsed HTML markup.

import { Parley } from "/parley-client.js?v=__VERSION__";

const TYPING_SHOW_MS = 5000; // show "X is typing…" this long after the last notice
const PAGE = 50; // history page size
const DEFAULT_MAX_CONTENT_BYTES = 4096; // until the server says (authenticated.limits)
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
  client: null, // Parley
  me: null, // { user_id, name }
  rooms: new Map(), // name -> view state
  order: [], // room names in the order they were joined
  current: null,
  everConnected: false,
  holdReconnect: false, // test hook: keep the page offline
  maxContentBytes: DEFAULT_MAX_CONTENT_BYTES,
};

/** While the test hook holds the network, opening a socket fails at once. */
class PageWebSocket extends WebSocket {
  constructor(url) {
    if (state.holdReconnect) throw new Error("offline (held)");
    super(url);
  }
}

function online() {
  return Boolean(state.client && state.client.state === "open");
}

function nameOf(user) {
  return state.client ? state.client.displayName(user) : String(user);
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
  $("conn-retry").hidden = kind !== "offline" || !state.client;
}

function wsUrl() {
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  return `${proto}//${location.host}/ws`;
}

function connect() {
  const { user, token } = state.creds;
  const client = new Parley(wsUrl(), {
    token: token || undefined,
    user: token ? undefined : user,
    WebSocket: PageWebSocket,
  });
  state.client = client;
  client.on("state", (s) => {
    if (state.client !== client) return;
    if (s === "open") {
      setConn("online", "online");
    } else if (s === "connecting") {
      const held = state.holdReconnect;
      setConn(held || state.everConnected ? "offline" : "connecting", held ? "offline (held)" : state.everConnected ? "reconnecting…" : "connecting…");
      for (const room of state.rooms.values()) {
        clearTyping(room);
        renderRoomEntry(room);
      }
    }
    updateComposer();
  });
  client.on("authenticated", (info) => {
    if (state.client !== client) return;
    state.everConnected = true;
    state.me = { user_id: info.user_id, name: info.name };
    if (info.limits && typeof info.limits.max_content_bytes === "number") state.maxContentBytes = info.limits.max_content_bytes;
    $("me").textContent = info.name;
    $("me").title = `Signed in as ${info.user_id}`;
    showScreen("chat");
  });
  client.on("error", (err) => {
    if (state.client !== client) return;
    onClientError(err);
  });
  for (const name of state.order) joinRoom(state.rooms.get(name));
}

function onClientError(err) {
  switch (err.closeCode) {
    case 4001: {
      const msg = state.creds.token
        ? `The server refused the token${err.message ? ` (${err.message})` : ""}.`
        : "This server requires a token (jwt mode). Paste one to sign in.";
      signOut(msg, true);
      return;
    }
    case 4011:
      // The page has only the token it was given: it cannot get a new one by itself.
      signOut("Your token expired. Paste a new one to continue.", true);
      return;
    case 4008:
      setConn("offline", "disconnected");
      $("conn-retry").hidden = false;
      notice("Disconnected for sending too fast. Wait a little, then press “retry now”.", "error", 15000);
      return;
    default:
      break;
  }
  if (err.code === "connect" || err.code === "disconnected") return; // the reconnect loop handles it
  notice(`${labelOf(err.code)}${err.message && err.message !== err.code ? ": " + err.message : ""}`, err.code === "rate_limited" || err.code === "unavailable" ? "warn" : "error");
}

function labelOf(code) {
  return (
    {
      unauthorized: "Not authorised",
      forbidden: "Not allowed",
      rate_limited: "Slow down",
      too_large: "Too large",
      not_joined: "Not in that room",
      unavailable: "Server unavailable",
      internal: "Server error",
    }[code] || code
  );
}

/** After 4008 (or a sign-in) the page starts a fresh client: rooms are joined again. */
function retryNow() {
  if (!state.creds) return;
  if (state.client && state.client.state !== "closed") {
    state.client.reconnect();
    return;
  }
  const old = state.client;
  state.client = null;
  if (old) old.close();
  for (const room of state.rooms.values()) resetLog(room);
  connect();
}

// ------------------------------------------------------------------ rooms

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
    lib: null, // the parley-client Room
    offs: [], // its listeners, removed with the room
    view: wrap,
    log, // <ol> of stored events, ordered by seq
    pendingList: pending, // <ol> of own messages not acked yet
    els: new Map(), // seq -> <li>
    seqs: [], // sorted seqs in `log`
    members: [],
    count: 0,
    complete: true,
    oldest: null,
    moreOlder: false,
    loadingOlder: false,
    typing: new Map(), // user -> expiry timer
    readOnly: false, // only the server posts here (joined.publish is "api")
    unread: 0,
    li: null, // the entry in the room list
  };
}

function joinRoom(room) {
  const lib = state.client.room(room.name);
  room.lib = lib;
  for (const off of room.offs) off();
  room.offs = [
    lib.on("message", (m) => onEvent(room, m)),
    lib.on("system", (e) => onEvent(room, e)),
    lib.on("typing", (t) => onTyping(room, t)),
    lib.on("presence", (users, info) => {
      room.members = users;
      room.count = info.count;
      room.complete = info.complete;
      renderRoomEntry(room);
      if (room.name === state.current) {
        renderRoomHead();
        renderMembers();
      }
    }),
    lib.on("joined", (info) => {
      room.readOnly = info.publish === "api";
      if (!info.recovered) room.moreOlder = room.oldest !== null ? room.oldest > 1 : false;
      renderRoomEntry(room);
      if (room.name === state.current) {
        renderOlderButton();
        scrollToBottom(true);
      }
      updateComposer();
    }),
    lib.on("reset", () => {
      resetLog(room);
      notice(`#${room.name}: could not replay everything missed; reloaded the latest messages.`, "info", 5000);
    }),
    lib.on("left", (info) => {
      notice(`You were removed from #${room.name}${info.reason ? ` (${info.reason})` : ""}.`, "error");
      removeRoom(room);
    }),
  ];
  renderRoomEntry(room);
  lib.join().catch((err) => {
    if (state.rooms.get(room.name) !== room || err.code === "left" || err.code === "closed" || err.closeCode) return;
    const why = err.code === "forbidden" ? "you may not join this room" : err.message || err.code;
    notice(`Cannot join #${room.name}: ${why}.`, "error");
    removeRoom(room);
  });
}

function resetLog(room) {
  room.log.replaceChildren();
  room.els.clear();
  room.seqs = [];
  room.oldest = null;
  room.moreOlder = false;
  if (room.name === state.current) renderOlderButton();
}

function onEvent(room, ev) {
  insertEvent(room, ev, { replay: false });
  if (ev.type === "message") stopTyping(room, String(ev.user));
}

/** Puts a stored event in the room's log, ordered by seq, at most once. */
function insertEvent(room, ev, { replay, older = false }) {
  const seq = ev.seq;
  if (typeof seq !== "number" || room.els.has(seq)) return;
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
    // The display name, as on messages (the event's own sentence uses the user id).
    const who = ev.name || nameOf(ev.user);
    const text = ev.event === "join" ? `${who} joined the room` : ev.event === "leave" ? `${who} left the room` : ev.content;
    const li = el("li", "sys", text);
    li.dataset.seq = ev.seq;
    li.dataset.event = ev.event || "";
    li.dataset.user = String(ev.user);
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

// ------------------------------------------------------------------ history

function loadOlder() {
  const room = currentRoom();
  if (!room || !room.moreOlder || room.loadingOlder || !online() || room.oldest === null) return;
  room.loadingOlder = true;
  renderOlderButton();
  room.lib
    .history({ before: room.oldest, limit: PAGE })
    .then((page) => {
      const scroller = $("scroller");
      const keep = room.name === state.current ? scroller.scrollHeight - scroller.scrollTop : null;
      for (let i = page.messages.length - 1; i >= 0; i -= 1) insertEvent(room, page.messages[i], { replay: true, older: true });
      room.moreOlder = page.more && page.messages.length > 0;
      if (keep !== null) scroller.scrollTop = scroller.scrollHeight - keep;
    })
    .catch((err) => {
      if (err.code !== "closed") notice(`Could not load older messages: ${err.message || err.code}`, "warn");
    })
    .finally(() => {
      // Answered or failed, the next "Load older" may go (matched by id, so a failed page
      // never blocks the ones after it).
      room.loadingOlder = false;
      if (room.name === state.current) renderOlderButton();
    });
}

// ------------------------------------------------------------------ sending

function byteLength(s) {
  return new TextEncoder().encode(s).length;
}

function submitMessage() {
  const input = $("input");
  const content = input.value;
  const room = currentRoom();
  if (!room || room.readOnly || content.trim() === "") return;
  const max = state.maxContentBytes;
  if (byteLength(content) > max) {
    notice(`Message too long: at most ${max} bytes (this one is ${byteLength(content)}).`, "error");
    return;
  }
  const p = { content, li: null };
  p.li = renderPending(p);
  room.pendingList.append(p.li);
  input.value = "";
  autosize();
  scrollToBottom(true);
  transmit(room, p);
}

function transmit(room, p) {
  room.lib.send(p.content).then(
    (ack) => {
      p.li.remove();
      if (!room.els.has(ack.seq) && state.me) {
        // The ack came before our own copy: show it from what we sent; the copy is skipped.
        insertEvent(room, { type: "message", room: room.name, seq: ack.seq, user: state.me.user_id, name: state.me.name, content: p.content, id: ack.id, ts: new Date().toISOString() }, { replay: true });
      }
    },
    (err) => {
      if (err.code === "left" || err.code === "closed") return;
      failPending(room, p, err);
    },
  );
}

function renderPending(p) {
  const li = el("li", "msg mine pending");
  const meta = el("div", "meta");
  meta.append(el("span", "author", state.me ? state.me.name : "you"), el("span", "state"));
  li.append(meta, el("div", "text", p.content));
  return li;
}

function failPending(room, p, err) {
  p.li.classList.remove("pending");
  p.li.classList.add("failed");
  const st = p.li.querySelector(".state");
  st.textContent = `not sent: ${String(err.code).replace(/_/g, " ")} `;
  notice(err.code === "too_large" ? `Message too large for this server. (${err.message})` : `Message not sent: ${err.message || err.code}`, "error");
  const actions = el("span", "msg-actions");
  const retry = el("button", "link-btn", "retry");
  retry.type = "button";
  retry.addEventListener("click", () => {
    p.li.classList.add("pending");
    p.li.classList.remove("failed");
    st.textContent = "";
    transmit(room, p);
  });
  const drop = el("button", "link-btn", "discard");
  drop.type = "button";
  drop.addEventListener("click", () => p.li.remove());
  actions.append(retry, drop);
  st.append(actions);
}

// ------------------------------------------------------------------ typing

function onTyping(room, t) {
  const user = t.user;
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
  const who = room ? [...room.typing.keys()].map(nameOf) : [];
  let text = "";
  if (who.length === 1) text = `${who[0]} is typing…`;
  else if (who.length === 2) text = `${who[0]} and ${who[1]} are typing…`;
  else if (who.length > 2) text = `${who.length} people are typing…`;
  $("typing").textContent = text;
}

function onInput() {
  autosize();
  const room = currentRoom();
  if (room && room.lib && $("input").value !== "") room.lib.typing(); // throttled by the library
}

// ------------------------------------------------------------------ room list

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
    if (state.client) joinRoom(room);
  }
  renderRoomEntry(room);
  if (select) selectRoom(name);
  saveRooms();
  return room;
}

function leaveRoom(name) {
  const room = state.rooms.get(name);
  if (!room) return;
  if (room.lib) room.lib.leave().catch(() => {});
  removeRoom(room); // gone from the page at once
}

function removeRoom(room) {
  if (state.rooms.get(room.name) !== room) return;
  clearTyping(room);
  for (const off of room.offs) off();
  if (room.lib && (room.lib.joined || room.lib.pending)) room.lib.leave().catch(() => {});
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
  const joined = Boolean(room.lib && room.lib.joined);
  room.li.classList.toggle("joining", !joined);
  const users = room.li.querySelector(".room-users");
  users.textContent = joined || room.count ? String(room.count) : "…";
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
    const name = el("span", "member-name", nameOf(u));
    name.title = u;
    li.append(name);
    list.append(li);
  }
  if (!room.complete) list.append(el("li", "muted member-more", `${room.count} members (large room)`));
}

function renderOlderButton() {
  const room = currentRoom();
  const btn = $("load-older");
  btn.hidden = !(room && room.moreOlder);
  btn.textContent = room && room.loadingOlder ? "Loading…" : "Load older messages";
}

function updateComposer() {
  const room = currentRoom();
  const ok = Boolean(room) && !room.readOnly;
  $("input").disabled = !ok;
  $("send").disabled = !ok;
  $("composer").classList.toggle("read-only", Boolean(room && room.readOnly));
  $("input").placeholder = !room
    ? "Join a room to chat"
    : room.readOnly
      ? `Only the server posts in #${room.name}; you can read along`
      : room.lib && room.lib.joined
        ? `Message #${room.name}`
        : `Message #${room.name} (sent when back online)`;
}

function saveRooms() {
  try {
    sessionStorage.setItem("parley.rooms", JSON.stringify(state.order));
  } catch {
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
  state.everConnected = false;
  state.maxContentBytes = DEFAULT_MAX_CONTENT_BYTES;
  try {
    if (user) localStorage.setItem("parley.user", user);
  } catch {
    /* storage disabled */
  }
  const rooms = [];
  try {
    const saved = JSON.parse(sessionStorage.getItem("parley.rooms") || "[]");
    if (Array.isArray(saved)) for (const r of saved) if (typeof r === "string" && ROOM_RE.test(r)) rooms.push(r);
  } catch {
    /* ignore */
  }
  if (room && !rooms.includes(room)) rooms.push(room);
  for (const r of rooms) addRoom(r, false);
  selectRoom(room || rooms[0] || null);
  $("signin-submit").disabled = true;
  setConn("connecting", "connecting…");
  connect();
}

function signOut(reason, wantToken) {
  const client = state.client;
  state.client = null;
  for (const room of [...state.rooms.values()]) removeRoom(room);
  if (client) client.close();
  try {
    sessionStorage.removeItem("parley.rooms");
  } catch {
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
  } catch {
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
  $("conn-retry").addEventListener("click", retryNow);
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
    if (state.client && !online() && !state.holdReconnect) state.client.reconnect();
  });
  window.addEventListener("offline", () => {
    if (online()) state.client.reconnect();
  });
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "visible" && state.client && state.client.state === "connecting" && !state.holdReconnect) state.client.reconnect();
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
    if (state.client) state.client.reconnect();
  },
  /** While held, reconnect attempts fail at once (as if the network were down). */
  holdReconnect(on) {
    state.holdReconnect = Boolean(on);
    if (!on && state.client && !online()) state.client.reconnect();
  },
  /** A snapshot for tests and debugging. */
  status() {
    return {
      connected: online(),
      user: state.me ? state.me.user_id : null,
      current: state.current,
      rooms: [...state.rooms.values()].map((r) => ({
        name: r.name,
        joined: Boolean(r.lib && r.lib.joined),
        seq: r.lib ? r.lib.seq : 0,
        epoch: r.lib ? r.lib.epoch : null,
        count: r.count,
        members: [...r.members],
        pending: r.lib ? r.lib.pending : 0,
        loadingOlder: r.loadingOlder,
        moreOlder: r.moreOlder,
        readOnly: r.readOnly,
      })),
    };
  },
};

if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
else init();
