//! The Rust app of docs/clients.md, compiled here so the doc cannot rot: a terminal chat that
//! gets its token from a token backend (examples/token-server-node or -python on :8787).
//!
//!     cargo run -p parley-client --example token_chat -- alice general

use futures_util::StreamExt; // or use `events.recv().await`
use parley_client::{Client, Error, Options, RoomEvent, State, TokenSource};
use tokio::io::{AsyncBufReadExt, BufReader};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let user = std::env::args().nth(1).unwrap_or_else(|| "alice".into());
    let room_name = std::env::args().nth(2).unwrap_or_else(|| "general".into());

    // Called on every (re)connect and before the token expires.
    let token_user = user.clone();
    let token = TokenSource::callback(move || {
        let url = format!("http://127.0.0.1:8787/token?user={token_user}");
        async move {
            let body: serde_json::Value = reqwest::get(url).await?.json().await?;
            Ok(body["token"]
                .as_str()
                .ok_or("no token in the answer")?
                .to_owned())
        }
    });
    let client = Client::connect(
        "ws://127.0.0.1:3000/ws",
        Options {
            token: Some(token),
            ..Options::default()
        },
    );

    // Print state changes (connecting / open / closed).
    let mut state = client.state();
    tokio::spawn(async move {
        while state.changed().await.is_ok() {
            eprintln!("[{:?}]", *state.borrow());
        }
    });

    let room = client.room(room_name);
    let mut events = room.events(); // subscribe first: the join's history arrives here too
    room.join().await?;
    tokio::spawn(async move {
        while let Some(event) = events.next().await {
            match event {
                RoomEvent::Message(m) => println!("#{} {}: {}", m.seq, m.name, m.content),
                RoomEvent::System(s) => println!("#{} * {}", s.seq, s.content),
                RoomEvent::Presence(users) => eprintln!("here: {}", users.join(", ")),
                RoomEvent::Typing { user } => eprintln!("{user} is typing"),
                RoomEvent::Reset { .. } => {
                    println!("-- history was reset; showing the room afresh --")
                }
                RoomEvent::Left { reason } => println!("-- removed from the room: {reason:?} --"),
            }
        }
    });

    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        if line.trim().is_empty() {
            continue;
        }
        match room.send(line).await {
            Ok(ack) => eprintln!(
                "(stored as #{}{})",
                ack.seq,
                if ack.duplicate { ", resent" } else { "" }
            ),
            Err(Error::Terminated { code, reason }) => {
                eprintln!("closed by the server ({code}: {reason})");
                break;
            }
            Err(e) => eprintln!("(not sent: {e})"),
        }
    }
    if *client.state().borrow() != State::Closed {
        room.leave().await?;
    }
    client.close().await;
    Ok(())
}
