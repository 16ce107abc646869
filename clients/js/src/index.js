// parley-client: a client for the parley chat server (docs/protocol.md, version 1.1).
// One ES module, no dependencies; runs in browsers and in Node (pass `WebSocket` there when the
// runtime has none). It keeps a connection up (backoff with jitter, heartbeats, token refresh),
// rejoins rooms after a reconnect with `since`/`epoch`, resends unacknowledged messages with the
// same id, and hands every room event to the listeners exactly once, in seq order.

const OPEN = 1; // WebSocket.OPEN
const DEFAULTS = {
  backoffBaseMs: 500,
  backoffMaxMs: 30000,
  connectTimeoutMs: 10000,
  typingIntervalMs: 2000,
  historyPageLimit: 200,
  retryUnavailableMs: 1000,
};
const TERMINAL = { 4001: "unauthorized", 4008: "rate_limited" };

/** An Error with the protocol's `code` (and the close code or retry hint when there is one). */
export class ParleyError extends Error {
  constructor(code, message, extra = {}) {
    super(message || code);
    this.name = "ParleyError";
    this.code = code;
    Object.assign(this, extra);
  }
}

class Emitter {
  constructor() {
    this._listeners = new Map();
  }
  /** Adds a listener; returns a function that removes it. */
  on(event, fn) {
    if (typeof fn !== "function") throw new TypeError("listener must be a function");
    let set = this._listeners.get(event);
    if (!set) this._listeners.set(event, (set = new Set()));
    set.add(fn);
    return () => this.off(event, fn);
  }
  off(event, fn) {
    const set = this._listeners.get(event);
    if (set) set.delete(fn);
    return this;
  }
  once(event, fn) {
    const off = this.on(event, (...args) => {
      off();
      fn(...args);
    });
    return off;
  }
  _emit(event, ...args) {
    const set = this._listeners.get(event);
    if (!set) return;
    for (const fn of [...set]) {
      try {
        fn(...args);
      } catch (e) {
        // A listener's bug must not break the client's state machine.
        Promise.reject(e);
      }
    }
  }
}

function byteLength(s) {
  return new TextEncoder().encode(s).length;
}

/** `exp` of a JWT, read without verifying (only to time a refresh); null when unreadable. */
function jwtExp(token) {
  try {
    const part = String(token).split(".")[1];
    const b64 = part.replace(/-/g, "+").replace(/_/g, "/");
    const text = typeof atob === "function" ? atob(b64 + "===".slice((b64.length + 3) % 4)) : null;
    if (text === null) return null;
    const exp = JSON.parse(text).exp;
    return typeof exp === "number" ? exp : null;
  } catch {
    return null;
  }
}

function makeIdSource() {
  const c = globalThis.crypto;
  if (c && typeof c.randomUUID === "function") return () => c.randomUUID();
  const prefix = Math.random().toString(36).slice(2, 10) + Date.now().toString(36);
  let n = 0;
  return () => `${prefix}-${++n}`;
}

/** A token bucket mirroring the server's, so the client does not get itself refused. */
class Bucket {
  constructor(rate, burst) {
    this.rate = rate;
    this.burst = burst;
    this.tokens = burst;
    this.at = Date.now();
  }
  _fill() {
    const now = Date.now();
    this.tokens = Math.min(this.burst, this.tokens + ((now - this.at) / 1000) * this.rate);
    this.at = now;
  }
  /** Takes a token, or returns how many ms until one is there. */
  take() {
    this._fill();
    if (this.tokens >= 1) {
      this.tokens -= 1;
      return 0;
    }
    return Math.ceil(((1 - this.tokens) / this.rate) * 1000) + 5;
  }
  /** After a refusal: empty, so that nothing goes out before the server has a token again. */
  drain() {
    this._fill();
    this.tokens = Math.min(this.tokens, 0);
  }
}

export class Parley extends Emitter {
  /**
   * @param {string} url  e.g. "wss://chat.example.com/ws"
   * @param {object} [options]  { token, user, name, WebSocket, ... } (see index.d.ts)
   */
  constructor(url, options = {}) {
    super();
    this.url = String(url);
    this.options = { ...DEFAULTS, ...options };
    this._WS = options.WebSocket || globalThis.WebSocket;
    if (typeof this._WS !== "function") {
      throw new TypeError("no WebSocket implementation: pass options.WebSocket (e.g. the `ws` package)");
    }
    this._newId = makeIdSource();
    this._rooms = new Map();
    this._pending = new Map(); // request id -> { kind, room, frame, resolve, reject, ... }
    this._outbox = []; // unacked sends, in send() order
    this._ws = null;
    this._state = "connecting";
    this._terminal = false;
    this._authed = false;
    this._attempt = 0;
    this._timers = new Set();
    this._reconnectTimer = null;
    this._heartbeatTimer = null;
    this._refreshTimer = null;
    this._connectTimer = null;
    this._lastFrameAt = 0;
    this._heartbeatMs = 25000;
    this.user = null; // { user_id, name }
    this.limits = null; // authenticated.limits (protocol 1.1)
    this.exp = null; // token expiry, unix seconds
    this._sendBucket = null;
    this._joinBucket = null;
    this._sendPausedUntil = 0;
    this._pumpTimer = null;
    this._names = new Map();
    this._connecting = false;
    // Connect on the next tick so that listeners added right after `new` see every event.
    this._later(0, () => this._connect());
  }

  /** "connecting" | "open" | "closed" */
  get state() {
    return this._state;
  }

  /** The room object for `name` (the same object every time). */
  room(name) {
    name = String(name);
    let room = this._rooms.get(name);
    if (!room) {
      room = new Room(this, name);
      this._rooms.set(name, room);
    }
    return room;
  }

  /** A user's display name as last seen on a message (or the user id). */
  displayName(userId) {
    return this._names.get(String(userId)) || String(userId);
  }

  /** Skips the backoff wait: drops the current socket (if any) and connects at once. */
  reconnect() {
    if (this._terminal) return;
    this._attempt = 0;
    if (this._ws) this._drop(4000, "reconnect requested");
    clearTimeout(this._reconnectTimer);
    this._reconnectTimer = null;
    this._connect();
  }

  /** Closes for good: no reconnect; pending requests are rejected with code "closed". */
  close() {
    if (this._terminal) return;
    this._finish(new ParleyError("closed", "the client was closed"), 1000);
  }

  // ---------------------------------------------------------------- connection

  _later(ms, fn) {
    const t = setTimeout(() => {
      this._timers.delete(t);
      fn();
    }, ms);
    this._timers.add(t);
    return t;
  }

  _setState(s) {
    if (this._state === s) return;
    this._state = s;
    this._emit("state", s);
  }

  async _token() {
    const t = this.options.token;
    if (typeof t === "function") return String(await t());
    return t == null ? null : String(t);
  }

  _wsUrl() {
    if (this.options.token != null || this.options.user == null) return this.url;
    const u = new URL(this.url);
    u.searchParams.set("user", String(this.options.user));
    if (this.options.name != null) u.searchParams.set("name", String(this.options.name));
    return u.toString();
  }

  async _connect() {
    if (this._terminal || this._ws || this._connecting) return;
    this._connecting = true;
    this._setState("connecting");
    let token;
    try {
      token = await this._token();
    } catch (e) {
      this._connecting = false;
      this._emit("error", new ParleyError("token", `getting a token failed: ${e && e.message ? e.message : e}`, { cause: e }));
      this._scheduleReconnect();
      return;
    }
    this._connecting = false;
    if (this._terminal || this._ws) return;
    let ws;
    try {
      ws = new this._WS(this._wsUrl());
    } catch (e) {
      this._emit("error", new ParleyError("connect", `cannot open a WebSocket: ${e && e.message ? e.message : e}`, { cause: e }));
      this._scheduleReconnect();
      return;
    }
    this._ws = ws;
    this._authed = false;
    this._preAuthError = null;
    this._tokenInUse = token;
    clearTimeout(this._connectTimer);
    // No `authenticated` in time (the open or the auth hangs): try again.
    this._connectTimer = setTimeout(() => {
      if (this._ws === ws && !this._authed) this._drop(4000, "connect timeout");
    }, this.options.connectTimeoutMs);
    ws.onopen = () => {
      if (this._ws !== ws) return;
      this._lastFrameAt = Date.now();
      if (token != null) this._sendRaw({ type: "auth", token });
      // Without a token: in jwt mode any frame but auth gets close 4001 at once, which is how
      // a token-less client learns that the server wants one; in anonymous mode it is a ping.
      else this._sendRaw({ type: "ping" });
    };
    ws.onmessage = (ev) => {
      if (this._ws !== ws) return;
      this._lastFrameAt = Date.now();
      let frame;
      try {
        frame = JSON.parse(typeof ev.data === "string" ? ev.data : String(ev.data));
      } catch {
        return;
      }
      if (frame && typeof frame === "object") this._onFrame(frame);
    };
    ws.onclose = (ev) => {
      if (this._ws !== ws) return;
      this._onClose(ev.code, ev.reason);
    };
    ws.onerror = () => {
      /* onclose follows */
    };
  }

  /** Forgets the socket and the per-connection state; returns it. */
  _detach() {
    const ws = this._ws;
    this._ws = null;
    this._authed = false;
    clearTimeout(this._connectTimer);
    clearInterval(this._heartbeatTimer);
    clearTimeout(this._refreshTimer);
    clearTimeout(this._pumpTimer);
    this._heartbeatTimer = this._refreshTimer = this._pumpTimer = null;
    if (ws) ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
    for (const room of this._rooms.values()) room._socketGone();
    for (const [id, p] of [...this._pending]) {
      // Joins and history requests are sent again on the next connection. A refresh is not
      // needed there (the new connection authenticates with a fresh token); a leave is done
      // (the connection that was in the room is gone); internal paging starts over.
      if (p.kind === "refresh") this._settle(id);
      else if (p.kind === "leave") this._settle(id).resolve({ room: p.room });
      else if (p.dropOnDisconnect) this._settle(id).reject(new ParleyError("disconnected", "the connection was lost"));
      else p.sent = false;
    }
    for (const s of this._outbox) {
      clearTimeout(s.timer);
      s.timer = null;
      s.inflight = false;
    }
    return ws;
  }

  /** Ends the socket without ending the client: the reconnect path runs. */
  _drop(code, reason) {
    const ws = this._detach();
    if (ws) {
      try {
        ws.close(code, reason);
      } catch {
        /* already closing */
      }
    }
    this._scheduleReconnect();
  }

  _onClose(code, reason) {
    const why = reason ? String(reason) : "";
    this._detach();
    if (code in TERMINAL || (code === 4011 && typeof this.options.token !== "function")) {
      const what = {
        4001: "the server refused the credentials",
        4008: "closed for sending too fast (rate-limit abuse)",
        4011: "the token expired and there is no way to get a new one",
      }[code];
      const detail = why || (code === 4001 && this._preAuthError) || "";
      const err = new ParleyError(code === 4011 ? "token_expired" : TERMINAL[code], `${what}${detail ? ": " + detail : ""}`, {
        closeCode: code,
      });
      this._finish(err, null);
      return;
    }
    if (code === 4011) this._attempt = 0; // a new token is all it takes
    this._scheduleReconnect();
  }

  _scheduleReconnect() {
    if (this._terminal) return;
    this._setState("connecting");
    clearTimeout(this._reconnectTimer);
    const { backoffBaseMs, backoffMaxMs } = this.options;
    const exp = Math.min(backoffMaxMs, backoffBaseMs * 2 ** Math.min(this._attempt, 16));
    // "Equal jitter": half fixed, half random, so that a crowd of clients spreads out.
    const delay = Math.round(exp / 2 + Math.random() * (exp / 2));
    this._attempt += 1;
    this._reconnectTimer = setTimeout(() => {
      this._reconnectTimer = null;
      this._connect();
    }, delay);
  }

  /** Terminal: no reconnect; every pending request is rejected with `err`. */
  _finish(err, closeCode) {
    this._terminal = true;
    clearTimeout(this._reconnectTimer);
    for (const t of this._timers) clearTimeout(t);
    this._timers.clear();
    const ws = this._detach();
    if (ws && closeCode !== null) {
      try {
        ws.close(closeCode, "bye");
      } catch {
        /* ignore */
      }
    }
    const pending = [...this._pending.values()];
    this._pending.clear();
    for (const p of pending) p.reject(err);
    const sends = this._outbox.splice(0);
    for (const s of sends) s.reject(err);
    for (const room of this._rooms.values()) room._joinWaiters(err);
    if (err.code !== "closed") this._emit("error", err);
    this._setState("closed");
  }

  _sendRaw(frame) {
    const ws = this._ws;
    if (!ws || ws.readyState !== OPEN) return false;
    ws.send(JSON.stringify(frame));
    return true;
  }

  _heartbeat() {
    clearInterval(this._heartbeatTimer);
    const every = Math.max(1000, this._heartbeatMs);
    this._heartbeatTimer = setInterval(() => {
      if (!this._ws || !this._authed) return;
      const idle = Date.now() - this._lastFrameAt;
      // The network went away without telling us: drop and resume.
      if (idle > every * 2) this._drop(4000, "heartbeat timeout");
      else if (idle > every * 0.8) this._sendRaw({ type: "ping", id: this._newId() });
    }, Math.round(every / 4));
  }

  _scheduleRefresh() {
    clearTimeout(this._refreshTimer);
    this._refreshTimer = null;
    if (typeof this.options.token !== "function" || typeof this.exp !== "number") return;
    const remaining = this.exp * 1000 - Date.now();
    // 60 s before expiry, or at 80% of the remaining life when that is shorter.
    const delay = Math.max(0, remaining - Math.min(60000, remaining * 0.2));
    this._refreshTimer = setTimeout(() => this._refresh(), delay);
  }

  async _refresh() {
    const ws = this._ws;
    if (!ws || !this._authed) return;
    let token;
    try {
      token = await this._token();
    } catch (e) {
      this._emit("error", new ParleyError("token", `getting a token failed: ${e && e.message ? e.message : e}`, { cause: e }));
      this._refreshTimer = setTimeout(() => this._refresh(), 5000);
      return;
    }
    if (this._ws !== ws || !this._authed) return;
    const id = this._newId();
    const exp = jwtExp(token);
    if (this._refreshId) this._settle(this._refreshId);
    this._refreshId = id;
    this._pending.set(id, {
      kind: "refresh",
      sent: true,
      resolve: (f) => {
        this.exp = typeof f.exp === "number" ? f.exp : exp;
        this._scheduleRefresh();
      },
      reject: (err) => this._emit("error", err),
    });
    this._sendRaw({ type: "refresh", token, id });
    // A 1.0 server sends no `refreshed`: go by the token's own exp.
    if (exp !== null) {
      this.exp = exp;
      this._scheduleRefresh();
    }
  }

  // ---------------------------------------------------------------- requests

  /** Registers a request and sends it when the socket is authenticated. */
  _request(kind, room, frame, extra = {}) {
    return new Promise((resolve, reject) => {
      if (this._terminal) {
        reject(new ParleyError("closed", "the client is closed"));
        return;
      }
      const id = this._newId();
      frame.id = id;
      const p = { kind, room, frame, resolve, reject, sent: false, ...extra };
      this._pending.set(id, p);
      this._transmit(id, p);
    });
  }

  _transmit(id, p) {
    if (!this._authed || p.sent) return;
    if (p.kind === "join") {
      const wait = this._joinBucket ? this._joinBucket.take() : 0;
      if (wait > 0) {
        p.timer = this._later(wait, () => this._transmit(id, p));
        return;
      }
    }
    if (p.kind === "history" || p.kind === "join" || p.kind === "leave") p.frame.id = id;
    p.sent = this._sendRaw(p.frame);
    this._sentCount = (this._sentCount || 0) + 1;
    p.order = this._sentCount; // for answers without an id (1.0 servers answer in order)
  }

  _settle(id) {
    const p = this._pending.get(id);
    if (p) {
      this._pending.delete(id);
      clearTimeout(p.timer);
    }
    return p;
  }

  /** Finds the pending request an answer belongs to: by id, else (1.0 servers) by room/kind. */
  _match(frame, kinds) {
    if (frame.id != null && this._pending.has(String(frame.id))) return String(frame.id);
    if (frame.id != null) return null;
    for (const [id, p] of this._pending) {
      if (p.sent && kinds.includes(p.kind) && (frame.room === undefined || p.room === frame.room)) return id;
    }
    return null;
  }

  // ---------------------------------------------------------------- sends

  _queueSend(room, content) {
    return new Promise((resolve, reject) => {
      const s = { id: this._newId(), room, content, resolve, reject, inflight: false, timer: null };
      this._outbox.push(s);
      this._pump();
    });
  }

  /** Puts unacked sends on the wire, in order, within the send rate. */
  _pump() {
    clearTimeout(this._pumpTimer);
    this._pumpTimer = null;
    if (!this._authed) return;
    const now = Date.now();
    if (this._sendPausedUntil > now) {
      this._pumpTimer = setTimeout(() => this._pump(), this._sendPausedUntil - now);
      return;
    }
    for (const s of this._outbox) {
      if (s.inflight || s.timer || !s.room._joined) continue;
      const wait = this._sendBucket ? this._sendBucket.take() : 0;
      if (wait > 0) {
        this._pumpTimer = setTimeout(() => this._pump(), wait);
        return;
      }
      s.inflight = this._sendRaw({ type: "send", room: s.room.name, content: s.content, id: s.id });
    }
  }

  _sendDone(id, result) {
    const i = this._outbox.findIndex((s) => s.id === id);
    if (i < 0) return false;
    const [s] = this._outbox.splice(i, 1);
    clearTimeout(s.timer);
    s.resolve(result);
    return true;
  }

  _sendFailed(s, err) {
    const i = this._outbox.indexOf(s);
    if (i >= 0) this._outbox.splice(i, 1);
    clearTimeout(s.timer);
    s.reject(err);
  }

  // ---------------------------------------------------------------- frames

  _onFrame(f) {
    switch (f.type) {
      case "authenticated":
        return this._onAuthenticated(f);
      case "joined":
      case "message":
      case "system":
      case "typing": {
        const room = this._rooms.get(f.room);
        if ((f.type === "message" || f.type === "system") && f.user != null && f.name) {
          this._names.set(String(f.user), String(f.name));
        }
        if (f.type === "joined") return this._onJoined(f, room);
        if (room) room._onEvent(f);
        return undefined;
      }
      case "left":
        return this._onLeft(f);
      case "ack":
        return this._onAck(f);
      case "history":
        return this._onHistory(f);
      case "refreshed": {
        const id = this._match(f, ["refresh"]);
        const p = id && this._settle(id);
        if (p) p.resolve(f);
        else if (typeof f.exp === "number") {
          this.exp = f.exp;
          this._scheduleRefresh();
        }
        return undefined;
      }
      case "pong":
        return undefined;
      case "error":
        return this._onError(f);
      default:
        return undefined;
    }
  }

  _onAuthenticated(f) {
    this._authed = true;
    this._attempt = 0;
    clearTimeout(this._connectTimer);
    this.user = { user_id: String(f.user_id), name: String(f.name || f.user_id) };
    this._names.set(this.user.user_id, this.user.name);
    if (typeof f.heartbeat_ms === "number" && f.heartbeat_ms > 0) this._heartbeatMs = f.heartbeat_ms;
    this.limits = f.limits && typeof f.limits === "object" ? f.limits : null;
    const l = this.limits || {};
    // A 1.0 server does not announce its limits: assume the documented defaults (10/s, burst
    // 20) rather than a flood of refusals that would count towards close 4008.
    this._sendBucket = l.send_rate > 0 ? new Bucket(l.send_rate, Math.max(1, l.send_burst || 1)) : new Bucket(10, 20);
    this._joinBucket = l.join_rate > 0 ? new Bucket(l.join_rate, Math.max(1, l.join_burst || 1)) : null;
    this._sendPausedUntil = 0;
    this.exp = typeof f.exp === "number" ? f.exp : jwtExp(this._tokenInUse);
    this._heartbeat();
    this._scheduleRefresh();
    this._setState("open");
    this._emit("authenticated", { user_id: this.user.user_id, name: this.user.name, limits: this.limits, exp: this.exp });
    // Rooms first (their joins carry since/epoch), then whatever else was waiting.
    for (const room of this._rooms.values()) room._rejoin();
    for (const [id, p] of this._pending) if (p.kind !== "join") this._transmit(id, p);
  }

  _onJoined(f, room) {
    const id = this._match(f, ["join"]);
    const p = id ? this._settle(id) : null;
    if (!room || !room._want) {
      // Left (or never wanted) while the join was in flight.
      if (p) p.reject(new ParleyError("left", "left before the join completed"));
      this._sendRaw({ type: "leave", room: f.room, id: this._newId() });
      return;
    }
    if (room._joinId === id) room._joinId = null;
    room._onJoined(f, p);
    this._pump();
  }

  _onLeft(f) {
    const id = this._match(f, ["leave"]);
    const p = id ? this._settle(id) : null;
    const room = this._rooms.get(f.room);
    if (p) p.resolve({ room: f.room });
    if (!room) return;
    if (f.reason || (!p && room._want)) {
      // Unprompted: the server took us out (e.g. a refreshed token no longer allows the room).
      const err = new ParleyError(String(f.reason || "left"), `removed from ${room.name}${f.reason ? ": " + f.reason : ""}`);
      room._kicked(err, f);
    } else if (!room._want) {
      room._joined = false;
    }
  }

  _onAck(f) {
    const id = f.id != null ? String(f.id) : null;
    if (id === null) return;
    this._sendDone(id, { seq: f.seq, id, room: f.room, duplicate: f.duplicate === true });
  }

  _onHistory(f) {
    const id = this._match(f, ["history"]);
    const p = id ? this._settle(id) : null;
    if (!p) return;
    p.resolve({ messages: Array.isArray(f.messages) ? f.messages : [], more: f.more === true });
  }

  _onError(f) {
    const code = String(f.code || "error");
    if (!this._authed) {
      // Before `authenticated` an error means the credentials were refused; close 4001
      // follows, and its terminal error carries this message.
      this._preAuthError = f.message ? String(f.message) : code;
      return;
    }
    const err = new ParleyError(code, f.message ? String(f.message) : code, {
      room: f.room,
      id: f.id,
      retryAfterMs: typeof f.retry_after_ms === "number" ? f.retry_after_ms : undefined,
    });
    const id = f.id != null ? String(f.id) : null;
    const send = id !== null ? this._outbox.find((s) => s.id === id) : null;
    if (send) return this._onSendError(send, err);
    let key = id !== null && this._pending.has(id) ? id : null;
    if (key === null && id === null) {
      // A 1.0 server does not echo ids. It answers joins, leaves and history requests one
      // after the other, in the order they were sent: the error is the oldest unanswered one's
      // (of its room, when it names one).
      let best = null;
      for (const [k, p] of this._pending) {
        if (!p.sent || p.kind === "refresh" || (f.room !== undefined && p.room !== f.room)) continue;
        if (best === null || p.order < this._pending.get(best).order) best = k;
      }
      key = best;
    }
    const p = key !== null ? this._pending.get(key) : null;
    if (!p) {
      this._emit("error", err);
      return;
    }
    if (code === "rate_limited" || code === "unavailable") {
      // Not done: try the same request again after the server's hint.
      const wait = code === "rate_limited" ? Math.max(1, err.retryAfterMs ?? 1000) : this.options.retryUnavailableMs;
      p.sent = false;
      clearTimeout(p.timer);
      p.timer = this._later(wait, () => {
        p.timer = null;
        if (this._pending.get(key) === p) this._transmit(key, p);
      });
      return;
    }
    if (p.kind === "join" && code === "bad_request" && /already/i.test(err.message)) {
      return; // the `joined` of the earlier join is on its way
    }
    this._settle(key);
    if (p.kind === "join" && p.room) this._rooms.get(p.room)?._joinFailed(err);
    p.reject(err);
  }

  _onSendError(s, err) {
    switch (err.code) {
      case "rate_limited": {
        const wait = Math.max(1, err.retryAfterMs ?? 1000);
        s.inflight = false;
        this._sendPausedUntil = Math.max(this._sendPausedUntil, Date.now() + wait);
        if (this._sendBucket) this._sendBucket.drain();
        this._pump();
        return;
      }
      case "unavailable":
        s.inflight = false;
        clearTimeout(s.timer);
        s.timer = this._later(this.options.retryUnavailableMs, () => {
          s.timer = null;
          this._pump();
        });
        return;
      case "not_joined":
        // A rejoin is under way (or the room was taken away): sent again after `joined`.
        s.inflight = false;
        if (!s.room._want) this._sendFailed(s, err);
        return;
      default:
        this._sendFailed(s, err);
    }
  }
}

class Room extends Emitter {
  constructor(client, name) {
    super();
    this.client = client;
    this.name = name;
    this._want = false; // the app wants to be in the room
    this._joined = false; // `joined` on the current socket
    this._joinId = null;
    this._waiters = []; // join() callers waiting for `joined`
    this.epoch = null;
    this.seq = 0; // every event up to here was delivered
    this._head = 0; // joined.seq of the current join
    this._catchingUp = false; // paging forward after a truncated resume
    this._pageGen = 0; // bumped when a socket goes, so that an old paging loop stops
    this._buffer = new Map(); // live events that arrived while catching up
    this._members = new Set();
    this._usersKnown = true;
    this.userCount = 0;
    this._lastTyping = 0;
    this._info = null;
  }

  /** Joined on the current connection. */
  get joined() {
    return this._joined;
  }

  /** The current member list (user ids, sorted). */
  get members() {
    return [...this._members].sort();
  }

  /** Unacknowledged sends for this room. */
  get pending() {
    return this.client._outbox.filter((s) => s.room === this).length;
  }

  /** Joins (and stays joined across reconnects); resolves with the `joined` frame's data. */
  join() {
    if (this.client._terminal) return Promise.reject(new ParleyError("closed", "the client is closed"));
    if (this._want && this._joined) return Promise.resolve(this._info);
    return new Promise((resolve, reject) => {
      this._waiters.push({ resolve, reject });
      if (!this._want) {
        this._want = true;
        this._rejoin();
      }
    });
  }

  /** Posts `content`; resolves with `{ seq, id, duplicate }` once stored. */
  send(content) {
    const c = this.client;
    if (c._terminal) return Promise.reject(new ParleyError("closed", "the client is closed"));
    if (typeof content !== "string" || content.length === 0) {
      return Promise.reject(new ParleyError("bad_request", "content must be a non-empty string"));
    }
    if (!this._want) return Promise.reject(new ParleyError("not_joined", `join ${this.name} before sending`));
    const max = c.limits && c.limits.max_content_bytes;
    if (typeof max === "number" && byteLength(content) > max) {
      return Promise.reject(new ParleyError("too_large", `content is over ${max} bytes`));
    }
    return c._queueSend(this, content);
  }

  /** One page of the room's log: `{ before }`, `{ after }`, both, or neither (the newest). */
  history({ before, after, limit } = {}) {
    const frame = { type: "history", room: this.name };
    if (before != null) frame.before = before;
    if (after != null) frame.after = after;
    if (limit != null) frame.limit = limit;
    return this.client._request("history", this.name, frame);
  }

  /** Tells the others you are typing; throttled (at most one notice per interval). */
  typing() {
    const now = Date.now();
    if (!this._joined || now - this._lastTyping < this.client.options.typingIntervalMs) return false;
    if (this._info && this._info.typing === false) return false; // the room takes none
    this._lastTyping = now;
    return this.client._sendRaw({ type: "typing", room: this.name });
  }

  /** Leaves; unacked sends of the room are rejected with code "left". */
  leave() {
    const c = this.client;
    const wasJoined = this._joined;
    const joining = this._joinId !== null && c._pending.has(this._joinId);
    this._want = false;
    this._dropSends(new ParleyError("left", `left ${this.name}`));
    this._joinWaiters(new ParleyError("left", "left before the join completed"));
    if (joining) {
      c._settle(this._joinId)?.reject(new ParleyError("left", "left before the join completed"));
    }
    this._reset(null);
    this._joinId = null;
    if (!c._authed || (!wasJoined && !joining)) {
      this._joined = false;
      return Promise.resolve({ room: this.name });
    }
    if (joining) {
      // The `joined` still on its way is answered with a leave (see _onJoined).
      this._joined = false;
      return Promise.resolve({ room: this.name });
    }
    return c._request("leave", this.name, { type: "leave", room: this.name }).finally(() => {
      this._joined = false;
    });
  }

  // ---------------------------------------------------------------- internals

  _rejoin() {
    const c = this.client;
    if (!this._want || this._joined || !c._authed) return;
    if (this._joinId !== null && c._pending.has(this._joinId)) {
      c._transmit(this._joinId, c._pending.get(this._joinId));
      return;
    }
    const frame = { type: "join", room: this.name };
    if (this.epoch !== null) {
      frame.since = this.seq;
      frame.epoch = this.epoch;
    }
    const p = c._request("join", this.name, frame);
    this._joinId = frame.id;
    // The app hears about the outcome through join() waiters.
    p.then(
      () => {},
      () => {},
    );
  }

  _joinWaiters(err, info) {
    const waiters = this._waiters.splice(0);
    for (const w of waiters) {
      if (err) w.reject(err);
      else w.resolve(info);
    }
  }

  _joinFailed(err) {
    this._want = false;
    this._joinId = null;
    this._dropSends(err);
    this._joinWaiters(err);
  }

  _dropSends(err) {
    for (const s of [...this.client._outbox]) if (s.room === this) this.client._sendFailed(s, err);
  }

  _reset(epoch) {
    this._pageGen += 1;
    this.epoch = epoch;
    this.seq = 0;
    this._head = 0;
    this._catchingUp = false;
    this._buffer.clear();
  }

  _socketGone() {
    this._pageGen += 1;
    this._joined = false;
    this._catchingUp = false;
    this._buffer.clear();
  }

  _kicked(err, frame) {
    this._want = false;
    this._joined = false;
    this._joinId = null;
    this._dropSends(err);
    this._joinWaiters(err);
    this._reset(null);
    this._emit("left", { room: this.name, reason: frame.reason ?? null });
  }

  _onJoined(f, pending) {
    const history = Array.isArray(f.history) ? f.history : [];
    const resumed = this.epoch !== null && f.recovered === true && f.epoch === this.epoch;
    if (this.epoch !== null && !resumed) {
      // The log could not be resumed (new epoch, or since too old): start the room afresh.
      const previousEpoch = this.epoch;
      this._reset(f.epoch);
      this._emit("reset", { room: this.name, epoch: f.epoch, previousEpoch, recovered: false, seq: f.seq });
    }
    this.epoch = f.epoch;
    this._joined = true;
    this._head = typeof f.seq === "number" ? f.seq : 0;
    if (!resumed) {
      // A fresh start: deliver the history given and everything after it.
      this.seq = history.length ? history[0].seq - 1 : this._head;
    }
    if (Array.isArray(f.users)) {
      this._usersKnown = true;
      this._members = new Set(f.users.map(String));
    } else {
      this._usersKnown = false;
      this._members = new Set();
    }
    this.userCount = typeof f.user_count === "number" ? f.user_count : this._members.size;
    this._catchingUp = resumed && f.truncated === true;
    this._info = {
      room: this.name,
      seq: f.seq,
      epoch: f.epoch,
      users: Array.isArray(f.users) ? f.users : null,
      user_count: this.userCount,
      history,
      truncated: f.truncated === true,
      recovered: f.recovered,
      // The room's policy; the server names only what departs from the default.
      publish: f.publish === "api" ? "api" : "members",
      announce: f.announce !== false,
      presence: f.presence !== false,
      typing: f.typing !== false,
    };
    this._emitPresence();
    for (const ev of history) this._deliver(ev);
    if (pending) pending.resolve(this._info);
    this._joinWaiters(null, this._info);
    this._emit("joined", this._info);
    if (this._catchingUp) this._pageForward();
  }

  /** After a truncated resume: pages with `after` until caught up, then flushes what came live. */
  async _pageForward() {
    const c = this.client;
    const gen = this._pageGen;
    while (this._catchingUp && this._joined) {
      let page;
      try {
        const frame = { type: "history", room: this.name, after: this.seq, limit: c.options.historyPageLimit };
        page = await c._request("history", this.name, frame, { dropOnDisconnect: true });
      } catch (e) {
        if (gen !== this._pageGen || c._terminal) return; // the rejoin resumes from this.seq
        c._emit("error", e);
        c._drop(4000, "paging forward failed");
        return;
      }
      if (gen !== this._pageGen || !this._catchingUp) return;
      for (const ev of page.messages) this._deliver(ev);
      if (!page.more || page.messages.length === 0 || this.seq >= this._head) break;
    }
    if (!this._catchingUp) return;
    this._catchingUp = false;
    const live = [...this._buffer.values()].sort((a, b) => a.seq - b.seq);
    this._buffer.clear();
    for (const ev of live) this._deliver(ev);
  }

  _onEvent(f) {
    if (f.type === "typing") {
      if (!this._joined || (this.client.user && String(f.user) === this.client.user.user_id)) return;
      this._emit("typing", { room: this.name, user: String(f.user), name: this.client.displayName(f.user) });
      return;
    }
    if (!this._joined) return;
    if (this._catchingUp && typeof f.seq === "number" && f.seq > this._head) {
      this._buffer.set(f.seq, f);
      return;
    }
    this._deliver(f);
  }

  /** The one path every sequenced event takes: at most once, in seq order, per epoch. */
  _deliver(ev) {
    if (typeof ev.seq !== "number" || ev.seq <= this.seq) return;
    this.seq = ev.seq;
    const c = this.client;
    if (ev.type === "message") {
      if (ev.user != null) c._names.set(String(ev.user), String(ev.name || ev.user));
      // An own message whose ack was lost with the connection: it is stored, so settle it.
      if (ev.id != null && c.user && String(ev.user) === c.user.user_id) {
        c._sendDone(String(ev.id), { seq: ev.seq, id: String(ev.id), room: this.name, duplicate: false });
      }
      this._emit("message", ev);
    } else if (ev.type === "system") {
      const user = String(ev.user);
      if (ev.name) c._names.set(user, String(ev.name));
      let changed = false;
      // `joined.users` is the room at `joined.seq`: events up to it (history, paging forward)
      // are already in it, and replaying them would make members flicker.
      if (ev.seq <= this._head) {
        this._emit("system", ev);
        return;
      }
      if (ev.event === "join") {
        if (this._usersKnown && !this._members.has(user)) changed = this._members.add(user) && true;
        if (!this._usersKnown) this.userCount += 1;
      } else if (ev.event === "leave") {
        if (this._usersKnown) changed = this._members.delete(user);
        if (!this._usersKnown) this.userCount = Math.max(0, this.userCount - 1);
      }
      if (this._usersKnown) this.userCount = this._members.size;
      this._emit("system", ev);
      if (changed) this._emitPresence();
    }
  }

  _emitPresence() {
    this._emit("presence", this.members, { count: this.userCount, complete: this._usersKnown });
  }
}

export { Room };
export default Parley;
