// parley-client against a real parley process (PARLEY_BIN, default ../../target/debug/parley).

import { test } from "node:test";
import assert from "node:assert/strict";
import WebSocket from "ws";
import { Parley, ParleyError } from "parley-client";
import { Server, next, record, signal, trackedWebSocket, until, deadline } from "./support/harness.js";

const FAST = { backoffBaseMs: 50, backoffMaxMs: 500 };

function client(server, sub, extra = {}) {
  return new Parley(server.url, { token: async () => server.token(sub), WebSocket, ...FAST, ...extra });
}

/** Seqs strictly increasing by one, each content once. */
function assertContiguous(events, what) {
  for (let i = 1; i < events.length; i += 1) {
    assert.equal(events[i].seq, events[i - 1].seq + 1, `${what}: seq ${events[i - 1].seq} then ${events[i].seq}`);
  }
}

test("join, send, ack; the message arrives once; history pages back to it", async (t) => {
  const server = await Server.start();
  t.after(() => server.stop());
  const alice = client(server, "alice", { token: async () => server.token("alice", { name: "Alice" }) });
  t.after(() => alice.close());
  const states = [];
  alice.on("state", (s) => states.push(s));
  const room = alice.room("general");
  assert.equal(alice.room("general"), room, "one object per room name");
  const events = record(room);
  const joined = await deadline(room.join(), "joined");
  assert.equal(joined.room, "general");
  assert.equal(typeof joined.epoch, "string");
  assert.deepEqual(joined.users, ["alice"]);
  assert.equal(alice.state, "open");
  assert.equal(alice.user.name, "Alice");
  assert.deepEqual(room.members, ["alice"]);

  const ack = await deadline(room.send("hello"), "ack");
  assert.equal(typeof ack.seq, "number");
  assert.equal(ack.duplicate, false);
  await until([[room, "message"]], () => events.some((e) => e.type === "message"), "own message");
  const mine = events.filter((e) => e.type === "message");
  assert.equal(mine.length, 1);
  assert.equal(mine[0].content, "hello");
  assert.equal(mine[0].seq, ack.seq);
  assert.equal(mine[0].name, "Alice");
  assert.equal(mine[0].id, ack.id, "the message carries the id the client gave it");
  assertContiguous(events, "alice");

  const page = await deadline(room.history({ before: ack.seq + 1, limit: 10 }), "history");
  assert.ok(page.messages.some((m) => m.seq === ack.seq && m.content === "hello"));
  assert.equal(typeof page.more, "boolean");

  // Bad input is refused at once, never hangs.
  await assert.rejects(room.send(""), (e) => e instanceof ParleyError && e.code === "bad_request");
  await assert.rejects(alice.room("elsewhere").send("x"), (e) => e.code === "not_joined");
  await assert.rejects(deadline(room.history({ limit: 1000 }), "history error"), (e) => e.code === "bad_request");
  await assert.rejects(deadline(alice.room("bad name!").join(), "join error"), (e) => e.code === "bad_request");
  assert.deepEqual(states, ["open"]);

  await deadline(room.leave(), "left");
  assert.equal(room.joined, false);
  alice.close();
  assert.equal(alice.state, "closed");
});

test("server SIGKILLed and restarted with sends pending: each acked once, each seen once, in order", async (t) => {
  const server = await Server.start();
  t.after(() => server.stop());
  const alice = client(server, "alice");
  t.after(() => alice.close());
  const room = alice.room("durable");
  const events = record(room);
  await deadline(room.join(), "joined");

  const N = 40;
  const acks = new Map();
  const firstAck = signal();
  const sends = [];
  for (let i = 0; i < N; i += 1) {
    const content = `m${i}`;
    sends.push(
      room.send(content).then((ack) => {
        assert.ok(!acks.has(content), `${content} resolved twice`);
        acks.set(content, ack);
        firstAck.resolve();
        return ack;
      }),
    );
  }
  await deadline(firstAck.promise, "a first ack");
  const ackedBeforeKill = acks.size;
  await server.kill();
  assert.ok(room.pending > 0, "some sends were still unacked when the server died");
  const reopened = next(alice, "state", (s) => s === "open");
  await server.restart();
  await reopened;
  const results = await deadline(Promise.all(sends), "every send to be acked");
  assert.equal(acks.size, N);
  assert.ok(ackedBeforeKill < N);
  const seqs = new Set(results.map((a) => a.seq));
  assert.equal(seqs.size, N, "distinct seqs");

  await until([[room, "message"]], () => events.filter((e) => e.type === "message").length >= N, "all messages");
  const msgs = events.filter((e) => e.type === "message");
  assert.deepEqual(
    msgs.map((m) => m.content).sort(),
    Array.from({ length: N }, (_, i) => `m${i}`).sort(),
    "each message delivered exactly once",
  );
  for (const m of msgs) assert.equal(acks.get(m.content).seq, m.seq, "the ack's seq is the message's");
  assertContiguous(events, "alice's log");

  // The server stored each exactly once.
  const page = await deadline(room.history({ limit: 200 }), "history");
  const stored = page.messages.filter((m) => m.type === "message").map((m) => m.content);
  assert.equal(stored.length, N);
  assert.equal(new Set(stored).size, N);
});

test("a resumed room with more missed than max_replay pages forward, exactly once, in order", async (t) => {
  const server = await Server.start({ args: ["--set", "history.max_replay=5"] });
  t.after(() => server.stop());
  const net = trackedWebSocket();
  const bob = client(server, "bob", { WebSocket: net.WebSocket, historyPageLimit: 7 });
  const alice = client(server, "alice");
  t.after(() => {
    bob.close();
    alice.close();
  });
  const bobRoom = bob.room("busy");
  const events = record(bobRoom);
  await deadline(bobRoom.join(), "bob joined");
  const aliceRoom = alice.room("busy");
  await deadline(aliceRoom.join(), "alice joined");

  // Bob's network goes away; alice posts 30 messages.
  net.held = true;
  const down = next(bob, "state", (s) => s === "connecting");
  net.sockets.at(-1).terminate();
  await down;
  for (let i = 0; i < 30; i += 1) await deadline(aliceRoom.send(`while away ${i}`), "alice's ack");
  assert.equal(events.filter((e) => e.type === "message").length, 0);

  net.held = false;
  bob.reconnect();
  // Alice keeps posting while bob pages forward: those arrive live and in the pages too.
  const during = Array.from({ length: 5 }, (_, i) => aliceRoom.send(`during ${i}`));
  await deadline(Promise.all(during), "alice's acks");
  await until([[bobRoom, "message"]], () => events.filter((e) => e.type === "message").length >= 35, "bob to catch up");
  await deadline(aliceRoom.send("live after"), "ack");
  await until([[bobRoom, "message"]], () => events.some((e) => e.content === "live after"), "the live message");
  const contents = events.filter((e) => e.type === "message").map((e) => e.content);
  assert.deepEqual(contents, [
    ...Array.from({ length: 30 }, (_, i) => `while away ${i}`),
    ...Array.from({ length: 5 }, (_, i) => `during ${i}`),
    "live after",
  ]);
  assertContiguous(events, "bob's log");
});

test("a new epoch (database lost) emits reset and starts the room over", async (t) => {
  const server = await Server.start();
  t.after(() => server.stop());
  const alice = client(server, "alice");
  t.after(() => alice.close());
  const room = alice.room("fragile");
  const events = record(room);
  const first = await deadline(room.join(), "joined");
  await deadline(room.send("before the loss"), "ack");
  await until([[room, "message"]], () => events.some((e) => e.content === "before the loss"), "the message");
  const resets = [];
  room.on("reset", (info) => resets.push(info));

  await server.kill();
  server.wipe();
  const reset = next(room, "reset");
  await server.restart();
  const info = await reset;
  assert.equal(info.previousEpoch, first.epoch);
  assert.notEqual(info.epoch, first.epoch);
  assert.equal(room.epoch, info.epoch);
  const ack = await deadline(room.send("after the loss"), "ack after reset");
  assert.ok(ack.seq < events.at(-1).seq + 5, "the new log starts over");
  await until([[room, "message"]], () => events.some((e) => e.content === "after the loss"), "the new message");
  assert.equal(resets.length, 1, "one reset");
  // After the reset the deliveries start again from the new log, in order.
  const after = events.slice(events.findIndex((e) => e.content === "before the loss") + 1);
  assert.ok(after.length >= 1);
  assertContiguous(after, "the new epoch's events");
});

test("close 4008 (rate-limit abuse) is terminal: error event, state closed, no reconnect", async (t) => {
  const server = await Server.start({
    args: ["--set", "limits.send_rate=1", "--set", "limits.send_burst=1", "--set", "limits.abuse_refusals=3"],
  });
  t.after(() => server.stop());
  const net = trackedWebSocket();
  const alice = client(server, "alice", { WebSocket: net.WebSocket, backoffBaseMs: 10 });
  t.after(() => alice.close());
  const room = alice.room("spam");
  await deadline(room.join(), "joined");
  const errored = next(alice, "error", (e) => e.closeCode !== undefined);
  const closed = next(alice, "state", (s) => s === "closed");
  // A pending send that the terminal close must reject, not leave hanging.
  const pending = room.send("queued behind the flood");
  // Flood raw sends on the client's own socket (the client itself paces its sends).
  const ws = net.sockets.at(-1);
  for (let i = 0; i < 10; i += 1) ws.send(JSON.stringify({ type: "send", room: "spam", content: `flood ${i}`, id: `f${i}` }));
  const err = await errored;
  assert.equal(err.closeCode, 4008);
  assert.equal(err.code, "rate_limited");
  await closed;
  // It settles either way, never hangs: acked when it reached the server ahead of the flood
  // (the server answers every earlier request before the 4008 close), rejected otherwise.
  const outcome = await deadline(
    pending.then((ack) => ({ ack }), (err) => ({ err })),
    "the pending send to settle",
  );
  if (outcome.ack) assert.equal(typeof outcome.ack.seq, "number");
  else assert.ok(outcome.err.closeCode === 4008 || outcome.err.code === "rate_limited", String(outcome.err));
  await assert.rejects(room.send("after"), (e) => e.code === "closed");
  // With a 10 ms backoff a reconnect loop would have opened sockets by now.
  await new Promise((r) => setTimeout(r, 300));
  assert.equal(net.sockets.length, 1, "no reconnect after 4008");
  assert.equal(alice.state, "closed");
});

test("close 4001 (bad token) is terminal", async (t) => {
  const server = await Server.start();
  t.after(() => server.stop());
  const net = trackedWebSocket();
  const c = new Parley(server.url, { token: "not-a-jwt", WebSocket: net.WebSocket, backoffBaseMs: 10 });
  t.after(() => c.close());
  const joining = c.room("general").join();
  const err = await next(c, "error");
  assert.match(err.message, /refused/);
  assert.equal(err.closeCode, 4001);
  assert.equal(err.code, "unauthorized");
  await assert.rejects(deadline(joining, "the join to settle"), (e) => e.closeCode === 4001);
  await new Promise((r) => setTimeout(r, 200));
  assert.equal(c.state, "closed");
  assert.equal(net.sockets.length, 1);
});

test("the client paces its sends to the announced limits instead of getting refused", async (t) => {
  const server = await Server.start({
    args: ["--set", "limits.send_rate=8", "--set", "limits.send_burst=2", "--set", "limits.abuse_refusals=3"],
  });
  t.after(() => server.stop());
  const alice = client(server, "alice");
  t.after(() => alice.close());
  const room = alice.room("paced");
  await deadline(room.join(), "joined");
  if (!alice.limits) {
    t.skip("this server does not announce limits (protocol 1.0)");
    return;
  }
  const errors = [];
  alice.on("error", (e) => errors.push(e));
  const acks = await deadline(Promise.all(Array.from({ length: 10 }, (_, i) => room.send(`p${i}`))), "10 acks");
  assert.equal(new Set(acks.map((a) => a.seq)).size, 10);
  assert.equal(alice.state, "open", "not closed for abuse");
  assert.deepEqual(errors, []);
});

test("token refresh before expiry keeps one connection past several short token lifetimes", async (t) => {
  const server = await Server.start();
  t.after(() => server.stop());
  const net = trackedWebSocket();
  let minted = 0;
  const mints = [];
  const minted3 = signal();
  const alice = new Parley(server.url, {
    token: async () => {
      minted += 1;
      mints.push(Date.now());
      if (minted >= 3 && Date.now() / 1000 > firstExp) minted3.resolve();
      return server.token("alice", { ttlS: 3 });
    },
    WebSocket: net.WebSocket,
    ...FAST,
  });
  let firstExp = Infinity;
  t.after(() => alice.close());
  const states = [];
  alice.on("state", (s) => states.push(s));
  const room = alice.room("clock");
  await deadline(room.join(), "joined");
  firstExp = alice.exp;
  assert.equal(typeof firstExp, "number");
  // At least two refreshes, and the first token has expired (the server closes with 4011 at
  // exp when no refresh came).
  await deadline(minted3.promise, "two refreshes and the first token's expiry", 12000);
  const ack = await deadline(room.send("still here"), "an ack after the first token expired");
  assert.equal(typeof ack.seq, "number");
  assert.equal(net.sockets.length, 1, "the same connection throughout");
  assert.deepEqual(states, ["open"], "never reconnected");
  assert.ok(alice.exp > firstExp, "the expiry moved forward");
});

test("two clients see each other's presence and typing", async (t) => {
  const server = await Server.start();
  t.after(() => server.stop());
  const alice = client(server, "alice", { token: async () => server.token("alice", { name: "Alice" }) });
  const bob = client(server, "bob", { token: async () => server.token("bob", { name: "Bob" }) });
  t.after(() => {
    alice.close();
    bob.close();
  });
  const ar = alice.room("lobby");
  const br = bob.room("lobby");
  await deadline(ar.join(), "alice joined");
  const seesBob = next(ar, "presence", (users) => users.includes("bob"));
  const joinEvent = next(ar, "system", (e) => e.event === "join" && e.user === "bob");
  await deadline(br.join(), "bob joined");
  assert.deepEqual(await seesBob, ["alice", "bob"]);
  await joinEvent;
  assert.deepEqual(br.members, ["alice", "bob"]);

  const typing = next(ar, "typing");
  assert.equal(br.typing(), true);
  assert.equal(br.typing(), false, "throttled: a second notice right away is not sent");
  const t1 = await typing;
  assert.equal(t1.user, "bob");
  assert.equal(t1.room, "lobby");

  // Bob's message teaches alice his display name; his next typing notice carries it.
  const got = next(ar, "message", (m) => m.user === "bob");
  await deadline(br.send("hi"), "ack");
  assert.equal((await got).name, "Bob");
  assert.equal(alice.displayName("bob"), "Bob");

  const bobGone = next(ar, "presence", (users) => !users.includes("bob"));
  await deadline(br.leave(), "bob left");
  assert.deepEqual(await bobGone, ["alice"]);
});

test("history replayed on join does not make members flicker", async (t) => {
  const server = await Server.start();
  t.after(() => server.stop());
  const carol = client(server, "carol");
  t.after(() => carol.close());
  const cr = carol.room("hall");
  await deadline(cr.join(), "carol joined");
  await deadline(cr.leave(), "carol left");
  const alice = client(server, "alice");
  t.after(() => alice.close());
  const ar = alice.room("hall");
  const seen = [];
  ar.on("presence", (users) => seen.push([...users]));
  const systems = [];
  ar.on("system", (e) => systems.push(`${e.event}:${e.user}`));
  const joined = await deadline(ar.join(), "alice joined");
  assert.deepEqual(joined.users, ["alice"]);
  assert.deepEqual(systems, ["join:carol", "leave:carol", "join:alice"], "the history is still delivered");
  assert.ok(seen.length > 0, "presence was reported");
  assert.ok(seen.every((users) => !users.includes("carol")), `carol never appears: ${JSON.stringify(seen)}`);
  assert.deepEqual(ar.members, ["alice"]);
});

test("a refused join is matched to its own room while another join is pending", async (t) => {
  const server = await Server.start();
  t.after(() => server.stop());
  const alice = new Parley(server.url, {
    token: async () => server.token("alice", { rooms: ["team-*"] }),
    WebSocket,
    ...FAST,
  });
  t.after(() => alice.close());
  const ok = alice.room("team-a").join();
  const refused = alice.room("secret").join();
  const ok2 = alice.room("team-b").join();
  await assert.rejects(deadline(refused, "the refused join"), (e) => e.code === "forbidden");
  const [a, b] = await deadline(Promise.all([ok, ok2]), "the allowed joins");
  assert.equal(a.room, "team-a");
  assert.equal(b.room, "team-b");
  assert.equal(alice.room("secret").joined, false);
  assert.equal(alice.room("team-a").joined, true);
});

test("a room's policy from joined: publish api refuses sends, typing off sends nothing", async (t) => {
  const server = await Server.start({
    args: ["--set", 'rooms=[{match="news.*",publish="api"},{match="calm-*",typing=false}]'],
  });
  t.after(() => server.stop());
  const alice = client(server, "alice");
  t.after(() => alice.close());
  const news = alice.room("news.today");
  const joined = await deadline(news.join(), "joined news");
  assert.equal(joined.publish, "api");
  assert.equal(joined.typing, false);
  assert.equal(joined.announce, true);
  assert.equal(joined.presence, true);
  await assert.rejects(deadline(news.send("mine"), "send refused"), (e) => e instanceof ParleyError && e.code === "forbidden");
  assert.equal(news.typing(), false, "no typing where only the server posts");

  const calm = alice.room("calm-1");
  const info = await deadline(calm.join(), "joined calm");
  assert.equal(info.publish, "members");
  assert.equal(info.typing, false);
  assert.equal(calm.typing(), false, "the room takes no typing notices");
  await deadline(calm.send("fine here"), "ack");

  const plain = await deadline(alice.room("general").join(), "joined general");
  assert.deepEqual([plain.publish, plain.announce, plain.presence, plain.typing], ["members", true, true, true]);
});
