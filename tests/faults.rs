//! A panic anywhere in one connection's handling closes that connection with 1011 (or, where
//! it has no WebSocket yet, just its socket) and nothing else: the shard and every other
//! connection on it carry on, and no event meant for them is lost. Each path of the shard is
//! tried with a planted fault (the `fault-injection` feature, on for the tests only).

mod common;

use causeloop_stream::fault::{Faults, Point};
use common::*;
use std::io::Read;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tungstenite::Message;

fn server(faults: &Arc<Faults>) -> TestServer {
    let faults = faults.clone();
    TestServer::with(move |c| {
        c.shards = 1;
        c.heartbeat_interval = Duration::from_millis(200);
        c.faults = Some(faults);
    })
}

fn panics(s: &TestServer) -> u64 {
    s.server().stats().shards[0]
        .handler_panics
        .load(Ordering::Relaxed)
}

fn open(s: &TestServer) -> u64 {
    s.server().stats().shards[0].open.load(Ordering::Relaxed)
}

fn publish(s: &TestServer, n: u32) {
    let (st, body) = s.publish(&format!(
        r#"{{"workspace_id":"ws_f","type":"tick","payload":{{"n":{n}}}}}"#
    ));
    assert_eq!(st, 202, "{body}");
}

/// Reads the next event and checks it is tick `n`.
fn tick(ws: &mut Ws, n: u32) {
    let v = json(&read_event(ws));
    assert_eq!(v["payload"]["n"], n, "{v}");
}

/// The shard still serves: a new client subscribes and answers a ping, the bystanders get the
/// next event exactly once.
fn still_serving(s: &TestServer, bystanders: &mut [Ws], n: u32) {
    publish(s, n);
    for b in bystanders.iter_mut() {
        tick(b, n);
    }
    let mut late = s.subscribe("ws_f", "late");
    late.send(Message::Ping(b"ordinary".to_vec())).unwrap();
    expect_pong(&mut late, b"ordinary");
    assert_eq!(panics(s), 1, "one panic, caught");
}

#[test]
fn a_fault_reading_a_connection_closes_it_1011() {
    let faults = Arc::new(Faults::default());
    let s = server(&faults);
    let mut victim = s.subscribe("ws_f", "victim");
    let mut bystander = s.subscribe("ws_f", "bystander");
    faults.plant(Point::Read, Some("victim"));
    victim.send(Message::Ping(b"x".to_vec())).unwrap();
    assert_eq!(
        expect_close(&mut victim, false),
        (1011, "unexpected server error".into())
    );
    still_serving(&s, std::slice::from_mut(&mut bystander), 1);
}

#[test]
fn a_fault_delivering_to_one_connection_closes_it_and_the_event_reaches_the_rest() {
    let faults = Arc::new(Faults::default());
    let s = server(&faults);
    // Recipients in this order: the fault strikes in the middle of the fan-out.
    let mut before = s.subscribe("ws_f", "before");
    let mut victim = s.subscribe("ws_f", "victim");
    let mut after = s.subscribe("ws_f", "after");
    faults.plant(Point::Deliver, Some("victim"));
    publish(&s, 1);
    tick(&mut before, 1);
    tick(&mut after, 1);
    assert_eq!(expect_close(&mut victim, true).0, 1011);
    // Nothing twice: the next event is the next thing each reads.
    still_serving(&s, &mut [before, after], 2);
}

#[test]
fn a_fault_flushing_one_connection_closes_it_1011() {
    let faults = Arc::new(Faults::default());
    let s = server(&faults);
    let mut victim = s.subscribe("ws_f", "victim");
    let mut bystander = s.subscribe("ws_f", "bystander");
    faults.plant(Point::Flush, Some("victim"));
    publish(&s, 1);
    tick(&mut bystander, 1);
    assert_eq!(expect_close(&mut victim, false).0, 1011);
    still_serving(&s, std::slice::from_mut(&mut bystander), 2);
}

#[test]
fn a_fault_in_a_connections_timer_closes_it_1011() {
    let faults = Arc::new(Faults::default());
    let s = server(&faults);
    let mut victim = s.subscribe("ws_f", "victim");
    let mut bystander = s.subscribe("ws_f", "bystander");
    faults.plant(Point::Timer, Some("victim"));
    // Its next heartbeat (every 200 ms) is the fault.
    assert_eq!(expect_close(&mut victim, false).0, 1011);
    assert!(read_text(&mut bystander).contains("heartbeat"));
    still_serving(&s, std::slice::from_mut(&mut bystander), 1);
}

#[test]
fn a_fault_accepting_a_socket_closes_that_socket_only() {
    let faults = Arc::new(Faults::default());
    let s = server(&faults);
    let mut bystander = s.subscribe("ws_f", "bystander");
    faults.plant(Point::Accept, None);
    let mut sock = std::net::TcpStream::connect(s.public).unwrap();
    sock.set_read_timeout(Some(WAIT)).unwrap();
    let mut b = [0u8; 1];
    // Closed without a byte: end of stream or a reset, never a timeout.
    match sock.read(&mut b) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("the faulted socket was not closed: {other:?}"),
    }
    still_serving(&s, std::slice::from_mut(&mut bystander), 1);
    assert_eq!(
        s.server().stats().shards[0]
            .accepted
            .load(Ordering::Relaxed),
        3
    );
}

#[test]
fn a_fault_removing_a_connection_still_removes_it() {
    let faults = Arc::new(Faults::default());
    let s = server(&faults);
    let victim = s.subscribe("ws_f", "victim");
    let mut bystander = s.subscribe("ws_f", "bystander");
    faults.plant(Point::Reap, Some("victim"));
    // The victim's socket just ends (no close frame, so it is still subscribed when it is
    // removed): its removal is the fault.
    drop(victim);
    assert!(
        eventually(WAIT, || panics(&s) == 1),
        "the fault never fired"
    );
    // The panic is counted before the removal completes: wait for the count, too.
    assert!(
        eventually(WAIT, || open(&s) == 1),
        "the victim is not gone from the open count ({})",
        open(&s)
    );
    still_serving(&s, std::slice::from_mut(&mut bystander), 1);
    // Its socket was counted closed: once the late client (gone with `still_serving`) is
    // removed too, only the bystander is open. (Waiting for 2 raced the late client's close.)
    assert!(
        eventually(WAIT, || open(&s) == 1),
        "open connections: {}, want the bystander alone",
        open(&s)
    );
}
