//! parley-client against a real server in-process: join/send/ack and delivery to another
//! client, resends across a server restart (acked once, seen once, in order), `Reset` on a new
//! epoch, 4008 terminal, presence. Tests wait on events, never on sleeps.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{next, until, Server, TIMEOUT};
use parley_client::{Client, Error, Options, RoomEvent, State};

fn anon(user: &str) -> Options {
    Options {
        user: Some(user.to_owned()),
        // Quick reconnects: the tests restart servers.
        backoff_base: Duration::from_millis(50),
        backoff_max: Duration::from_millis(500),
        ..Options::default()
    }
}

async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(TIMEOUT, fut)
        .await
        .unwrap_or_else(|_| panic!("{what} within {TIMEOUT:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_send_ack_and_another_client_receives() {
    let server = Server::start(&[]).await;
    let alice = Client::connect(server.url(), anon("alice"));
    let bob = Client::connect(server.url(), anon("bob"));
    let bob_room = bob.room("general");
    let mut bob_events = bob_room.events();
    within("bob joins", bob_room.join()).await.unwrap();
    let room = alice.room("general");
    let joined = within("alice joins", room.join()).await.unwrap();
    assert_eq!(joined.room, "general");
    assert_eq!(
        joined.users.as_deref(),
        Some(&["alice".to_owned(), "bob".to_owned()][..])
    );
    assert_eq!(alice.session().unwrap().user_id, "alice");
    assert_eq!(*alice.state().borrow(), State::Open);

    let ack = within("ack", room.send("hello bob")).await.unwrap();
    assert!(!ack.duplicate);
    assert_eq!(ack.seq, joined.seq + 1);
    let (m, _) = until(&mut bob_events, |e| match e {
        RoomEvent::Message(m) => Some(m.clone()),
        _ => None,
    })
    .await;
    assert_eq!(
        (m.seq, m.user.as_str(), m.content.as_str()),
        (ack.seq, "alice", "hello bob")
    );
    assert_eq!(m.id.as_deref(), Some(ack.id.as_str()));

    // The page API answers with the stored message.
    let page = within(
        "history",
        room.history(parley_client::HistoryQuery {
            after: Some(joined.seq),
            ..Default::default()
        }),
    )
    .await
    .unwrap();
    assert_eq!(
        page.messages.iter().map(|e| e.seq()).collect::<Vec<_>>(),
        [ack.seq]
    );
    assert!(!page.more);

    // Sending to a room not joined is refused locally.
    let err = alice.room("elsewhere").send("x").await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Refused {
                code: parley_client::ErrorCode::NotJoined,
                ..
            }
        ),
        "{err}"
    );
    alice.close().await;
    assert_eq!(*alice.state().borrow(), State::Closed);
    bob.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_pending_across_a_restart_are_acked_once_and_seen_once_in_order() {
    let mut server = Server::start(&[]).await;
    let alice = Client::connect(server.url(), anon("alice"));
    let bob = Client::connect(server.url(), anon("bob"));
    let listen = bob.room("restart");
    let mut events = listen.events();
    within("bob joins", listen.join()).await.unwrap();
    let room = alice.room("restart");
    within("alice joins", room.join()).await.unwrap();

    // Some sends in flight when the server goes down, some made while it is down.
    let mut sends = Vec::new();
    let mut contents = Vec::new();
    for i in 0..10 {
        let content = format!("before-{i}");
        contents.push(content.clone());
        let room = room.clone();
        sends.push(tokio::spawn(async move { room.send(content).await }));
    }
    server.stop().await;
    within("alice notices", alice.wait_for(State::Connecting)).await;
    for i in 0..10 {
        let content = format!("during-{i}");
        contents.push(content.clone());
        let room = room.clone();
        sends.push(tokio::spawn(async move { room.send(content).await }));
    }
    server.restart(false).await;

    let mut acks = Vec::new();
    for send in sends {
        let ack = within("ack", send)
            .await
            .unwrap()
            .expect("every send is acked");
        acks.push(ack.seq);
    }
    let distinct: HashSet<u64> = acks.iter().copied().collect();
    assert_eq!(distinct.len(), acks.len(), "one seq per send: {acks:?}");

    // Bob (who also reconnected and resumed) sees each message once, in seq order.
    let mut seen = Vec::new();
    let mut last = 0;
    while seen.len() < contents.len() {
        match next(&mut events).await {
            RoomEvent::Message(m) => {
                assert!(m.seq > last, "seq order: {} after {last}", m.seq);
                last = m.seq;
                assert!(acks.contains(&m.seq), "an acked seq: {}", m.seq);
                seen.push(m.content);
            }
            RoomEvent::System(s) => {
                assert!(s.seq > last, "seq order");
                last = s.seq;
            }
            RoomEvent::Reset { .. } => panic!("same db: the resume must not reset"),
            _ => {}
        }
    }
    let mut sorted_seen = seen.clone();
    sorted_seen.sort();
    let mut sorted_sent = contents.clone();
    sorted_sent.sort();
    assert_eq!(sorted_seen, sorted_sent, "each message exactly once");
    // Nothing further (no duplicate) arrives: a final probe message is the next message.
    let probe = within("probe", room.send("probe")).await.unwrap();
    let (m, _) = until(&mut events, |e| match e {
        RoomEvent::Message(m) => Some(m.clone()),
        _ => None,
    })
    .await;
    assert_eq!((m.content.as_str(), m.seq), ("probe", probe.seq));
    alice.close().await;
    bob.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_database_resets_the_room() {
    let mut server = Server::start(&[]).await;
    let alice = Client::connect(server.url(), anon("alice"));
    let room = alice.room("lost");
    let mut events = room.events();
    let joined = within("join", room.join()).await.unwrap();
    within("send", room.send("before the loss")).await.unwrap();
    server.stop().await;
    within("alice notices", alice.wait_for(State::Connecting)).await;
    server.restart(true).await;

    let ((epoch, previous), _) = until(&mut events, |e| match e {
        RoomEvent::Reset {
            epoch,
            previous_epoch,
            ..
        } => Some((epoch.clone(), previous_epoch.clone())),
        _ => None,
    })
    .await;
    assert_eq!(previous.as_deref(), Some(joined.epoch.as_str()));
    assert_ne!(epoch, joined.epoch);
    // After the reset the room goes on in the new log.
    let ack = within("send after reset", room.send("after"))
        .await
        .unwrap();
    let (m, _) = until(&mut events, |e| match e {
        RoomEvent::Message(m) => Some(m.clone()),
        _ => None,
    })
    .await;
    assert_eq!((m.content.as_str(), m.seq), ("after", ack.seq));
    alice.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_4008_is_terminal() {
    let server = Server::start(&[
        ("limits.send_rate", toml::Value::from(1.0)),
        ("limits.send_burst", toml::Value::from(1)),
        ("limits.abuse_refusals", toml::Value::from(3)),
    ])
    .await;
    let client = Client::connect(
        server.url(),
        Options {
            // Without pacing the burst below outruns the server's bucket.
            pace_sends: false,
            ..anon("flood")
        },
    );
    let room = client.room("flood");
    within("join", room.join()).await.unwrap();
    let mut sends = Vec::new();
    for i in 0..10 {
        let room = room.clone();
        sends.push(tokio::spawn(
            async move { room.send(format!("m{i}")).await },
        ));
    }
    assert_eq!(
        within("closed", client.wait_for(State::Closed)).await,
        State::Closed
    );
    let mut terminated = 0;
    for send in sends {
        match within("send result", send).await.unwrap() {
            Ok(_) => {}
            Err(Error::Terminated { code: 4008, .. }) => terminated += 1,
            Err(other) => panic!("unexpected {other}"),
        }
    }
    assert!(terminated > 0, "pending sends fail with the terminal close");
    assert!(matches!(
        client.error(),
        Some(Error::Terminated { code: 4008, .. })
    ));
    // Terminal: no reconnect, and new requests fail at once.
    let err = within("join after close", room.join()).await.unwrap_err();
    assert_eq!(err, Error::Closed);
    assert_eq!(*client.state().borrow(), State::Closed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_between_two_clients() {
    let server = Server::start(&[]).await;
    // Carol was here before: her join and leave are in the history everyone gets on joining.
    let carol = Client::connect(server.url(), anon("carol"));
    within("carol joins", carol.room("lobby").join())
        .await
        .unwrap();
    within("carol leaves", carol.room("lobby").leave())
        .await
        .unwrap();
    carol.close().await;
    let alice = Client::connect(server.url(), anon("alice"));
    let bob = Client::connect(server.url(), anon("bob"));
    let room = alice.room("lobby");
    let mut events = room.events();
    within("alice joins", room.join()).await.unwrap();
    let first = next(&mut events).await;
    assert_eq!(first, RoomEvent::Presence(vec!["alice".into()]));

    let bob_room = bob.room("lobby");
    let mut bob_events = bob_room.events();
    within("bob joins", bob_room.join()).await.unwrap();
    // Bob's view is `joined.users`; replaying the join's history (carol's join and leave) must
    // not make the member list flicker. Everything of the join is queued before join() returns.
    let mut bob_presence = Vec::new();
    while let Some(event) = bob_events.try_recv() {
        if let RoomEvent::Presence(users) = event {
            bob_presence.push(users);
        }
    }
    assert_eq!(bob_presence, [vec!["alice".to_owned(), "bob".to_owned()]]);
    let (users, _) = until(&mut events, |e| match e {
        RoomEvent::Presence(users) => Some(users.clone()),
        _ => None,
    })
    .await;
    assert_eq!(users, ["alice", "bob"]);

    bob_room.typing();
    let (who, _) = until(&mut events, |e| match e {
        RoomEvent::Typing { user } => Some(user.clone()),
        _ => None,
    })
    .await;
    assert_eq!(who, "bob");

    within("bob leaves", bob_room.leave()).await.unwrap();
    let (users, _) = until(&mut events, |e| match e {
        RoomEvent::Presence(users) => Some(users.clone()),
        _ => None,
    })
    .await;
    assert_eq!(users, ["alice"]);
    alice.close().await;
    bob.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_network_is_detected_and_the_room_resumes() {
    let server = Server::start(&[
        // The server pings every 500 ms, so a client that hears nothing for two heartbeats
        // knows the path is dead; the server itself waits much longer before dropping anyone.
        ("heartbeat.interval_ms", toml::Value::from(500)),
        ("heartbeat.timeout_ms", toml::Value::from(60_000)),
    ])
    .await;
    let proxy = common::Proxy::start(server.addr).await;
    let alice = Client::connect(format!("ws://{}/ws", proxy.addr), anon("alice"));
    let mut state = alice.state();
    let room = alice.room("quiet");
    let mut events = room.events();
    within("alice joins", room.join()).await.unwrap();
    let bob = Client::connect(server.url(), anon("bob"));
    let bob_room = bob.room("quiet");
    within("bob joins", bob_room.join()).await.unwrap();

    proxy.blackhole_existing();
    let mut acks = Vec::new();
    for i in 0..3 {
        acks.push(
            within("bob's ack", bob_room.send(format!("m{i}")))
                .await
                .unwrap()
                .seq,
        );
    }
    // Alice notices the silence, reconnects (through the proxy, on a new connection) and
    // resumes: bob's messages arrive once each, in order.
    within("alice notices", state.wait_for(|s| *s == State::Connecting))
        .await
        .unwrap();
    let mut got = Vec::new();
    while got.len() < 3 {
        if let RoomEvent::Message(m) = next(&mut events).await {
            got.push((m.seq, m.content));
        }
    }
    let want: Vec<(u64, String)> = acks
        .iter()
        .enumerate()
        .map(|(i, seq)| (*seq, format!("m{i}")))
        .collect();
    assert_eq!(got, want);
    alice.close().await;
    bob.close().await;
}

/// A room's policy reaches the application through `Joined`: where only the server posts, a
/// send fails with `forbidden` (at once, not retried), and where typing is off the other
/// member hears none, while a message still arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_policies_from_joined() {
    let (_, rooms) = parley::config::parse_set(
        r#"rooms=[{match="news.*",publish="api"},{match="calm-*",typing=false}]"#,
    )
    .unwrap();
    let server = Server::start(&[("rooms", rooms)]).await;
    let alice = Client::connect(server.url(), anon("alice"));
    let news = alice.room("news.today");
    let joined = within("alice joins news", news.join()).await.unwrap();
    assert_eq!(joined.publish.as_deref(), Some("api"));
    assert!(!joined.members_post());
    let refused = within("the send is refused", news.send("mine")).await;
    assert!(
        matches!(&refused, Err(Error::Refused { code, .. }) if code.as_str() == "forbidden"),
        "{refused:?}"
    );

    let bob = Client::connect(server.url(), anon("bob"));
    let calm = alice.room("calm-1");
    let joined = within("alice joins calm-1", calm.join()).await.unwrap();
    assert_eq!((joined.typing, joined.members_post()), (Some(false), true));
    let bob_calm = bob.room("calm-1");
    let mut events = bob_calm.events();
    within("bob joins calm-1", bob_calm.join()).await.unwrap();
    calm.typing();
    within("alice posts", calm.send("after typing"))
        .await
        .unwrap();
    let (content, skipped) = until(&mut events, |e| match e {
        RoomEvent::Message(m) => Some(m.content.clone()),
        _ => None,
    })
    .await;
    assert_eq!(content, "after typing");
    assert!(
        !skipped
            .iter()
            .any(|e| matches!(e, RoomEvent::Typing { .. })),
        "{skipped:?}"
    );
    alice.close().await;
    bob.close().await;
}
