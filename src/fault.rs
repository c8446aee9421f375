//! Fault injection for the tests of failure isolation: a panic planted at one point of a
//! shard's handling of one connection, to show that it closes that connection (1011) and
//! nothing else. Compiled only with the `fault-injection` feature, which the crate's own tests
//! turn on (a dev-dependency on itself); release builds have none of it, and the points below
//! compile to nothing.

/// Where a planted fault fires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Point {
    /// Reading a connection's bytes.
    Read,
    /// Accepting a socket (the next one accepted).
    Accept,
    /// Queueing an event frame on a connection.
    Deliver,
    /// Writing a connection's queued frames.
    Flush,
    /// A connection's timer (heartbeat, expiry, deadline).
    Timer,
    /// Removing a connection that ended.
    Reap,
    /// Not a panic: the connection's next timer starts the server's 1001 close handshake, as a
    /// drain would, for that one connection.
    Drain,
}

/// The faults planted in one server: each fires once, for the connection of the given user
/// (any connection for [`Point::Accept`]).
#[cfg(feature = "fault-injection")]
#[derive(Debug, Default)]
pub struct Faults {
    planted: std::sync::Mutex<Vec<(Point, Option<String>)>>,
    /// Every shard stops at the start of its next turn while this is set (for at most
    /// [`STALL_LIMIT`]), so that its inbox fills: a shard that cannot keep up, made to order.
    stalled: std::sync::atomic::AtomicBool,
}

/// The longest a stalled shard waits for [`Faults::stall`] to be lifted, so that a test that
/// forgets to lift it fails instead of hanging.
#[cfg(feature = "fault-injection")]
pub const STALL_LIMIT: std::time::Duration = std::time::Duration::from_secs(30);

#[cfg(feature = "fault-injection")]
impl Faults {
    /// Plants a fault at `point`, for `user`'s connection.
    pub fn plant(&self, point: Point, user: Option<&str>) {
        self.planted
            .lock()
            .unwrap()
            .push((point, user.map(str::to_string)));
    }

    /// Stalls every shard at the start of its next turn (`true`) or lets them go on.
    pub fn stall(&self, on: bool) {
        self.stalled.store(on, std::sync::atomic::Ordering::Release);
    }

    /// Whether a fault is planted at `point` for `user`; it is used up if so.
    pub fn take(&self, point: Point, user: Option<&str>) -> bool {
        let mut planted = self.planted.lock().unwrap();
        let hit = planted
            .iter()
            .position(|(p, u)| *p == point && (u.is_none() || u.as_deref() == user));
        hit.map(|i| planted.swap_remove(i)).is_some()
    }
}

/// Panics if a fault is planted at `point` for the user `user()` names. Without the feature,
/// nothing (and `user` is never called).
#[inline(always)]
pub fn point<'a>(
    #[cfg_attr(not(feature = "fault-injection"), allow(unused_variables))] faults: &Option<
        std::sync::Arc<Faults>,
    >,
    #[cfg_attr(not(feature = "fault-injection"), allow(unused_variables))] point: Point,
    #[cfg_attr(not(feature = "fault-injection"), allow(unused_variables))] user: impl FnOnce()
        -> Option<
        &'a str,
    >,
) {
    #[cfg(feature = "fault-injection")]
    if let Some(f) = faults {
        if f.take(point, user()) {
            panic!("fault injection: {point:?}");
        }
    }
}

/// Whether a [`Point::Drain`] is planted for the user `user()` names (used up if so). Without
/// the feature, false.
#[inline(always)]
pub fn drain_one<'a>(
    #[cfg_attr(not(feature = "fault-injection"), allow(unused_variables))] faults: &Option<
        std::sync::Arc<Faults>,
    >,
    #[cfg_attr(not(feature = "fault-injection"), allow(unused_variables))] user: impl FnOnce()
        -> Option<
        &'a str,
    >,
) -> bool {
    #[cfg(feature = "fault-injection")]
    if let Some(f) = faults {
        return f.take(Point::Drain, user());
    }
    false
}

/// Without the feature there is nothing to plant.
#[cfg(not(feature = "fault-injection"))]
#[derive(Debug, Default)]
pub struct Faults;

/// Waits while `Faults::stall` is set (at most `STALL_LIMIT`). Without the feature,
/// nothing.
#[inline(always)]
pub fn stall_point(
    #[cfg_attr(not(feature = "fault-injection"), allow(unused_variables))] faults: &Option<
        std::sync::Arc<Faults>,
    >,
) {
    #[cfg(feature = "fault-injection")]
    if let Some(f) = faults {
        let start = std::time::Instant::now();
        while f.stalled.load(std::sync::atomic::Ordering::Acquire) && start.elapsed() < STALL_LIMIT
        {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
}
