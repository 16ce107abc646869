// Compiled by `npm run typecheck` (tsc --noEmit): uses the public API as an app would, so a
// declaration that drifts from the documented surface fails the check.
import WebSocket from "ws";
import { Parley, ParleyError, type ChatMessage, type ConnectionState, type SendResult } from "parley-client";

async function main(): Promise<void> {
  const client = new Parley("ws://127.0.0.1:3000/ws", {
    token: async () => "a.b.c",
    WebSocket,
  });
  const anon = new Parley("ws://127.0.0.1:3000/ws", { user: "alice", name: "Alice" });
  anon.close();
  const off = client.on("state", (s: ConnectionState) => console.log(s));
  off();
  client.on("error", (e: ParleyError) => console.log(e.code, e.closeCode));
  client.on("authenticated", (info) => console.log(info.user_id, info.limits?.max_content_bytes, info.exp));
  const room = client.room("general");
  room.on("message", (m: ChatMessage) => console.log(m.seq, m.user, m.name, m.content, m.id));
  room.on("system", (e) => console.log(e.event, e.user));
  room.on("typing", (t) => console.log(t.user, t.name));
  room.on("presence", (users: string[], info) => console.log(users.join(","), info.count));
  room.on("reset", (info) => console.log(info.epoch, info.previousEpoch));
  room.on("left", (info) => console.log(info.reason));
  const joined = await room.join();
  console.log(joined.seq, joined.epoch, joined.users, joined.history.length, joined.recovered);
  const ack: SendResult = await room.send("hello");
  console.log(ack.seq, ack.duplicate);
  const page = await room.history({ before: 120, limit: 50 });
  for (const ev of page.messages) console.log(ev.type === "message" ? ev.content : ev.event);
  console.log(page.more, room.members, room.pending, room.joined, client.user?.name);
  room.typing();
  await room.leave();
  client.reconnect();
  client.close();
  try {
    await room.send("x");
  } catch (e) {
    if (e instanceof ParleyError) console.log(e.code);
  }
}

void main;
