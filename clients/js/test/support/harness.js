// Test harness: a real `parley` process per test, HS256 tokens minted here, and waits that
// synchronise on events (each with a deadline, so that a missing event fails instead of hanging).

import { spawn } from "node:child_process";
import { createHmac } from "node:crypto";
import { mkdtempSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join, resolve, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import WebSocket from "ws";

const here = dirname(fileURLToPath(import.meta.url));
export const PARLEY_BIN = process.env.PARLEY_BIN
  ? resolve(process.env.PARLEY_BIN)
  : resolve(here, "../../../../target/debug/parley");
export const SECRET = "test-secret-that-is-at-least-32-bytes-long!";
export const WAIT_MS = 15000;

function b64url(data) {
  return Buffer.from(data).toString("base64url");
}

/** An HS256 JWT with `sub`, `name` and `exp` (now + ttlS), plus any extra claims. */
export function mintToken({ sub, name = sub, ttlS = 3600, secret = SECRET, ...extra }) {
  const header = b64url(JSON.stringify({ alg: "HS256", typ: "JWT" }));
  const exp = Math.floor(Date.now() / 1000) + ttlS;
  const payload = b64url(JSON.stringify({ sub, name, exp, ...extra }));
  const sig = createHmac("sha256", secret).update(`${header}.${payload}`).digest("base64url");
  return `${header}.${payload}.${sig}`;
}

export function freePort() {
  return new Promise((res, rej) => {
    const srv = createServer();
    srv.on("error", rej);
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address();
      srv.close(() => res(port));
    });
  });
}

/** Resolves when `fn()` is truthy, checking on every `emitter` event... or rejects after ms. */
export function deadline(promise, what, ms = WAIT_MS) {
  let timer;
  const timeout = new Promise((_, rej) => {
    timer = setTimeout(() => rej(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/** The next `event` from `emitter` whose arguments satisfy `pred`. */
export function next(emitter, event, pred = () => true, ms = WAIT_MS) {
  let off;
  const p = new Promise((res) => {
    off = emitter.on(event, (...args) => {
      if (pred(...args)) {
        off();
        res(args[0]);
      }
    });
  });
  return deadline(p, `${event} event`, ms).finally(() => off());
}

/** A value that is settled by the test when something it watches happens. */
export function signal() {
  let resolve;
  const promise = new Promise((r) => (resolve = r));
  return { promise, resolve };
}

/**
 * A running parley. `restart()` starts it again on the same port and database (after `kill()`);
 * `wipe()` deletes the database files (a new epoch for every room).
 */
export class Server {
  static async start({ jwt = true, args = [] } = {}) {
    const s = new Server();
    s.dir = mkdtempSync(join(tmpdir(), "parley-js-"));
    s.db = join(s.dir, "p.db");
    s.port = await freePort();
    s.jwt = jwt;
    s.args = args;
    await s._spawn();
    return s;
  }

  get url() {
    return `ws://127.0.0.1:${this.port}/ws`;
  }

  get httpUrl() {
    return `http://127.0.0.1:${this.port}`;
  }

  token(sub, opts = {}) {
    return mintToken({ sub, ...opts });
  }

  async _spawn() {
    const args = ["--bind", `127.0.0.1:${this.port}`, "--db", this.db, ...this.args];
    if (this.jwt) args.push("--jwt-secret", SECRET);
    const child = spawn(PARLEY_BIN, args, {
      stdio: ["ignore", "pipe", "pipe"],
      env: { ...process.env, RUST_LOG: process.env.RUST_LOG || "warn" },
    });
    this.child = child;
    this.log = "";
    const exited = new Promise((res) => child.once("exit", (code, sig) => res({ code, sig })));
    this.exited = exited;
    child.stdout.on("data", (d) => (this.log += d));
    child.stderr.on("data", (d) => (this.log += d));
    child.once("error", (e) => (this.log += `spawn error: ${e.message}\n`));
    // Ready when /healthz answers (the server logs nothing at warn level on start).
    const until = Date.now() + WAIT_MS;
    for (;;) {
      const state = await Promise.race([exited.then(() => "exited"), this._healthy()]);
      if (state === "exited") throw new Error(`parley exited at start (${PARLEY_BIN}):\n${this.log}`);
      if (state === true) return;
      if (Date.now() > until) throw new Error(`parley did not answer /healthz:\n${this.log}`);
      await new Promise((r) => setTimeout(r, 25));
    }
  }

  async _healthy() {
    try {
      const res = await fetch(`${this.httpUrl}/healthz`);
      return res.ok;
    } catch {
      return false;
    }
  }

  /** SIGKILL: no graceful shutdown, no close frames. */
  async kill() {
    if (!this.child || this.child.exitCode !== null || this.child.signalCode !== null) return;
    this.child.kill("SIGKILL");
    await this.exited;
  }

  async restart() {
    await this.kill();
    await this._spawn();
  }

  wipe() {
    for (const f of ["p.db", "p.db-wal", "p.db-shm"]) rmSync(join(this.dir, f), { force: true });
  }

  async stop() {
    await this.kill();
    rmSync(this.dir, { recursive: true, force: true });
  }
}

/**
 * The real `ws` WebSocket, remembering each socket the client opens, and able to "hold" the
 * network: while held, opening a socket fails at once, as when the network is down.
 */
export function trackedWebSocket() {
  const sockets = [];
  const ctl = { sockets, held: false };
  ctl.WebSocket = class TrackedWebSocket extends WebSocket {
    constructor(url, ...rest) {
      if (ctl.held) throw new Error("network held by the test");
      super(url, ...rest);
      sockets.push(this);
    }
  };
  return ctl;
}

/** Every message and system event a room delivers, in delivery order. */
export function record(room) {
  const events = [];
  room.on("message", (m) => events.push(m));
  room.on("system", (e) => events.push(e));
  return events;
}

/** Waits until `cond()` holds, re-checked whenever `room` delivers an event. */
export function until(emitters, cond, what, ms = WAIT_MS) {
  if (cond()) return Promise.resolve();
  const offs = [];
  const p = new Promise((res) => {
    const check = () => {
      if (cond()) res();
    };
    for (const [em, ev] of emitters) offs.push(em.on(ev, check));
  });
  return deadline(p, what, ms).finally(() => offs.forEach((off) => off()));
}
