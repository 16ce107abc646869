use crate::common;

use common::TestServer;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_users_chat_in_a_room() {
    let server = TestServer::start().await;
    let mut alice = server.user("alice").await;
    let joined = alice.join("general").await;
    assert_eq!(joined["seq"], 1, "{joined}");
    let mut bob = server.user("bob").await;
    let joined = bob.join("general").await;
    assert_eq!(joined["seq"], 2, "{joined}");
    assert_eq!(joined["users"], json!(["alice", "bob"]));
    let sys = alice.recv_type("system").await;
    assert_eq!(sys["event"], "join");
    assert_eq!(sys["user"], "bob");
    let (ack, _) = bob.post("general", "hi", "c1").await;
    assert_eq!(ack["seq"], 3);
    let msg = alice.recv_type("message").await;
    assert_eq!(msg["content"], "hi");
    assert_eq!(msg["seq"], 3);
    bob.close().await;
    let sys = alice.recv_type("system").await;
    assert_eq!(sys["event"], "leave");
    assert_eq!(sys["seq"], 4);
    server.shutdown().await.unwrap();
}
