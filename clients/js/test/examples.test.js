// The token-server examples (examples/token-server-node, examples/token-server-python): each
// mints a token that a real parley accepts, and parley-client joins and sends with it.

import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { fileURLToPath } from "node:url";
import WebSocket from "ws";
import { Parley } from "parley-client";
import { Server, SECRET, deadline } from "./support/harness.js";

const examples = fileURLToPath(new URL("../../../examples/", import.meta.url));

/** Starts a token server on a free port; resolves with its URL once it says it listens. */
function startTokenServer(t, cmd, args) {
  const child = spawn(cmd, args, {
    cwd: examples,
    env: { ...process.env, PARLEY_JWT_SECRET: SECRET, PORT: "0" },
    stdio: ["ignore", "pipe", "pipe"],
  });
  t.after(() => child.kill("SIGKILL"));
  let out = "";
  const ready = new Promise((resolve, reject) => {
    child.stdout.on("data", (d) => {
      out += d;
      const m = /listening on (http:\/\/\S+)/.exec(out);
      if (m) resolve(m[1]);
    });
    child.stderr.on("data", (d) => (out += d));
    child.once("error", reject);
    child.once("exit", (code) => reject(new Error(`${cmd} exited with ${code}: ${out}`)));
  });
  return deadline(ready, `${cmd} ${args.join(" ")} to listen`);
}

for (const [name, cmd, args] of [
  ["node", process.execPath, ["token-server-node/server.js"]],
  ["python", "python3", ["token-server-python/server.py"]],
]) {
  test(`the ${name} token server's tokens work with parley-client`, async (t) => {
    const server = await Server.start();
    t.after(() => server.stop());
    const base = await startTokenServer(t, cmd, args);
    let fetched = 0;
    const client = new Parley(server.url, {
      token: async () => {
        const res = await fetch(`${base}/token?user=zoe`);
        assert.equal(res.status, 200);
        fetched += 1;
        return (await res.json()).token;
      },
      WebSocket,
    });
    t.after(() => client.close());
    const room = client.room("examples");
    const joined = await deadline(room.join(), "joined");
    assert.deepEqual(joined.users, ["zoe"]);
    assert.equal(client.user.user_id, "zoe");
    const ack = await deadline(room.send(`hello from the ${name} token`), "ack");
    assert.equal(typeof ack.seq, "number");
    assert.equal(fetched, 1);
    // A bad request gets a 404 JSON answer, not a token.
    const bad = await fetch(`${base}/token?user=`);
    assert.equal(bad.status, 404);
  });
}
