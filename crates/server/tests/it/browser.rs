//! The browser client end to end, in real headless Chromium driven over WebDriver
//! (chromedriver): two people sign in, see each other, type, chat, one of them drops off the
//! network and comes back without losing a message, and markup in a message stays text. The
//! page matches every answer to its request by id: a refused join lands on its own room while
//! another join is pending, and a failed "Load older" does not block the pages after it.
//!
//! Needs Debian's `chromium` and `chromium-driver` packages. When chromedriver is missing the
//! test fails (it never skips) and says how to install it.

use crate::common;

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::TestServer;
use fantoccini::key::Key;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};
use tempfile::TempDir;

/// How long any awaited condition may take before the test fails.
const WAIT: Duration = Duration::from_secs(15);
const INSTALL: &str = "apt-get install -y chromium chromium-driver";

/// A chromedriver child process, killed when dropped.
struct Driver {
    child: Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn find_binary(env: &str, candidates: &[&str]) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(env) {
        return Some(PathBuf::from(path));
    }
    candidates
        .iter()
        .map(Path::new)
        .find(|p| p.exists())
        .map(Path::to_path_buf)
}

fn start_driver() -> Driver {
    let Some(chromedriver) = find_binary(
        "CHROMEDRIVER",
        &["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"],
    ) else {
        panic!(
            "chromedriver not found (looked at /usr/bin/chromedriver and $CHROMEDRIVER). \
             The browser test needs Debian's Chromium and its driver: {INSTALL}"
        );
    };
    // The port is picked by binding :0 and released for chromedriver; if something else takes
    // it meanwhile chromedriver exits, and we try again with another.
    let mut last_log = String::new();
    for _ in 0..3 {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = tempfile::NamedTempFile::new().unwrap();
        let child = Command::new(&chromedriver)
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdin(Stdio::null())
            .stdout(log.reopen().unwrap())
            .stderr(log.reopen().unwrap())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {}: {e}. Install: {INSTALL}",
                    chromedriver.display()
                )
            });
        let mut driver = Driver {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok(Some(status)) = driver.child.try_wait() {
                last_log = format!(
                    "chromedriver exited with {status}: {}",
                    std::fs::read_to_string(log.path()).unwrap_or_default()
                );
                break;
            }
            // chromedriver prints this line once it listens on the port.
            let out = std::fs::read_to_string(log.path()).unwrap_or_default();
            if out.contains("started successfully")
                && TcpStream::connect(("127.0.0.1", port)).is_ok()
            {
                return driver;
            }
            assert!(
                Instant::now() < deadline,
                "chromedriver did not listen on port {port} within {WAIT:?}; its output: {out}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    panic!("chromedriver did not start: {last_log}");
}

/// One browser window with its own profile directory.
struct Browser {
    name: &'static str,
    client: Client,
    _profile: TempDir,
}

async fn open_browser(driver: &Driver, name: &'static str) -> Browser {
    let chromium = find_binary(
        "CHROMIUM",
        &["/usr/bin/chromium", "/usr/bin/chromium-browser"],
    )
    .unwrap_or_else(|| panic!("chromium not found. Install: {INSTALL}"));
    let profile = TempDir::new().unwrap();
    let args = vec![
        "--headless=new".to_owned(),
        "--no-sandbox".to_owned(),
        "--disable-gpu".to_owned(),
        "--disable-dev-shm-usage".to_owned(),
        "--disable-background-networking".to_owned(),
        "--disable-component-update".to_owned(),
        "--disable-sync".to_owned(),
        "--no-first-run".to_owned(),
        "--disable-quic".to_owned(),
        "--window-size=1100,700".to_owned(),
        format!("--user-data-dir={}", profile.path().display()),
    ];
    let caps = json!({
        "browserName": "chrome",
        "goog:chromeOptions": { "binary": chromium.display().to_string(), "args": args },
    });
    let Value::Object(caps) = caps else {
        unreachable!()
    };
    let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&driver.url)
        .await
        .unwrap_or_else(|e| panic!("{name}: cannot open a Chromium session: {e}"));
    Browser {
        name,
        client,
        _profile: profile,
    }
}

impl Browser {
    /// Runs a script (a function body) and returns its value.
    async fn js(&self, script: &str) -> Value {
        self.client
            .execute(script, vec![])
            .await
            .unwrap_or_else(|e| panic!("{}: script failed: {e}\n{script}", self.name))
    }

    /// Polls `script` until it returns something truthy; fails with `what` after [`WAIT`].
    async fn wait_for(&self, what: &str, script: &str) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let value = self.js(script).await;
            let truthy = match &value {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::Number(n) => n.as_f64() != Some(0.0),
                Value::String(s) => !s.is_empty(),
                _ => true,
            };
            if truthy {
                return value;
            }
            if Instant::now() >= deadline {
                let status = self
                    .js("return window.parley && window.parley.status()")
                    .await;
                panic!(
                    "{}: timed out after {WAIT:?} waiting for {what}; last value {value}; client status {status}",
                    self.name
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn type_into(&self, css: &str, text: &str) {
        self.client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("{}: no {css}: {e}", self.name))
            .send_keys(text)
            .await
            .unwrap_or_else(|e| panic!("{}: typing into {css}: {e}", self.name));
    }

    async fn sign_in(&self, url: &str, user: &str, room: &str) {
        self.client.goto(url).await.unwrap();
        self.js("window.__errors = []; window.addEventListener('error', (e) => window.__errors.push(String(e.message))); return true").await;
        self.wait_for(
            "the sign-in form",
            "return !!document.getElementById('signin-name') && !!window.parley",
        )
        .await;
        self.type_into("#signin-name", user).await;
        self.js("document.getElementById('signin-room').value = ''; return true")
            .await;
        self.type_into("#signin-room", room).await;
        self.client
            .find(Locator::Css("#signin-submit"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        self.wait_for(
            &format!("{user} to be joined to {room}"),
            &format!(
                "const s = window.parley.status(); return s.connected && s.rooms.some(r => r.name === {room:?} && r.joined)"
            ),
        )
        .await;
    }

    /// Types a message into the composer and presses Enter.
    async fn say(&self, text: &str) {
        self.type_into("#input", &format!("{text}{}", char::from(Key::Enter)))
            .await;
    }

    /// Waits until no own message is pending (every send was acked).
    async fn wait_acked(&self) {
        self.wait_for(
            "every own message to be acked",
            "return document.querySelectorAll('.room-pending li').length === 0",
        )
        .await;
    }

    /// How many stored message elements (with a data-seq) hold exactly `text`.
    async fn count_messages(&self, text: &str) -> u64 {
        self.js(&format!(
            "return [...document.querySelectorAll('#messages li.msg[data-seq] .text')].filter(e => e.textContent === {text:?}).length"
        ))
        .await
        .as_u64()
        .unwrap()
    }

    async fn wait_message(&self, text: &str) {
        self.wait_for(
            &format!("message {text:?}"),
            &format!(
                "return [...document.querySelectorAll('#messages li.msg[data-seq] .text')].some(e => e.textContent === {text:?})"
            ),
        )
        .await;
    }

    async fn assert_no_page_errors(&self) {
        let errors = self.js("return window.__errors || []").await;
        assert_eq!(errors, json!([]), "{}: page errors", self.name);
    }
}

/// Posts `n` messages to `room` as `user` over a plain WebSocket. Once the send bucket's burst
/// is spent it paces itself a little below the refill rate (the default 10/s), so it is refused
/// only a handful of times and never near the abuse threshold.
async fn seed_room(server: &TestServer, user: &str, room: &str, n: usize) {
    seed_with(server.user(user).await, room, n).await;
}

/// [`seed_room`] over an already authenticated connection (e.g. one with a token).
async fn seed_with(mut client: common::Client, room: &str, n: usize) {
    client.join(room).await;
    let mut pace = Duration::ZERO;
    for i in 1..=n {
        let id = format!("seed-{i}");
        loop {
            tokio::time::sleep(pace).await;
            client
                .send(json!({"type": "send", "room": room, "content": format!("archived message {i}"), "id": id}))
                .await;
            let frame = loop {
                let frame = client.recv().await;
                if frame["id"] == id.as_str()
                    && (frame["type"] == "ack" || frame["type"] == "error")
                {
                    break frame;
                }
            };
            if frame["type"] == "ack" {
                break;
            }
            assert_eq!(frame["code"], "rate_limited", "seeding: {frame}");
            pace = Duration::from_millis(120);
            let wait = frame["retry_after_ms"].as_u64().unwrap_or(100);
            tokio::time::sleep(Duration::from_millis(wait)).await;
        }
    }
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_people_chat_in_chromium_and_a_dropped_connection_loses_nothing() {
    let started = Instant::now();
    let driver = start_driver();
    let server = TestServer::start().await;
    let url = server.http_url("/");

    // A room with a longer past, to page back through (filled while the browsers start).
    let seeding = seed_room(&server, "carol", "archive", 60);
    let (alice, bob) = tokio::join!(
        async {
            let alice = open_browser(&driver, "alice").await;
            let bob = open_browser(&driver, "bob").await;
            (alice, bob)
        },
        seeding
    )
    .0;
    alice.client.set_window_size(1100, 700).await.unwrap();

    // Sign in and join the same room; each sees the other in the member list.
    alice.sign_in(&url, "alice", "lobby").await;
    bob.sign_in(&url, "bob", "lobby").await;
    let has = |user: &str| {
        format!("[...document.querySelectorAll('#members .member')].some(e => e.dataset.user === {user:?})")
    };
    alice
        .wait_for(
            "bob in alice's member list",
            &format!("return {}", has("bob")),
        )
        .await;
    bob.wait_for(
        "alice in bob's member list",
        &format!("return {}", has("alice")),
    )
    .await;
    alice
        .wait_for(
            "the member count in the room list",
            "return document.querySelector('#rooms .room[data-room=\"lobby\"] .room-users').textContent === '2'",
        )
        .await;

    // Bob types: alice sees the typing indicator; then bob's message arrives.
    bob.type_into("#input", "hello al").await;
    alice
        .wait_for(
            "the typing indicator",
            "return document.getElementById('typing').textContent.includes('bob is typing')",
        )
        .await;
    bob.type_into("#input", &format!("ice{}", char::from(Key::Enter)))
        .await;
    alice.wait_message("hello alice").await;
    bob.wait_acked().await;

    // Alice posts; bob sees it.
    alice.say("hi bob, how are you?").await;
    bob.wait_message("hi bob, how are you?").await;
    alice.wait_acked().await;

    // Bob drops off the network; reconnecting is held while alice posts three messages.
    bob.js("window.parley.holdReconnect(true); window.parley.dropConnection(); return true")
        .await;
    bob.wait_for(
        "bob to be offline",
        "return !window.parley.status().connected",
    )
    .await;
    alice
        .wait_for(
            "bob to leave alice's member list",
            &format!("return !{}", has("bob")),
        )
        .await;
    let missed = ["missed one", "missed two", "missed three"];
    for text in missed {
        alice.say(text).await;
    }
    alice.wait_acked().await;
    // Bob writes while offline: shown as pending, sent after the reconnect.
    bob.say("written while offline").await;
    bob.wait_for(
        "bob's pending message",
        "return [...document.querySelectorAll('.room-pending li.pending .text')].some(e => e.textContent === 'written while offline')",
    )
    .await;
    for text in missed {
        assert_eq!(bob.count_messages(text).await, 0, "bob is offline");
    }

    // The network comes back: bob reconnects by himself and resumes with since/epoch.
    bob.js("window.parley.holdReconnect(false); return true")
        .await;
    bob.wait_for(
        "bob to reconnect and rejoin",
        "const s = window.parley.status(); return s.connected && s.rooms.every(r => r.joined)",
    )
    .await;
    for text in missed {
        bob.wait_message(text).await;
    }
    bob.wait_acked().await;
    alice.wait_message("written while offline").await;
    alice
        .wait_for(
            "bob back in alice's member list",
            &format!("return {}", has("bob")),
        )
        .await;
    for text in missed {
        assert_eq!(
            bob.count_messages(text).await,
            1,
            "bob shows {text:?} exactly once"
        );
    }
    assert_eq!(bob.count_messages("written while offline").await, 1);
    assert_eq!(alice.count_messages("written while offline").await, 1);
    // Every event of the room is on bob's screen once: the seqs are unique and without gaps.
    let seqs = bob
        .js("return [...document.querySelectorAll('#messages li[data-seq]')].map(e => Number(e.dataset.seq))")
        .await;
    let seqs: Vec<u64> = seqs
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert!(!seqs.is_empty());
    for pair in seqs.windows(2) {
        assert_eq!(
            pair[1],
            pair[0] + 1,
            "bob's log is contiguous and duplicate-free: {seqs:?}"
        );
    }

    // Markup in a message is shown as text and creates no element.
    let evil = "<script>alert(1)</script><b>x</b>";
    alice.say(evil).await;
    bob.wait_message(evil).await;
    alice.wait_message(evil).await;
    for who in [&alice, &bob] {
        let tags = who
            .js("return document.querySelectorAll('#messages b, #messages script').length")
            .await;
        assert_eq!(
            tags,
            json!(0),
            "{}: markup from a message became elements",
            who.name
        );
        assert_eq!(who.count_messages(evil).await, 1);
    }

    // A few friendly lines for the picture, then the screenshot.
    bob.say("Back online, and I did not miss a thing.").await;
    alice
        .wait_message("Back online, and I did not miss a thing.")
        .await;
    alice.wait_acked().await;
    bob.wait_acked().await;
    let png = alice.client.screenshot().await.expect("screenshot");
    assert!(png.starts_with(b"\x89PNG"), "a PNG");
    // Written under target/ on every run; `PARLEY_UPDATE_SCREENSHOT=1` refreshes the README's
    // picture in docs/ (a test run should not change the repository).
    let path = if std::env::var_os("PARLEY_UPDATE_SCREENSHOT").is_some() {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/screenshot.png")
    } else {
        Path::new(env!("CARGO_TARGET_TMPDIR")).join("parley-chat.png")
    };
    std::fs::write(&path, &png).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));

    // On a phone-sized screen the conversation takes the whole width; the room list slides in
    // from a menu button.
    bob.client.set_window_size(390, 844).await.unwrap();
    bob.wait_for(
        "the narrow layout",
        "const chat = document.getElementById('chat').getBoundingClientRect(); \
         const rooms = document.getElementById('rooms-pane').getBoundingClientRect(); \
         return chat.width >= window.innerWidth - 1 && rooms.right <= 1 \
           && getComputedStyle(document.getElementById('toggle-rooms')).display !== 'none'",
    )
    .await;
    bob.client
        .find(Locator::Css("#toggle-rooms"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    bob.wait_for(
        "the room list to slide in",
        "const r = document.getElementById('rooms-pane').getBoundingClientRect(); return r.left >= 0 && r.right > 100",
    )
    .await;
    let phone = bob.client.screenshot().await.expect("phone screenshot");
    std::fs::write(
        Path::new(env!("CARGO_TARGET_TMPDIR")).join("parley-phone.png"),
        phone,
    )
    .unwrap();

    // History: joining a room shows its latest page; scrolling up loads the older ones.
    alice
        .type_into("#join-room", &format!("archive{}", char::from(Key::Enter)))
        .await;
    alice
        .wait_for(
            "alice to join archive",
            "const s = window.parley.status(); return s.current === 'archive' && s.rooms.find(r => r.name === 'archive').joined",
        )
        .await;
    alice.wait_message("archived message 60").await;
    assert_eq!(
        alice.count_messages("archived message 1").await,
        0,
        "only the latest page on join"
    );
    let older = "document.getElementById('scroller').scrollTop = 0; \
                 return document.querySelector('#messages li.msg[data-seq=\"2\"]') !== null";
    alice
        .wait_for("the oldest page after scrolling up", older)
        .await;
    let seqs = alice
        .js("return [...document.querySelectorAll('#messages .room-view[data-room=\"archive\"] li[data-seq]')].map(e => Number(e.dataset.seq))")
        .await;
    let seqs: Vec<u64> = seqs
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
    assert_eq!(seqs, expected, "archive: every event once, in order");
    for i in [1, 30, 60] {
        assert_eq!(
            alice.count_messages(&format!("archived message {i}")).await,
            1
        );
    }

    alice.assert_no_page_errors().await;
    bob.assert_no_page_errors().await;
    for who in [alice, bob] {
        who.client.close().await.unwrap();
    }
    drop(driver);
    eprintln!("browser test took {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_mode_takes_the_token_from_the_page_url_and_asks_for_one_otherwise() {
    let driver = start_driver();
    let server = TestServer::builder().jwt().start().await;
    let token = common::token("dave", 3600, json!({"name": "Dave"}));
    let browser = open_browser(&driver, "dave").await;

    // ?token= in the page URL: signed in at once, with the token's identity and name.
    browser
        .client
        .goto(&server.http_url(&format!("/?token={token}&room=ops")))
        .await
        .unwrap();
    browser
        .wait_for(
            "dave to be joined to ops",
            "const s = window.parley && window.parley.status(); \
             return s && s.connected && s.user === 'dave' && s.rooms.some(r => r.name === 'ops' && r.joined)",
        )
        .await;
    let me = browser
        .js("return document.getElementById('me').textContent")
        .await;
    assert_eq!(me, json!("Dave"));

    // Signing in with a bare name on a jwt server: the page says a token is needed.
    browser
        .client
        .find(Locator::Css("#signout"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    browser
        .js("document.getElementById('signin-token').value = ''; document.getElementById('signin-name').value = ''; return true")
        .await;
    browser.type_into("#signin-name", "eve").await;
    browser
        .client
        .find(Locator::Css("#signin-submit"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    browser
        .wait_for(
            "the 'requires a token' message",
            "const e = document.getElementById('signin-error'); return !e.hidden && e.textContent.includes('requires a token')",
        )
        .await;
    browser.client.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_are_matched_by_id_a_refused_join_and_a_failed_page_land_where_they_belong() {
    let driver = start_driver();
    let server = TestServer::builder().jwt().start().await;
    let carol = common::token("carol", 3600, json!({}));
    let mut seeder = server.connect(&format!("/ws?token={carol}")).await;
    assert_eq!(seeder.recv().await["type"], "authenticated");
    let browser = open_browser(&driver, "erin");
    let (browser, ()) = tokio::join!(browser, seed_with(seeder, "archive", 60));
    // Erin may join `team-*` rooms and the archive, nothing else.
    let token = common::token(
        "erin",
        3600,
        json!({"name": "Erin", "rooms": ["team-*", "archive"]}),
    );
    browser
        .client
        .goto(&server.http_url(&format!("/?token={token}&room=archive")))
        .await
        .unwrap();
    browser.js("window.__errors = []; window.addEventListener('error', (e) => window.__errors.push(String(e.message))); return true").await;
    browser
        .wait_for(
            "erin to be joined to archive",
            "const s = window.parley && window.parley.status(); \
             return s && s.connected && s.rooms.some(r => r.name === 'archive' && r.joined)",
        )
        .await;
    browser.wait_message("archived message 60").await;

    // Two joins in flight, the second refused (forbidden) while the first is still pending:
    // the refusal removes `secret`, not `team-b`, which joins.
    browser
        .js("const form = document.getElementById('join-form'); const input = document.getElementById('join-room'); \
             input.value = 'team-b'; form.requestSubmit(); input.value = 'secret'; form.requestSubmit(); return true")
        .await;
    browser
        .wait_for(
            "team-b joined and secret gone",
            "const s = window.parley.status(); \
             return s.rooms.some(r => r.name === 'team-b' && r.joined) && !s.rooms.some(r => r.name === 'secret')",
        )
        .await;
    let notices = browser
        .js("return document.getElementById('notices').textContent")
        .await;
    let notices = notices.as_str().unwrap_or_default();
    assert!(notices.contains("Cannot join #secret"), "{notices}");
    assert!(!notices.contains("team-b"), "{notices}");
    let rooms = browser
        .js("return [...document.querySelectorAll('#rooms .room')].map(e => e.dataset.room)")
        .await;
    assert_eq!(rooms, json!(["archive", "team-b"]));

    // "Load older" whose request fails (the next history frame is corrupted on its way out, so
    // the server refuses it with an error) while a join is pending: the error is the page's,
    // not the join's (team-c joins), and the next "Load older" still works.
    browser
        .client
        .find(Locator::Css(
            "#rooms .room[data-room=\"archive\"] .room-open",
        ))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    browser
        .wait_for(
            "the archive's load-older button",
            "return window.parley.status().current === 'archive' && !document.getElementById('load-older').hidden",
        )
        .await;
    browser
        .js("window.__broken = false; const send = WebSocket.prototype.send; \
             WebSocket.prototype.send = function (data) { \
               if (!window.__broken && String(data).includes('\"type\":\"history\"')) { \
                 window.__broken = true; const f = JSON.parse(data); f.limit = 100000; data = JSON.stringify(f); } \
               return send.call(this, data); }; \
             document.getElementById('load-older').click(); \
             const input = document.getElementById('join-room'); input.value = 'team-c'; \
             document.getElementById('join-form').requestSubmit(); return true")
        .await;
    browser
        .wait_for(
            "the failed page's notice",
            "return window.__broken && document.getElementById('notices').textContent.includes('Could not load older messages')",
        )
        .await;
    browser
        .wait_for(
            "team-c joined",
            "return window.parley.status().rooms.some(r => r.name === 'team-c' && r.joined)",
        )
        .await;
    let notices = browser
        .js("return document.getElementById('notices').textContent")
        .await;
    assert!(
        !notices.as_str().unwrap_or_default().contains("team-c"),
        "{notices}"
    );
    browser
        .client
        .find(Locator::Css(
            "#rooms .room[data-room=\"archive\"] .room-open",
        ))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let status = browser
        .wait_for(
            "paging to be free again",
            "const r = window.parley.status().rooms.find(r => r.name === 'archive'); return !r.loadingOlder && r.moreOlder && r",
        )
        .await;
    assert_eq!(status["joined"], json!(true), "{status}");
    assert_eq!(
        browser.count_messages("archived message 1").await,
        0,
        "nothing older was shown yet"
    );
    browser
        .wait_for(
            "the oldest page after the failed one",
            "if (!document.getElementById('load-older').hidden) document.getElementById('load-older').click(); \
             return document.querySelector('#messages li.msg[data-seq=\"2\"]') !== null",
        )
        .await;
    assert_eq!(browser.count_messages("archived message 1").await, 1);
    browser.assert_no_page_errors().await;
    browser.client.close().await.unwrap();
}

/// A room only the server posts to (`[[rooms]]` with `publish = "api"`): the page greys out
/// the composer with a hint instead of letting the member type into a refusal, shows what the
/// HTTP API posts, and gives the composer back in an ordinary room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_composer_is_disabled_with_a_hint_where_only_the_server_posts() {
    let driver = start_driver();
    let server = TestServer::builder()
        .set("api.key", "browser-key")
        .set(
            "rooms",
            toml::Value::try_from([json!({"match": "news.*", "publish": "api"})]).unwrap(),
        )
        .start()
        .await;
    let browser = open_browser(&driver, "ana").await;
    browser
        .sign_in(&server.http_url("/"), "ana", "news.daily")
        .await;
    let hint = browser
        .wait_for(
            "the composer to be disabled with a hint",
            "const i = document.getElementById('input'); \
             return i.disabled && document.getElementById('send').disabled && i.placeholder",
        )
        .await;
    assert!(
        hint.as_str().unwrap().contains("Only the server posts"),
        "{hint}"
    );
    let status = browser.js("return window.parley.status()").await;
    assert_eq!(status["rooms"][0]["readOnly"], true, "{status}");

    let response = reqwest::Client::new()
        .post(server.http_url("/api/rooms/news.daily/messages"))
        .bearer_auth("browser-key")
        .json(&json!({"user": "newsdesk", "content": "today's headline"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    browser.wait_message("today's headline").await;

    browser
        .type_into("#join-room", &format!("general{}", char::from(Key::Enter)))
        .await;
    browser
        .wait_for(
            "the composer to be enabled in general",
            "const s = window.parley.status(); const i = document.getElementById('input'); \
             return s.current === 'general' && s.rooms.some(r => r.name === 'general' && r.joined) \
             && !i.disabled && i.placeholder === 'Message #general'",
        )
        .await;
    browser.say("hello general").await;
    browser.wait_acked().await;
    browser.wait_message("hello general").await;
    browser.assert_no_page_errors().await;
    browser.client.close().await.unwrap();
}
