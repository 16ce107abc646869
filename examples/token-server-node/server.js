// A tiny token backend for parley (node:http + node:crypto, no dependencies).
//   PARLEY_JWT_SECRET=... node server.js      then   GET http://127.0.0.1:8787/token?user=alice
// Your real backend checks its own session first and takes the user from it, never from the
// query; this one trusts `?user=` to stay a few lines long.
import { createServer } from "node:http";
import { createHmac } from "node:crypto";

const secret = process.env.PARLEY_JWT_SECRET;
if (!secret) throw new Error("set PARLEY_JWT_SECRET (the same secret parley runs with)");
const TTL_S = Number(process.env.TOKEN_TTL_S || 600);
const b64url = (s) => Buffer.from(s).toString("base64url");

function sign(claims) {
  const head = b64url(JSON.stringify({ alg: "HS256", typ: "JWT" })) + "." + b64url(JSON.stringify(claims));
  return head + "." + createHmac("sha256", secret).update(head).digest("base64url");
}

const server = createServer((req, res) => {
  const url = new URL(req.url, "http://localhost");
  const user = url.searchParams.get("user") || "";
  if (url.pathname !== "/token" || !/^[A-Za-z0-9_.-]{1,64}$/.test(user)) {
    res.writeHead(404, { "content-type": "application/json" }).end('{"error":"not_found"}');
    return;
  }
  const exp = Math.floor(Date.now() / 1000) + TTL_S;
  const body = JSON.stringify({ token: sign({ sub: user, name: user, exp }), exp });
  // The example page is served from another origin: allow it to read the answer.
  res.writeHead(200, { "content-type": "application/json", "access-control-allow-origin": "*" }).end(body);
});
server.listen(Number(process.env.PORT ?? 8787), "127.0.0.1", () => {
  console.log(`listening on http://127.0.0.1:${server.address().port}`);
});
