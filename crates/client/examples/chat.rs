//! A terminal chat: `cargo run -p parley-client --example chat -- ws://127.0.0.1:3000/ws general alice`
//! (anonymous mode; set `PARLEY_TOKEN` for a jwt-mode server). Lines you type are sent; the
//! room's messages, joins, leaves and resets are printed. Ctrl-D leaves and exits.

use parley_client::{Client, Options, RoomEvent, TokenSource};
use tokio::io::{AsyncBufReadExt, BufReader};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .unwrap_or_else(|| "ws://127.0.0.1:3000/ws".into());
    let room_name = args.next().unwrap_or_else(|| "general".into());
    let user = args.next().unwrap_or_else(|| "rustacean".into());
    let token = std::env::var("PARLEY_TOKEN").ok().map(TokenSource::from);
    let client = Client::connect(
        url,
        Options {
            user: token.is_none().then_some(user),
            token,
            ..Options::default()
        },
    );

    let room = client.room(room_name);
    let mut events = room.events();
    let joined = room.join().await?;
    println!("joined {} ({} here)", joined.room, joined.user_count);

    tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            match event {
                RoomEvent::Message(m) => println!("[{}] {}: {}", m.seq, m.name, m.content),
                RoomEvent::System(s) => println!("[{}] * {}", s.seq, s.content),
                RoomEvent::Typing { user } => println!("  ({user} is typing)"),
                RoomEvent::Presence(users) => println!("  here: {}", users.join(", ")),
                RoomEvent::Reset { epoch, .. } => {
                    println!("-- the room's history was reset (epoch {epoch}) --")
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
            Ok(ack) => println!("  (stored as #{})", ack.seq),
            Err(e) => eprintln!("  (not sent: {e})"),
        }
    }
    room.leave().await?;
    client.close().await;
    Ok(())
}
