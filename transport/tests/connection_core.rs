//! Property tests of the connection core: random interleavings of attempts that are established
//! or fail (with retryable or permanent errors), connections that end after a random uptime, a
//! hub that announces its stop with a retry window, timers that fire (due, early, or late),
//! manual reconnects, channels that register, resync and leave, stale events of replaced
//! connections, and closing — with time only moving forward. A small model of what the shell
//! knows (which connection is out, whether it is up, the backoff draws since the sequence last
//! reset) is checked against every action after every step.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use tether_transport::breaker::BreakerState;
use tether_transport::core::{Action, ConnectionCore, Event, Link, ReconnectOutcome, Timer};
use tether_transport::protocol::{
    ErrorCode, ErrorFrame, RetryWindow, SessionId, CLOSE_SESSION_TAKEN_OVER,
};
use tether_transport::reconnect::OnExhausted;
use tether_transport::state::is_valid_transition;
use tether_transport::{
    ConnectionState, ConnectionStateChanged, TransitionReason, TransportConfig, TransportError,
};

const ENDPOINTS: [&str; 3] = ["ws://a.test/ws", "ws://b.test/ws", "ws://c.test/ws"];
const CHANNELS: [&str; 3] = ["alpha", "beta", "gamma"];
/// Rounding slack for delays computed in floating point.
const SLACK: Duration = Duration::from_millis(2);

/// The reconnect policy of one run (kept to check the delays against).
#[derive(Debug, Clone)]
struct Policy {
    endpoints: usize,
    initial: Duration,
    max: Duration,
    multiplier: f64,
    jitter: f64,
    max_attempts: Option<u32>,
    on_exhausted: OnExhausted,
    suspend: Duration,
    stability: Duration,
    spread: Duration,
    manual_interval: Duration,
    seed: u64,
}

impl Policy {
    fn config(&self) -> TransportConfig {
        let mut b = TransportConfig::builder(ENDPOINTS[0]).client_id("c1");
        for e in &ENDPOINTS[1..self.endpoints] {
            b = b.endpoint(*e);
        }
        b.backoff(self.initial, self.max, self.multiplier)
            .jitter(self.jitter)
            .max_attempts(self.max_attempts)
            .on_exhausted(self.on_exhausted)
            .suspend_interval(self.suspend)
            .stability_window(self.stability)
            .fast_retry_spread(self.spread)
            .manual_reconnect_interval(self.manual_interval)
            .seed(self.seed)
            .build()
            .expect("a valid config")
    }

    /// The lowest delay the backoff may pick for its draw number `n` (0-based) since the
    /// sequence last reset: initial × multiplier^n, capped, less the jitter.
    fn backoff_floor(&self, n: u32) -> Duration {
        let base = (self.initial.as_secs_f64() * self.multiplier.powi(n.min(1_000) as i32))
            .min(self.max.as_secs_f64());
        Duration::from_secs_f64(base * (1.0 - self.jitter)).saturating_sub(SLACK)
    }

    fn probe_bounds(&self) -> (Duration, Duration) {
        (
            self.suspend
                .mul_f64(1.0 - self.jitter)
                .saturating_sub(SLACK),
            self.suspend.mul_f64(1.0 + self.jitter) + SLACK,
        )
    }
}

fn policy() -> impl Strategy<Value = Policy> {
    (
        1usize..=3,
        100u64..2_000,
        1u32..=64,
        prop_oneof![Just(1.0), Just(2.0), 1.0f64..3.0],
        prop_oneof![Just(0.0), Just(0.25), 0.0f64..0.6],
        prop_oneof![Just(None), (1u32..6).prop_map(Some)],
        prop_oneof![Just(OnExhausted::Suspend), Just(OnExhausted::Fail)],
        1_000u64..60_000,
        200u64..5_000,
        prop_oneof![Just(0u64), 1u64..=250],
        prop_oneof![Just(0u64), 1u64..3_000],
        any::<u64>(),
    )
        .prop_map(
            |(
                endpoints,
                initial,
                max_factor,
                multiplier,
                jitter,
                max_attempts,
                on_exhausted,
                suspend,
                stability,
                spread,
                manual,
                seed,
            )| Policy {
                endpoints,
                initial: Duration::from_millis(initial),
                max: Duration::from_millis(initial * u64::from(max_factor)),
                multiplier,
                jitter,
                max_attempts,
                on_exhausted,
                suspend: Duration::from_millis(suspend),
                stability: Duration::from_millis(stability),
                spread: Duration::from_millis(spread),
                manual_interval: Duration::from_millis(manual),
                seed,
            },
        )
}

/// How a connection (or an attempt) ends.
#[derive(Debug, Clone, Copy)]
enum Ending {
    /// Refused, reset, timed out: worth retrying.
    Retryable(u8),
    /// Another connection took the session over (retryable, the session is dropped).
    TakenOver,
    /// Auth rejected, unsupported version, a permanent remote error: no automatic retry.
    Permanent(u8),
}

impl Ending {
    fn error(self) -> TransportError {
        match self {
            Ending::Retryable(0) => TransportError::Connect {
                endpoint: ENDPOINTS[0].into(),
                message: "refused".into(),
            },
            Ending::Retryable(1) => TransportError::HandshakeTimeout {
                endpoint: ENDPOINTS[0].into(),
                after: Duration::from_secs(5),
            },
            Ending::Retryable(2) => TransportError::HeartbeatTimeout {
                silent_for: Duration::from_secs(30),
            },
            Ending::Retryable(_) => TransportError::ConnectionClosed {
                code: Some(1006),
                reason: "reset".into(),
            },
            Ending::TakenOver => TransportError::ConnectionClosed {
                code: Some(CLOSE_SESSION_TAKEN_OVER),
                reason: "taken over".into(),
            },
            Ending::Permanent(0) => TransportError::AuthRejected {
                message: "no".into(),
            },
            Ending::Permanent(1) => TransportError::UnsupportedVersion {
                got: 9,
                supported: vec![2],
            },
            Ending::Permanent(_) => TransportError::Remote {
                code: ErrorCode::NotAuthorized,
                category: tether_transport::ErrorCategory::Auth,
                permanent: true,
                message: "forbidden".into(),
            },
        }
    }
}

fn ending() -> impl Strategy<Value = Ending> {
    prop_oneof![
        8 => (0u8..4).prop_map(Ending::Retryable),
        1 => Just(Ending::TakenOver),
        1 => (0u8..3).prop_map(Ending::Permanent),
    ]
}

/// An event about a connection that is no longer the current one.
#[derive(Debug, Clone, Copy)]
enum StaleKind {
    Established,
    Ended,
    HubError,
}

/// One thing that happens.
#[derive(Debug, Clone)]
enum Op {
    /// Time passes, without any event.
    Advance(u64),
    /// The clock moves to the retry deadline (if any) and the timer fires.
    FireRetry,
    /// The clock moves to the stability deadline (if any) and the timer fires.
    FireStability,
    /// A timer fires now, whether due or not.
    FireNow(bool),
    /// The attempt out completes its handshake.
    Establish(bool),
    /// The attempt out fails before its handshake.
    Fail(Ending),
    /// The connection up ends after being up this long (ms).
    Lose(u64, Ending),
    /// The hub says it is stopping, with a retry window (min, span) or none.
    HubStopping(Option<(u64, u64)>),
    /// The hub sends an error frame of another kind.
    HubOtherError,
    /// An event about a replaced connection.
    Stale(StaleKind),
    /// The application asks for `reconnect_now()`.
    ReconnectNow,
    /// A channel registers (held: a running channel already has the name).
    Register(usize, bool),
    /// A channel leaves the registry.
    Unregister(usize),
    /// A channel reports its resync (of the current generation, or a stale one).
    Synced(usize, bool),
    /// The application closes the transport.
    Close,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u64..5_000).prop_map(Op::Advance),
        10 => Just(Op::FireRetry),
        4 => Just(Op::FireStability),
        2 => any::<bool>().prop_map(Op::FireNow),
        10 => any::<bool>().prop_map(Op::Establish),
        10 => ending().prop_map(Op::Fail),
        6 => (prop_oneof![0u64..500, 0u64..20_000], ending()).prop_map(|(up, e)| Op::Lose(up, e)),
        2 => prop_oneof![
            3 => (0u64..10_000, 0u64..10_000).prop_map(Some),
            1 => Just(None),
        ]
        .prop_map(Op::HubStopping),
        1 => Just(Op::HubOtherError),
        2 => prop_oneof![
            Just(StaleKind::Established),
            Just(StaleKind::Ended),
            Just(StaleKind::HubError)
        ]
        .prop_map(Op::Stale),
        3 => Just(Op::ReconnectNow),
        3 => (0..CHANNELS.len(), prop::bool::weighted(0.1)).prop_map(|(c, h)| Op::Register(c, h)),
        1 => (0..CHANNELS.len()).prop_map(Op::Unregister),
        4 => (0..CHANNELS.len(), prop::bool::weighted(0.2)).prop_map(|(c, s)| Op::Synced(c, s)),
        1 => Just(Op::Close),
    ]
}

/// What the shell knows, and what the core's past actions promise.
struct Model {
    policy: Policy,
    now: Instant,
    state: ConnectionState,
    /// The connection out (the last `Connect` not yet ended or closed) and its endpoint.
    out: Option<(u64, String)>,
    /// When the connection out completed its handshake.
    up_since: Option<Instant>,
    last_conn_id: u64,
    /// Backoff draws since the sequence last reset (a lower bound where the core's choice is
    /// not visible).
    draws: u32,
    failover_left: usize,
    endpoint_index: usize,
    /// A stop window the hub announced on the connection out.
    hub_window: Option<RetryWindow>,
    channels: BTreeSet<String>,
    /// Channels of the current resync that have not answered.
    owed: BTreeSet<String>,
    generation: u64,
    ever_connected: bool,
    reconnect_count: u64,
    attempt: u32,
    last_manual: Option<Instant>,
    closed: bool,
    sessions: u64,
}

/// What one step produced, split up.
struct Step {
    actions: Vec<Action>,
}

impl Step {
    fn transitions(&self) -> Vec<&ConnectionStateChanged> {
        self.actions
            .iter()
            .filter_map(|a| match a {
                Action::StateChanged(e) => Some(e),
                _ => None,
            })
            .collect()
    }

    fn last_transition(&self) -> Option<&ConnectionStateChanged> {
        self.transitions().pop()
    }

    fn connects(&self) -> usize {
        self.actions
            .iter()
            .filter(|a| matches!(a, Action::Connect { .. }))
            .count()
    }
}

impl Model {
    fn new(policy: Policy, now: Instant) -> Self {
        let failover_left = policy.endpoints - 1;
        Model {
            policy,
            now,
            state: ConnectionState::Initialized,
            out: None,
            up_since: None,
            last_conn_id: 0,
            draws: 0,
            failover_left,
            endpoint_index: 0,
            hub_window: None,
            channels: BTreeSet::new(),
            owed: BTreeSet::new(),
            generation: 0,
            ever_connected: false,
            reconnect_count: 0,
            attempt: 0,
            last_manual: None,
            closed: false,
            sessions: 0,
        }
    }

    fn expected_endpoint(&self) -> &'static str {
        ENDPOINTS[self.endpoint_index % self.policy.endpoints]
    }

    /// Checks every action of a step against the model and the transition table, and updates
    /// the model with what they say. `manual` says whether the step was a `reconnect_now()`.
    fn absorb(&mut self, core: &ConnectionCore, step: &Step, manual: bool) {
        let was_closed = self.closed;
        let was_failed = self.state == ConnectionState::Failed;
        let mut connecting_announced = false;
        for action in &step.actions {
            match action {
                Action::StateChanged(e) => {
                    assert_eq!(
                        e.from, self.state,
                        "the transition starts where the last ended"
                    );
                    assert!(
                        is_valid_transition(e.from, e.to),
                        "illegal transition {} → {} ({})",
                        e.from,
                        e.to,
                        e.reason
                    );
                    assert!(!was_closed, "a transition after Close: {e:?}");
                    if e.to == ConnectionState::Connecting {
                        connecting_announced = true;
                    }
                    // A retry is announced exactly when one is scheduled.
                    if matches!(e.to, ConnectionState::Failed | ConnectionState::Closed) {
                        assert_eq!(e.retry_in, None);
                    }
                    self.state = e.to;
                }
                Action::Connect {
                    conn_id,
                    endpoint,
                    hello,
                    attempt,
                } => {
                    assert!(!was_closed, "Connect after Close");
                    assert!(
                        self.out.is_none(),
                        "a second attempt while {:?} is out",
                        self.out
                    );
                    assert!(
                        connecting_announced && self.state == ConnectionState::Connecting,
                        "Connect without a transition to Connecting"
                    );
                    assert!(
                        !was_failed || manual,
                        "Connect from Failed without reconnect_now"
                    );
                    assert!(*conn_id > self.last_conn_id, "connection ids only grow");
                    assert_eq!(endpoint, self.expected_endpoint(), "endpoint rotation");
                    assert_eq!(hello.client_id.0, "c1");
                    assert!(
                        *attempt == self.attempt + 1 || *attempt == 1,
                        "attempt {attempt} after {}",
                        self.attempt
                    );
                    self.attempt = *attempt;
                    self.last_conn_id = *conn_id;
                    self.out = Some((*conn_id, endpoint.clone()));
                    self.up_since = None;
                }
                Action::CloseConnection => {
                    assert!(self.out.take().is_some(), "CloseConnection with none out");
                    self.up_since = None;
                }
                Action::LinkAll(Link::Closed) | Action::Stop => {}
                Action::LinkAll(Link::Up { generation, .. }) => {
                    assert!(!was_closed);
                    assert_eq!(self.state, ConnectionState::Syncing);
                    assert_eq!(*generation, self.generation + 1, "a new resync generation");
                    self.generation = *generation;
                    self.owed = self.channels.clone();
                }
                Action::LinkAll(link) => {
                    assert!(!was_closed, "{link:?} after Close");
                }
                Action::LinkOne { name, link } => {
                    assert!(!was_closed, "{link:?} to {name} after Close");
                }
            }
        }
        if was_closed {
            assert!(
                step.actions
                    .iter()
                    .all(|a| matches!(a, Action::LinkAll(Link::Closed) | Action::Stop)),
                "after Close: {:?}",
                step.actions
            );
        }
        if step.actions.iter().any(|a| matches!(a, Action::Stop)) {
            self.closed = true;
        }
        if self.state == ConnectionState::Closed {
            assert!(self.closed, "Closed without Stop");
        }
        if !self.state.is_up() {
            self.owed.clear();
        }
        self.check(core);
    }

    /// Invariants that hold between any two steps.
    fn check(&mut self, core: &ConnectionCore) {
        assert_eq!(core.state(), self.state, "the published state is the state");
        assert_eq!(
            core.conn_id(),
            self.out.as_ref().map(|(id, _)| *id),
            "at most one attempt out, the last one"
        );
        let status = core.status(self.now);
        assert!(
            status.reconnect_count >= self.reconnect_count,
            "reconnect count went down"
        );
        assert_eq!(status.reconnect_count, self.reconnect_count);
        // The attempt number only grows, or the sequence resets to zero.
        assert!(
            status.attempt == self.attempt || status.attempt == 0,
            "attempt {} after {}",
            status.attempt,
            self.attempt
        );
        if status.attempt == 0 {
            self.attempt = 0;
            self.draws = 0;
        }
        assert!(core.sync_generation() >= self.generation);
        assert_eq!(core.sync_generation(), self.generation);
        let retry = core.deadline(Timer::Retry);
        if retry.is_some() {
            assert!(
                matches!(
                    self.state,
                    ConnectionState::Disconnected | ConnectionState::Suspended
                ),
                "a retry scheduled in {}",
                self.state
            );
        }
        if core.deadline(Timer::Stability).is_some() {
            assert!(self.state.is_up(), "a stability check in {}", self.state);
        }
        if self.state.is_up() {
            assert!(self.up_since.is_some());
            assert_eq!(core.connected_at(), self.up_since);
        } else {
            assert_eq!(core.connected_at(), None);
        }
        assert_eq!(
            self.state == ConnectionState::Syncing,
            self.state.is_up() && !self.owed.is_empty(),
            "Syncing exactly while channels owe their resync ({:?})",
            self.owed
        );
        let names: BTreeSet<String> = core.channels().map(str::to_owned).collect();
        assert_eq!(names, self.channels);
        if self.closed {
            assert_eq!(self.state, ConnectionState::Closed);
            assert_eq!(retry, None);
            assert_eq!(core.deadline(Timer::Stability), None);
            assert!(self.channels.is_empty());
        }
        if self.state == ConnectionState::Failed {
            assert_eq!(retry, None, "Failed schedules nothing");
        }
    }

    /// Checks the wait the core chose after a connection or attempt ended, and what it says
    /// about the backoff sequence. `quick`: whether the retry may (or must) come at once instead
    /// of after a backoff step; `window`: the hub's stop window, if it applies.
    fn check_wait(
        &mut self,
        core: &ConnectionCore,
        step: &Step,
        ending: Ending,
        quick: Quick,
        window: Option<RetryWindow>,
    ) {
        let t = step
            .last_transition()
            .unwrap_or_else(|| panic!("an end changes the state: {:?}", step.actions));
        if let Ending::Permanent(_) = ending {
            assert_eq!(t.to, ConnectionState::Failed);
            assert!(
                matches!(t.reason, TransitionReason::PermanentError(_)),
                "{}",
                t.reason
            );
            assert!(step
                .actions
                .iter()
                .any(|a| matches!(a, Action::LinkAll(Link::Failed(e)) if e.is_permanent())));
            return;
        }
        let spread = self.policy.spread;
        match t.to {
            ConnectionState::Disconnected => {
                let delay = t
                    .retry_in
                    .expect("the exponential strategy always schedules");
                assert_eq!(core.deadline(Timer::Retry), Some(self.now + delay));
                let reset = core.status(self.now).attempt == 0;
                let lower_window =
                    window.map_or(Duration::ZERO, |w| Duration::from_millis(w.min_ms));
                assert!(
                    delay >= lower_window,
                    "{delay:?} before the hub's window {window:?}"
                );
                match quick {
                    Quick::Failover => {
                        assert!(!reset);
                        assert!(delay <= spread, "failover waited {delay:?}");
                    }
                    Quick::No => {
                        assert!(!reset, "the sequence reset after a failure");
                        let floor = self.policy.backoff_floor(self.draws);
                        assert!(
                            delay >= floor,
                            "{delay:?} below the backoff floor {floor:?} (draw {})",
                            self.draws
                        );
                        self.draws += 1;
                    }
                    Quick::Must | Quick::May => {
                        if quick == Quick::Must {
                            assert!(reset, "a stable connection's loss resets the sequence");
                        }
                        if reset {
                            let upper = window
                                .map_or(spread, |w| spread.max(Duration::from_millis(w.max_ms)));
                            assert!(delay <= upper, "the fast retry waited {delay:?}");
                            assert_eq!(t.attempt, 1);
                            self.draws = 0;
                        } else {
                            let floor = self.policy.backoff_floor(self.draws);
                            assert!(delay >= floor, "{delay:?} below {floor:?}");
                            self.draws += 1;
                        }
                    }
                }
            }
            ConnectionState::Suspended => {
                assert_eq!(self.policy.on_exhausted, OnExhausted::Suspend);
                assert!(
                    self.policy.max_attempts.is_some(),
                    "the breaker never opens"
                );
                assert!(matches!(t.reason, TransitionReason::BreakerOpened { .. }));
                let probe = t.retry_in.expect("a probe is scheduled");
                let (lo, hi) = self.policy.probe_bounds();
                assert!(probe >= lo && probe <= hi, "probe in {probe:?}");
                assert_eq!(core.deadline(Timer::Retry), Some(self.now + probe));
                assert_eq!(core.status(self.now).breaker, BreakerState::Open);
            }
            ConnectionState::Failed => {
                assert_eq!(self.policy.on_exhausted, OnExhausted::Fail);
                assert!(
                    matches!(t.reason, TransitionReason::GaveUp { .. }),
                    "{}",
                    t.reason
                );
            }
            other => panic!("an end leads to {other}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Quick {
    /// Backoff (or the breaker).
    No,
    /// An untried endpoint: at once (within the spread).
    Failover,
    /// A stable connection with a closed breaker: at once.
    Must,
    /// A stable connection with the breaker not closed: at once if its success closes it.
    May,
}

fn feed(core: &mut ConnectionCore, now: Instant, event: Event) -> Step {
    core.handle(now, event);
    Step {
        actions: core.drain_actions().collect(),
    }
}

fn run(policy: Policy, ops: Vec<Op>, register_first: usize, stop_at_end: bool) {
    let start = Instant::now();
    let mut core = ConnectionCore::new(&policy.config(), start);
    let mut m = Model::new(policy, start);

    for name in &CHANNELS[..register_first] {
        core.register_channel(name, false).unwrap();
        assert!(core.drain_actions().next().is_none(), "nothing to tell yet");
        m.channels.insert((*name).to_owned());
    }
    let step = feed(&mut core, m.now, Event::Started);
    m.absorb(&core, &step, false);
    assert_eq!(step.connects(), 1, "Started connects at once");

    for op in ops {
        let before_retry = core.deadline(Timer::Retry);
        let before_stability = core.deadline(Timer::Stability);
        let before_state = m.state;
        match op {
            Op::Advance(ms) => {
                m.now += Duration::from_millis(ms);
                m.check(&core);
            }
            Op::FireRetry => {
                if let Some(at) = before_retry {
                    m.now = m.now.max(at);
                }
                let step = feed(&mut core, m.now, Event::Timeout(Timer::Retry));
                m.absorb(&core, &step, false);
                if before_retry.is_some() {
                    assert_eq!(step.connects(), 1, "a due retry connects");
                    let reason = &step.last_transition().unwrap().reason;
                    match before_state {
                        ConnectionState::Disconnected => {
                            assert_eq!(*reason, TransitionReason::RetryDue)
                        }
                        ConnectionState::Suspended => {
                            assert_eq!(*reason, TransitionReason::ProbeDue)
                        }
                        other => panic!("a retry was scheduled in {other}"),
                    }
                    assert_eq!(core.deadline(Timer::Retry), None);
                } else {
                    assert!(step.actions.is_empty(), "no retry was scheduled");
                }
            }
            Op::FireStability => {
                if let Some(at) = before_stability {
                    m.now = m.now.max(at);
                }
                let step = feed(&mut core, m.now, Event::Timeout(Timer::Stability));
                m.absorb(&core, &step, false);
                assert!(step.actions.is_empty(), "the stability check only counts");
                if let Some(at) = core.deadline(Timer::Stability) {
                    // The breaker is not closed yet: check again a window later.
                    assert!(before_stability.is_some());
                    assert_eq!(at, m.now + m.policy.stability);
                    assert_ne!(core.status(m.now).breaker, BreakerState::Closed);
                } else if before_stability.is_some() {
                    assert_eq!(core.status(m.now).breaker, BreakerState::Closed);
                    assert_eq!(core.status(m.now).attempt, 0, "the sequence resets");
                }
            }
            Op::FireNow(retry) => {
                let timer = if retry {
                    Timer::Retry
                } else {
                    Timer::Stability
                };
                let due = core.deadline(timer).is_some_and(|at| at <= m.now);
                let step = feed(&mut core, m.now, Event::Timeout(timer));
                m.absorb(&core, &step, false);
                if !due {
                    assert!(step.actions.is_empty(), "a timer before its deadline");
                    assert_eq!(core.deadline(Timer::Retry), before_retry);
                    assert_eq!(core.deadline(Timer::Stability), before_stability);
                }
            }
            Op::Establish(resumed) => {
                let Some((conn_id, endpoint)) = m.out.clone() else {
                    continue;
                };
                if m.up_since.is_some() {
                    continue;
                }
                m.sessions += 1;
                let session = SessionId(format!("s{}", m.sessions));
                let step = feed(
                    &mut core,
                    m.now,
                    Event::Established {
                        conn_id,
                        endpoint,
                        session: session.clone(),
                        resumed,
                    },
                );
                m.up_since = Some(m.now);
                if m.ever_connected {
                    m.reconnect_count += 1;
                }
                m.ever_connected = true;
                m.absorb(&core, &step, false);
                let states: Vec<_> = step.transitions().iter().map(|e| e.to).collect();
                if m.channels.is_empty() {
                    assert_eq!(states, [ConnectionState::Connected]);
                } else {
                    assert_eq!(
                        states,
                        [ConnectionState::Connected, ConnectionState::Syncing]
                    );
                }
                assert_eq!(core.session(), Some(&session));
                assert_eq!(
                    core.deadline(Timer::Stability),
                    Some(m.now + m.policy.stability)
                );
                assert_eq!(core.deadline(Timer::Retry), None);
            }
            Op::Fail(ending) => {
                let Some((conn_id, _)) = m.out.clone() else {
                    continue;
                };
                if m.up_since.is_some() {
                    continue;
                }
                // A stop window announced before the handshake ends with the attempt.
                m.hub_window = None;
                let quick = match ending {
                    Ending::Permanent(_) => Quick::No,
                    _ => {
                        m.endpoint_index += 1;
                        if m.failover_left > 0 {
                            m.failover_left -= 1;
                            Quick::Failover
                        } else {
                            Quick::No
                        }
                    }
                };
                m.out = None;
                let step = feed(
                    &mut core,
                    m.now,
                    Event::Ended {
                        conn_id,
                        error: ending.error(),
                        established: false,
                    },
                );
                m.absorb(&core, &step, false);
                assert!(
                    !step
                        .actions
                        .iter()
                        .any(|a| matches!(a, Action::LinkAll(Link::Down(_)))),
                    "the channels never heard of this attempt"
                );
                m.check_wait(&core, &step, ending, quick, None);
            }
            Op::Lose(uptime, ending) => {
                let Some((conn_id, _)) = m.out.clone() else {
                    continue;
                };
                let Some(since) = m.up_since else {
                    continue;
                };
                m.now = m.now.max(since + Duration::from_millis(uptime));
                // The stability timer may be due and not have fired: the loss itself must count
                // the connection as stable then.
                let up_for = m.now - since;
                let stable = up_for >= m.policy.stability;
                let breaker = core.status(m.now).breaker;
                let window = m.hub_window.take();
                let quick = if !stable {
                    Quick::No
                } else if breaker == BreakerState::Closed {
                    Quick::Must
                } else {
                    Quick::May
                };
                if !matches!(ending, Ending::Permanent(_)) {
                    m.failover_left = m.policy.endpoints - 1;
                }
                m.out = None;
                m.up_since = None;
                let step = feed(
                    &mut core,
                    m.now,
                    Event::Ended {
                        conn_id,
                        error: ending.error(),
                        established: true,
                    },
                );
                m.absorb(&core, &step, false);
                assert_eq!(
                    step.actions
                        .iter()
                        .filter(|a| matches!(a, Action::LinkAll(Link::Down(_))))
                        .count(),
                    1,
                    "the channels hear the connection is down"
                );
                assert!(!step
                    .transitions()
                    .iter()
                    .any(|t| matches!(t.reason, TransitionReason::AttemptFailed(_))));
                m.check_wait(&core, &step, ending, quick, window);
                if let Ending::TakenOver = ending {
                    assert_eq!(core.session(), None, "a session taken over is not resumed");
                }
            }
            Op::HubStopping(window) => {
                let Some((conn_id, _)) = m.out.clone() else {
                    continue;
                };
                let window = window.map(|(min, span)| RetryWindow::from([min, min + span]));
                let mut error = ErrorFrame::from_error(&TransportError::ConnectionClosed {
                    code: None,
                    reason: "stopping".into(),
                });
                error.code = ErrorCode::ShuttingDown;
                error.retry_after_ms = window;
                let step = feed(&mut core, m.now, Event::HubError { conn_id, error });
                m.absorb(&core, &step, false);
                assert!(step.actions.is_empty(), "an error frame only informs");
                // It applies when this connection ends after its handshake.
                m.hub_window = window;
            }
            Op::HubOtherError => {
                let Some((conn_id, _)) = m.out.clone() else {
                    continue;
                };
                let error = ErrorFrame::from_error(&TransportError::Remote {
                    code: ErrorCode::Overloaded,
                    category: tether_transport::ErrorCategory::Service,
                    permanent: false,
                    message: "busy".into(),
                });
                let step = feed(&mut core, m.now, Event::HubError { conn_id, error });
                m.absorb(&core, &step, false);
                assert!(step.actions.is_empty(), "an error frame only informs");
            }
            Op::Stale(kind) => {
                let current = m.out.as_ref().map(|(id, _)| *id);
                // The newest id that is not the current one.
                let stale = if current == Some(m.last_conn_id) {
                    m.last_conn_id - 1
                } else {
                    m.last_conn_id
                };
                if stale == 0 {
                    continue;
                }
                let event = match kind {
                    StaleKind::Established => Event::Established {
                        conn_id: stale,
                        endpoint: ENDPOINTS[0].into(),
                        session: SessionId("stale".into()),
                        resumed: true,
                    },
                    StaleKind::Ended => Event::Ended {
                        conn_id: stale,
                        error: Ending::Permanent(0).error(),
                        established: true,
                    },
                    StaleKind::HubError => {
                        let mut error = ErrorFrame::from_error(&TransportError::Closed);
                        error.code = ErrorCode::ShuttingDown;
                        error.retry_after_ms = Some(RetryWindow::from([50_000, 60_000]));
                        Event::HubError {
                            conn_id: stale,
                            error,
                        }
                    }
                };
                let session = core.session().cloned();
                let step = feed(&mut core, m.now, event);
                m.absorb(&core, &step, false);
                assert!(step.actions.is_empty(), "a stale event is ignored");
                assert_eq!(core.deadline(Timer::Retry), before_retry);
                assert_eq!(core.deadline(Timer::Stability), before_stability);
                assert_eq!(core.session().cloned(), session);
            }
            Op::ReconnectNow => {
                let result = core.reconnect_now(m.now);
                let step = Step {
                    actions: core.drain_actions().collect(),
                };
                let rate_limited = m.last_manual.is_some_and(|at| {
                    m.now.saturating_duration_since(at) < m.policy.manual_interval
                });
                let expected = match before_state {
                    ConnectionState::Closed => Err(TransportError::Closed),
                    ConnectionState::Connected | ConnectionState::Syncing => {
                        Ok(ReconnectOutcome::AlreadyConnected)
                    }
                    ConnectionState::Connecting | ConnectionState::Initialized => {
                        Ok(ReconnectOutcome::AlreadyConnecting)
                    }
                    _ if rate_limited => Err(TransportError::RateLimited {
                        retry_after: m.policy.manual_interval
                            - m.now.saturating_duration_since(m.last_manual.unwrap()),
                    }),
                    _ => Ok(ReconnectOutcome::Started),
                };
                assert_eq!(result, expected, "reconnect_now in {before_state}");
                if result == Ok(ReconnectOutcome::Started) {
                    m.last_manual = Some(m.now);
                    if before_state == ConnectionState::Failed {
                        // The whole sequence starts over.
                        m.attempt = 0;
                        m.draws = 0;
                        assert!(matches!(step.actions[0], Action::LinkAll(Link::Retrying)));
                    }
                    m.absorb(&core, &step, true);
                    assert_eq!(step.connects(), 1);
                    assert_eq!(
                        step.last_transition().unwrap().reason,
                        TransitionReason::ManualReconnect
                    );
                    assert_eq!(core.deadline(Timer::Retry), None, "the wait is cancelled");
                } else {
                    m.absorb(&core, &step, true);
                    assert!(step.actions.is_empty(), "{result:?} changes nothing");
                }
            }
            Op::Register(c, held) => {
                let name = CHANNELS[c];
                let result = core.register_channel(name, held);
                let step = Step {
                    actions: core.drain_actions().collect(),
                };
                if m.closed {
                    assert_eq!(result, Err(TransportError::Closed));
                } else if held {
                    assert!(matches!(result, Err(TransportError::ChannelInUse { .. })));
                } else {
                    assert_eq!(result, Ok(()));
                    m.channels.insert(name.to_owned());
                }
                m.absorb(&core, &step, false);
                match (&result, m.state) {
                    (Ok(()), ConnectionState::Failed) => assert!(matches!(
                        &step.actions[..],
                        [Action::LinkOne {
                            link: Link::Failed(_),
                            ..
                        }]
                    )),
                    (Ok(()), s) if s.is_up() => assert!(matches!(
                        &step.actions[..],
                        [Action::LinkOne { link: Link::Up { generation, .. }, .. }]
                            if *generation == m.generation
                    )),
                    _ => assert!(step.actions.is_empty(), "{:?}", step.actions),
                }
            }
            Op::Unregister(c) => {
                let name = CHANNELS[c];
                m.channels.remove(name);
                let owed = m.owed.remove(name);
                let step = feed(&mut core, m.now, Event::ChannelUnregistered(name.into()));
                m.absorb(&core, &step, false);
                check_resynced(&m, &step, owed);
            }
            Op::Synced(c, stale) => {
                let name = CHANNELS[c];
                let generation = if stale {
                    m.generation.saturating_sub(1)
                } else {
                    m.generation
                };
                let owed = generation == m.generation && m.owed.remove(name);
                let step = feed(
                    &mut core,
                    m.now,
                    Event::ChannelSynced {
                        name: name.into(),
                        generation,
                    },
                );
                m.absorb(&core, &step, false);
                check_resynced(&m, &step, owed);
            }
            Op::Close => {
                let had_out = m.out.is_some();
                let first = !m.closed;
                m.channels.clear();
                let step = feed(&mut core, m.now, Event::Close);
                m.absorb(&core, &step, false);
                if first {
                    assert_eq!(
                        step.actions
                            .iter()
                            .filter(|a| matches!(a, Action::CloseConnection))
                            .count(),
                        usize::from(had_out)
                    );
                    assert!(matches!(step.actions.last(), Some(Action::Stop)));
                    let t = step.last_transition().expect("a transition to Closed");
                    assert_eq!(
                        (t.to, &t.reason),
                        (
                            ConnectionState::Closed,
                            &TransitionReason::ClosedByApplication
                        )
                    );
                }
                assert!(m.closed);
            }
        }
        if m.closed {
            assert_eq!(core.reconnect_now(m.now), Err(TransportError::Closed));
            assert!(core.drain_actions().next().is_none());
        }
    }

    if stop_at_end {
        let had_out = m.out.is_some();
        let step = feed(&mut core, m.now, Event::Stopped);
        assert_eq!(
            step.actions.len(),
            usize::from(had_out),
            "{:?}",
            step.actions
        );
        assert!(step
            .actions
            .iter()
            .all(|a| matches!(a, Action::CloseConnection)));
        assert_eq!(core.conn_id(), None, "nothing is left open");
    }
}

/// A resync that is complete leads back to `Connected`, and only then.
fn check_resynced(m: &Model, step: &Step, was_owed: bool) {
    let resynced = step
        .transitions()
        .iter()
        .any(|t| t.reason == TransitionReason::Resynced);
    let expected = was_owed && m.owed.is_empty() && m.state.is_up();
    assert_eq!(resynced, expected, "{:?}", step.actions);
    if !resynced {
        assert!(step.actions.is_empty(), "{:?}", step.actions);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    #[test]
    fn the_connection_core_keeps_its_invariants(
        policy in policy(),
        ops in prop::collection::vec(op(), 1..80),
        register_first in 0..=CHANNELS.len(),
        stop_at_end in any::<bool>(),
    ) {
        run(policy, ops, register_first, stop_at_end);
    }
}
