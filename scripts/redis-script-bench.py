#!/usr/bin/env python3
"""Redis's own CPU per chat message in parley's message script (issue #13), without nodes.

Starts a fresh redis-server (AOF on, appendfsync everysec, as scripts/bench-cluster.sh) on a
free port, subscribes two raw connections to every room's channel (as two nodes would), makes
every room once, then sends CALLS calls of crates/server/src/cluster/lua/msgs.lua with B
messages each (random rooms, every message with a new client id unless NOCID is set; PIPE calls
pipelined) and prints Redis's CPU (utime+stime of all its threads, from /proc schedstat) per
message, and its command statistics.

  pip install redis
  B=20 CALLS=3000 python3 scripts/redis-script-bench.py
Environment: B (messages per call, 6), CALLS (3000), PIPE (4), ROOMS (5000), NOCID (unset),
LUA_DIR (crates/server/src/cluster/lua/ of this checkout: a changed copy can be compared).
"""
import atexit, glob, os, random, shutil, socket, subprocess, tempfile, threading, time

import redis

HERE = os.path.dirname(os.path.abspath(__file__))
LUA = os.environ.get("LUA_DIR", os.path.join(HERE, "..", "crates/server/src/cluster/lua"))
B = int(os.environ.get("B", "6"))
CALLS = int(os.environ.get("CALLS", "3000"))
PIPE = int(os.environ.get("PIPE", "4"))
ROOMS = int(os.environ.get("ROOMS", "5000"))
NOCID = bool(os.environ.get("NOCID"))
# cluster::keys::BATCH_ROOM_KEYS, as positions in ScriptKeys.
BATCH_IDX = [0, 1, 2, 4, 10, 11]


def script():
    # As cluster/script.rs builds it (op_script!("msgs", "true")).
    read = lambda name: open(os.path.join(LUA, name)).read()
    return ("local BATCH = true\n" + read("lib.lua") + "local function op()\n" + read("msgs.lua")
            + "\nend\nreturn {op(), events_now()}\n")


def cpu_s(pid):
    return sum(int(open(t + "/schedstat").read().split()[0])
               for t in glob.glob("/proc/%d/task/*" % pid)) / 1e9


def keys_of(room, user, cid):
    p = "parley:{%s}" % room
    node = "n1"
    return [p + ":seq", p + ":epoch", p + ":log", p + ":users", p, "parley:rooms", "parley:nodes",
            p + ":presence:" + node, "parley:node:%s:rooms" % node, "parley:node:%s:alive" % node,
            "%s:dedup:%d:%s:%s" % (p, len(user), user, cid) if cid else "", p + ":gen",
            "parley:run", "parley:durable", "parley:gen", p + ":active", "parley:events"]


counter = 0


def call_args(rooms):
    global counter
    keys, args = [], []
    for i, room in enumerate(rooms):
        counter += 1
        user = "user%d" % random.randrange(2 * ROOMS)
        cid = "" if NOCID else "c%d" % counter
        content = "hello there this is a chat message %d" % counter
        ks = keys_of(room, user, cid)
        keys += ks if i == 0 else [ks[j] for j in BATCH_IDX]
        prefix = '{"type":"message","room":"%s","seq":' % room
        suffix = (',"user":"%s","name":"%s","content":"%s","ts":"2026-12-07T13:00:00.000Z","id":"%s"}'
                  % (user, user, content, cid))
        args += [room, cid, content, prefix, suffix, "10000", "0", "ep%08d" % random.randrange(10**8),
                 "600"]
    return keys, args + ["0"]


def main():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
    d = tempfile.mkdtemp(prefix="redis-script-bench.")
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", d,
                               "--save", "", "--appendonly", "yes", "--appendfsync", "everysec"],
                              stdout=subprocess.DEVNULL)
    atexit.register(lambda: (server.kill(), shutil.rmtree(d, ignore_errors=True)))
    r = redis.Redis(port=port)
    for _ in range(100):
        try:
            r.ping(); break
        except redis.ConnectionError:
            time.sleep(0.05)

    def subscriber():
        c = socket.create_connection(("127.0.0.1", port))
        c.sendall(b"".join(b"*2\r\n$9\r\nSUBSCRIBE\r\n$%d\r\n%s\r\n" % (len(ch), ch)
                           for ch in (("parley:{room%d}" % i).encode() for i in range(ROOMS))))
        while c.recv(1 << 20):
            pass
    for _ in range(2):
        threading.Thread(target=subscriber, daemon=True).start()
    # Both subscribers hold every channel (each connection's SUBSCRIBEs run in order).
    last = "parley:{room%d}" % (ROOMS - 1)
    while r.pubsub_numsub(last)[0][1] < 2:
        time.sleep(0.05)
    sha = r.script_load(script())
    for i in range(0, ROOMS, 50):
        keys, args = call_args(["room%d" % j for j in range(i, min(i + 50, ROOMS))])
        r.evalsha(sha, len(keys), *keys, *args)
    r.config_resetstat()
    before, started = cpu_s(server.pid), time.time()
    for _ in range(CALLS // PIPE):
        p = r.pipeline(transaction=False)
        for _ in range(PIPE):
            keys, args = call_args(["room%d" % random.randrange(ROOMS) for _ in range(B)])
            p.evalsha(sha, len(keys), *keys, *args)
        p.execute()
    cpu, wall = cpu_s(server.pid) - before, time.time() - started
    msgs = (CALLS // PIPE) * PIPE * B
    print("B=%d calls=%d messages=%d redis_cpu_s=%.2f us_per_message=%.1f wall_s=%.1f"
          % (B, msgs // B, msgs, cpu, cpu / msgs * 1e6, wall))
    stats = r.info("commandstats")
    for name, v in sorted(stats.items(), key=lambda kv: -kv[1]["usec"])[:10]:
        print("  %-22s calls=%-8d usec_per_call=%.2f" % (name[8:], v["calls"], v["usec_per_call"]))


main()
