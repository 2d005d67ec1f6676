//! Property tests of the client channel core: random interleavings of publishes, hub steps,
//! duplicated and reordered acks, connection losses, reconnects with resume, replays that overlap
//! what was delivered, history trimmed under the subscriber, hub restarts (new epochs), refused
//! attaches, slow subscribers and time passing — against a minimal model of the hub. Every step
//! checks the delivery invariants of DESIGN.md; a final heal (stable connection, everything
//! read) checks that nothing stays pending and nothing is missing.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use tether_channels::core::{Action, ChannelCore, Event, SubscriberRoom};
use tether_channels::{
    BufferLimits, ChannelError, ChannelEvent, ChannelOptions, ChannelState, OverflowPolicy,
    PublishAck,
};
use tether_transport::protocol::{
    v2, Ack, Attached, Detached, Epoch, ErrorCode, ErrorFrame, Frame, Gap, Message, Offset,
    Payload, Position,
};
use tether_transport::{ErrorCategory, ReconnectPolicy, TransportError};

/// One thing that happens.
#[derive(Debug, Clone)]
enum Op {
    /// The application publishes.
    Publish,
    /// The hub handles the next frame from the client.
    HubStep,
    /// The client receives the next frame from the hub.
    ClientStep,
    /// The next frame to the client, if an ack, arrives twice.
    DuplicateAck,
    /// The next two frames to the client, if both acks, arrive the other way round.
    SwapAcks,
    /// The connection is lost with everything in flight.
    Cut,
    /// A new connection is up.
    Reconnect,
    /// Another publisher's message is numbered on the channel.
    OtherPublisher,
    /// The hub's history forgets its oldest `n` messages.
    Trim(u64),
    /// The hub loses its memory: new epoch, empty history, connection lost.
    HubRestart,
    /// The hub answers the next attach with a retryable error.
    RefuseNextAttach,
    /// The hub replays `n` more messages than asked for on the next attach.
    OverlapNextReplay(u64),
    /// The subscriber reads `n` events.
    Read(usize),
    /// Time passes.
    Advance(u64),
    /// A whole outage in one step: the connection is lost, `n` messages are numbered and all
    /// but the last one leave history, the client reconnects and handles the attach answer
    /// (gaps back to back, even while the subscriber has no room).
    Outage(u64),
    /// The transport fails permanently (connection lost) until a later reconnect.
    TransportFails,
    /// The application detaches (ends the run).
    Detach,
    /// The shell's mailbox is drained: deferred publishes go out.
    Flush,
    /// The client takes up to `n` consecutive messages of one epoch at the head of what the
    /// hub sent as one run (as a v2 message run arrives).
    ClientRun(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        12 => Just(Op::Publish),
        4 => Just(Op::Flush),
        20 => Just(Op::HubStep),
        24 => Just(Op::ClientStep),
        6 => (2usize..8).prop_map(Op::ClientRun),
        2 => Just(Op::DuplicateAck),
        2 => Just(Op::SwapAcks),
        3 => Just(Op::Cut),
        4 => Just(Op::Reconnect),
        5 => Just(Op::OtherPublisher),
        2 => (1u64..6).prop_map(Op::Trim),
        1 => Just(Op::HubRestart),
        1 => Just(Op::RefuseNextAttach),
        1 => (1u64..4).prop_map(Op::OverlapNextReplay),
        6 => (1usize..6).prop_map(Op::Read),
        2 => (1u64..40).prop_map(Op::Advance),
        2 => (1u64..4).prop_map(Op::Outage),
        1 => Just(Op::TransportFails),
        1 => Just(Op::Detach),
    ]
}

fn epoch(n: u32) -> Epoch {
    Epoch(format!("e{n}").into())
}

fn position(epoch: &Epoch, offset: u64) -> Position {
    Position {
        epoch: epoch.clone(),
        offset: Offset(offset),
    }
}

fn lost() -> TransportError {
    TransportError::ConnectionClosed {
        code: None,
        reason: "cut".into(),
    }
}

/// The hub, as little of it as the channel needs: numbering, history with retention, dedupe
/// of replayed publishes, resume plans, fan-out to this one subscriber.
#[derive(Default)]
struct Hub {
    epoch: u32,
    head: u64,
    /// The oldest offset history still has (`head + 1` when it has none).
    first_retained: u64,
    /// Every message ever numbered, by (epoch, offset).
    log: BTreeMap<(u32, u64), Payload>,
    /// This epoch's dedupe table: seq → offset.
    dedupe: HashMap<u64, u64>,
    /// Every (epoch, offset) each seq was ever stored at.
    stored: HashMap<u64, Vec<(u32, u64)>>,
    /// Every seq that ever reached the hub.
    received: HashSet<u64>,
    to_hub: VecDeque<Frame>,
    to_client: VecDeque<Frame>,
    /// The client's attach was handled on this connection: live messages flow.
    attached: bool,
    refuse_next_attach: bool,
    overlap: u64,
    others: u64,
}

impl Hub {
    fn new() -> Self {
        Hub {
            first_retained: 1,
            ..Hub::default()
        }
    }

    fn epoch(&self) -> Epoch {
        epoch(self.epoch)
    }

    fn number(&mut self, payload: Payload) -> u64 {
        self.head += 1;
        self.log.insert((self.epoch, self.head), payload.clone());
        if self.attached {
            self.to_client.push_back(Frame::Message(Message {
                channel: "c".into(),
                epoch: self.epoch(),
                offset: Offset(self.head),
                payload,
            }));
        }
        self.head
    }

    fn cut(&mut self) {
        self.to_hub.clear();
        self.to_client.clear();
        self.attached = false;
    }

    fn step(&mut self) {
        let Some(frame) = self.to_hub.pop_front() else {
            return;
        };
        match frame {
            Frame::Attach(attach) => {
                if std::mem::take(&mut self.refuse_next_attach) {
                    self.to_client.push_back(Frame::Error(ErrorFrame {
                        code: ErrorCode::Unknown,
                        category: ErrorCategory::Service,
                        permanent: false,
                        message: "not now".into(),
                        channel: Some("c".into()),
                        seq: None,
                        retry_after_ms: None,
                    }));
                    return;
                }
                assert!(attach.subscribe && attach.producer.is_some());
                self.attached = true;
                let current = self.epoch();
                let trimmed_to = position(&current, self.first_retained - 1);
                let (start, gap) = match attach.resume {
                    None => (self.head + 1, None),
                    Some(mine) if mine.epoch != current => (
                        self.first_retained,
                        Some(Gap {
                            from: position(&mine.epoch, mine.offset.0 + 1),
                            to: trimmed_to,
                        }),
                    ),
                    Some(mine) if mine.offset.0 + 1 < self.first_retained => (
                        self.first_retained,
                        Some(Gap {
                            from: position(&current, mine.offset.0 + 1),
                            to: trimmed_to,
                        }),
                    ),
                    Some(mine) => {
                        let overlap = std::mem::take(&mut self.overlap);
                        let start = (mine.offset.0 + 1)
                            .saturating_sub(overlap)
                            .max(self.first_retained);
                        (start, None)
                    }
                };
                let replay = (self.head + 1).saturating_sub(start);
                self.to_client.push_back(Frame::Attached(Attached {
                    channel: "c".into(),
                    epoch: current.clone(),
                    head: Offset(self.head),
                    resumed: gap.is_none(),
                    replay,
                    gap,
                }));
                for offset in start..=self.head {
                    self.to_client.push_back(Frame::Message(Message {
                        channel: "c".into(),
                        epoch: current.clone(),
                        offset: Offset(offset),
                        payload: self.log[&(self.epoch, offset)].clone(),
                    }));
                }
            }
            Frame::Publish(publish) => {
                self.received.insert(publish.seq);
                let (offset, duplicate) = match self.dedupe.get(&publish.seq) {
                    Some(&offset) => (offset, true),
                    None => {
                        let offset = self.number(publish.payload);
                        self.dedupe.insert(publish.seq, offset);
                        self.stored
                            .entry(publish.seq)
                            .or_default()
                            .push((self.epoch, offset));
                        (offset, false)
                    }
                };
                self.to_client.push_back(Frame::Ack(Ack {
                    channel: "c".into(),
                    seq: publish.seq,
                    offset: Some(Offset(offset)),
                    epoch: Some(self.epoch()),
                    duplicate,
                }));
            }
            Frame::Detach(_) => {
                self.attached = false;
                self.to_client.push_back(Frame::Detached(Detached {
                    channel: "c".into(),
                }));
            }
            other => panic!("the client sent {other:?}"),
        }
    }
}

/// The client side: the core under test, its subscriber, and everything it was seen doing.
struct World {
    core: ChannelCore<u64>,
    hub: Hub,
    now: Instant,
    connected: bool,
    transport_failed: bool,
    stopped: bool,
    state: ChannelState,
    /// The subscriber's stream.
    capacity: usize,
    queued: usize,
    waiting_for_room: bool,
    /// What the subscriber has accounted for: the last position delivered or reported missing.
    cursor: Option<Position>,
    /// Everything the subscriber received, in order.
    events: Vec<ChannelEvent>,
    /// Publishes: responder → payload, accepted ones' seq, answers.
    next_responder: u64,
    payloads: HashMap<u64, Payload>,
    seq_of: HashMap<u64, u64>,
    responder_of: HashMap<u64, u64>,
    next_seq: u64,
    answered: HashMap<u64, Result<PublishAck, ChannelError>>,
    /// Seqs sent on the current connection, in order.
    sent_here: Vec<u64>,
    synced_here: bool,
}

impl World {
    fn new(limits: BufferLimits, capacity: usize) -> Self {
        let options = ChannelOptions {
            limits,
            event_capacity: capacity,
            retry: ReconnectPolicy {
                initial_delay: Duration::from_secs(1),
                max_delay: Duration::from_secs(30),
                max_attempts: None,
                ..ReconnectPolicy::default()
            },
            ..ChannelOptions::default()
        };
        World {
            core: ChannelCore::new("c", "producer", &options),
            hub: Hub::new(),
            now: Instant::now(),
            connected: false,
            transport_failed: false,
            stopped: false,
            state: ChannelState::Detached,
            capacity,
            queued: 0,
            waiting_for_room: false,
            cursor: None,
            events: Vec::new(),
            next_responder: 1,
            payloads: HashMap::new(),
            seq_of: HashMap::new(),
            responder_of: HashMap::new(),
            next_seq: 1,
            answered: HashMap::new(),
            sent_here: Vec::new(),
            synced_here: false,
        }
    }

    fn outstanding(&self, seq: u64) -> bool {
        !self.answered.contains_key(&self.responder_of[&seq])
    }

    /// Feeds one event and checks every action it led to.
    fn feed(&mut self, event: Event<u64>) {
        if self.stopped {
            return;
        }
        if let Event::Attached(attached) = &event {
            // The first attach the core accepts sets where the subscription starts.
            if self.cursor.is_none()
                && self.core.position().is_none()
                && self.state == ChannelState::Attaching
            {
                self.cursor = Some(position(&attached.epoch, attached.head.0 - attached.replay));
            }
        }
        self.core
            .set_subscriber_room(SubscriberRoom::Free(self.capacity - self.queued));
        self.core.handle(self.now, event);
        while let Some(action) = self.core.poll_action() {
            self.perform(action);
        }
    }

    fn perform(&mut self, action: Action<u64>) {
        match action {
            Action::SendPublishes(run) => {
                assert!(!run.payloads.is_empty(), "an empty run");
                assert_eq!(run.channel, "c");
                // A run stands for its publishes, in seq order: each is checked as one.
                for frame in v2::Record::Publish(run).into_frames() {
                    self.perform(Action::Send(frame));
                }
            }
            Action::Send(frame) => {
                assert!(self.connected, "sent {frame:?} with no connection");
                if let Frame::Publish(publish) = &frame {
                    let seq = publish.seq;
                    assert_eq!(
                        self.state,
                        ChannelState::Attached,
                        "publish before attached"
                    );
                    let responder = *self.responder_of.get(&seq).expect("unknown seq sent");
                    assert!(
                        self.outstanding(seq),
                        "seq {seq} sent after it was answered"
                    );
                    assert_eq!(
                        publish.payload, self.payloads[&responder],
                        "seq {seq} changed"
                    );
                    assert!(
                        self.sent_here.last().is_none_or(|&last| last < seq),
                        "seq {seq} after {:?} on one connection",
                        self.sent_here
                    );
                    for earlier in 1..seq {
                        if self.responder_of.contains_key(&earlier) && self.outstanding(earlier) {
                            assert!(
                                self.sent_here.contains(&earlier),
                                "seq {seq} sent before unacked {earlier} on this connection"
                            );
                        }
                    }
                    self.sent_here.push(seq);
                }
                self.hub.to_hub.push_back(frame);
            }
            Action::Deliver(event) => {
                self.queued += 1;
                assert!(self.queued <= self.capacity, "delivered beyond the room");
                let cursor = self.cursor.clone().expect("delivery before any attach");
                self.events.push(event.clone());
                match event {
                    ChannelEvent::Discontinuity(d) => {
                        assert_eq!(d.from.epoch, cursor.epoch, "gap {d:?} after {cursor}");
                        assert!(
                            d.from.offset.0 <= cursor.offset.0 + 1,
                            "gap {d:?} leaves a silent hole after {cursor}"
                        );
                        assert!(
                            d.to.epoch != cursor.epoch || d.to.offset >= cursor.offset,
                            "gap {d:?} goes back before {cursor}"
                        );
                        self.cursor = Some(d.to);
                    }
                    ChannelEvent::Message(m) => {
                        assert_eq!(m.epoch, cursor.epoch, "message {} after {cursor}", m.offset);
                        assert_eq!(
                            m.offset.0,
                            cursor.offset.0 + 1,
                            "message {} after {cursor}: out of order, duplicated or skipped",
                            m.offset
                        );
                        let number = m.epoch.0[1..].parse::<u32>().unwrap();
                        assert_eq!(m.payload, self.hub.log[&(number, m.offset.0)]);
                        self.cursor = Some(position(&m.epoch, m.offset.0));
                    }
                }
            }
            Action::Answer { responder, result } => {
                let seq = self.seq_of.get(&responder).copied();
                match (&result, seq) {
                    (Ok(ack), Some(seq)) => {
                        assert_eq!(ack.seq, seq);
                        let number = ack.epoch.as_ref().unwrap().0[1..].parse::<u32>().unwrap();
                        assert!(
                            self.hub.stored[&seq].contains(&(number, ack.offset.unwrap().0)),
                            "acked at a place the hub never stored it"
                        );
                    }
                    (Ok(_), None) => panic!("an ack for a publish that was refused"),
                    (Err(ChannelError::Unconfirmed { seq: s, .. }), Some(seq)) => {
                        assert_eq!(*s, seq)
                    }
                    (Err(e), Some(seq)) => assert!(
                        !self.hub.received.contains(&seq),
                        "seq {seq} answered {e} but the hub has it"
                    ),
                    (Err(_), None) => {}
                }
                if let Some(first) = self.answered.insert(responder, result) {
                    panic!("publisher {responder} answered twice (first {first:?})");
                }
            }
            Action::StateChanged(change) => {
                assert_eq!(change.from, self.state);
                self.state = change.to;
            }
            Action::Synced => {
                assert!(self.connected && !self.synced_here, "synced twice");
                self.synced_here = true;
            }
            Action::WaitForRoom => {
                assert!(!self.waiting_for_room, "asked twice for room");
                self.waiting_for_room = true;
            }
            Action::Unregister => {}
            Action::Stop => self.stopped = true,
            Action::Accepted { seq } => {
                let responder = *self.responder_of.get(&seq).expect("unknown seq accepted");
                assert!(
                    self.outstanding(seq),
                    "seq {seq} accepted after it was answered"
                );
                assert_eq!(
                    self.core.responder_mut(seq).copied(),
                    Some(responder),
                    "accepted seq {seq} is not queued"
                );
            }
            Action::Persist { .. } | Action::Forget { .. } => {
                panic!("a channel without a durable outbox wrote to one")
            }
        }
    }

    fn disconnect(&mut self) {
        self.hub.cut();
        if std::mem::take(&mut self.connected) {
            self.feed(Event::ConnectionDown(lost()));
        }
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::Publish => {
                let responder = self.next_responder;
                self.next_responder += 1;
                let payload = Payload::from_json(&format!("\"mine-{responder}\"")).unwrap();
                self.payloads.insert(responder, payload.clone());
                // Accepted, it takes the next seq (and may go out at once); refused, it is
                // answered at once and takes none.
                self.seq_of.insert(responder, self.next_seq);
                self.responder_of.insert(self.next_seq, responder);
                self.feed(Event::Publish { payload, responder });
                if self.answered.contains_key(&responder) {
                    self.seq_of.remove(&responder);
                    self.responder_of.remove(&self.next_seq);
                } else {
                    self.next_seq += 1;
                }
            }
            Op::HubStep => self.hub.step(),
            Op::ClientStep => {
                if let Some(frame) = self.hub.to_client.pop_front() {
                    let event = match frame {
                        Frame::Attached(a) => Event::Attached(a),
                        Frame::Message(m) => Event::Message(m),
                        Frame::Ack(a) => Event::Ack(a.into()),
                        Frame::Error(e) => Event::Error(e),
                        Frame::Detached(_) => Event::Detached,
                        other => panic!("the hub sent {other:?}"),
                    };
                    self.feed(event);
                }
            }
            Op::ClientRun(n) => {
                let mut run: Option<(Epoch, Offset, Vec<Payload>)> = None;
                while let Some(Frame::Message(m)) = self.hub.to_client.front() {
                    let follows = match &run {
                        None => true,
                        Some((epoch, first, payloads)) => {
                            payloads.len() < n
                                && m.epoch == *epoch
                                && m.offset.0 == first.0 + payloads.len() as u64
                        }
                    };
                    if !follows {
                        break;
                    }
                    let Some(Frame::Message(m)) = self.hub.to_client.pop_front() else {
                        unreachable!("the front was a message");
                    };
                    run.get_or_insert_with(|| (m.epoch.clone(), m.offset, Vec::new()))
                        .2
                        .push(m.payload);
                }
                match run {
                    Some((epoch, first_offset, payloads)) => self.feed(Event::Messages {
                        epoch,
                        first_offset,
                        payloads,
                    }),
                    None => self.apply(Op::ClientStep),
                }
            }
            Op::DuplicateAck => {
                if let Some(frame @ Frame::Ack(_)) = self.hub.to_client.front() {
                    let frame = frame.clone();
                    self.hub.to_client.push_front(frame);
                }
            }
            Op::SwapAcks => {
                let queue = &mut self.hub.to_client;
                if queue.len() >= 2
                    && matches!(queue[0], Frame::Ack(_))
                    && matches!(queue[1], Frame::Ack(_))
                {
                    queue.swap(0, 1);
                }
            }
            Op::Cut => self.disconnect(),
            Op::Reconnect => {
                if !self.connected {
                    if std::mem::take(&mut self.transport_failed) {
                        self.feed(Event::TransportRetrying);
                    }
                    self.connected = true;
                    self.sent_here.clear();
                    self.synced_here = false;
                    self.feed(Event::ConnectionUp);
                }
            }
            Op::OtherPublisher => {
                self.hub.others += 1;
                let payload = Payload::from_json(&format!("\"other-{}\"", self.hub.others));
                self.hub.number(payload.unwrap());
            }
            Op::Trim(n) => {
                self.hub.first_retained = (self.hub.first_retained + n).min(self.hub.head + 1)
            }
            Op::HubRestart => {
                self.disconnect();
                self.hub.epoch += 1;
                self.hub.head = 0;
                self.hub.first_retained = 1;
                self.hub.dedupe.clear();
            }
            Op::RefuseNextAttach => self.hub.refuse_next_attach = true,
            Op::OverlapNextReplay(n) => self.hub.overlap = n,
            Op::Read(n) => {
                self.queued -= n.min(self.queued);
                if self.waiting_for_room && self.capacity - self.queued >= 3 {
                    self.waiting_for_room = false;
                    self.feed(Event::RoomAvailable);
                }
            }
            Op::Advance(seconds) => {
                self.now += Duration::from_secs(seconds);
                // Early or due: the core must tell the difference.
                self.feed(Event::Timeout);
            }
            Op::Outage(n) => {
                self.disconnect();
                for _ in 0..n {
                    self.apply(Op::OtherPublisher);
                }
                self.hub.first_retained = self.hub.head;
                self.apply(Op::Reconnect);
                self.apply(Op::HubStep);
                self.apply(Op::ClientStep);
            }
            Op::TransportFails => {
                self.disconnect();
                self.transport_failed = true;
                self.feed(Event::TransportFailed(lost()));
            }
            Op::Detach => self.feed(Event::Detach),
            Op::Flush => self.feed(Event::Flush),
        }
    }

    /// A stable connection from now on, every frame handled, the subscriber reading
    /// everything, time passing as the core asks — until nothing is left to do.
    fn heal(&mut self) {
        self.hub.refuse_next_attach = false;
        self.apply(Op::Flush);
        self.apply(Op::Reconnect);
        for _ in 0..100_000 {
            if self.stopped {
                return;
            }
            if !self.hub.to_hub.is_empty() {
                self.apply(Op::HubStep);
            } else if !self.hub.to_client.is_empty() {
                self.apply(Op::ClientStep);
            } else if self.queued > 0 || self.waiting_for_room {
                self.apply(Op::Read(self.capacity));
            } else if let Some(deadline) = self.core.deadline() {
                self.now = self.now.max(deadline.at);
                self.feed(Event::Timeout);
            } else {
                return;
            }
        }
        panic!("the channel never settled");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn any_interleaving_keeps_the_delivery_invariants(
        ops in proptest::collection::vec(op(), 1..300),
        max_messages in 1usize..24,
        max_in_flight in 1usize..8,
        evict in any::<bool>(),
        capacity in 3usize..9,
        defer in any::<bool>(),
    ) {
        let limits = BufferLimits {
            max_messages,
            max_bytes: usize::MAX,
            max_in_flight,
            overflow: if evict { OverflowPolicy::EvictOldestUnsent } else { OverflowPolicy::RejectNew },
        };
        let mut world = World::new(limits, capacity);
        world.core.defer_publishes(defer);
        for op in ops {
            world.apply(op);
            if world.stopped {
                break;
            }
        }
        world.heal();

        // Every publisher was answered, exactly once (twice panicked on the spot).
        for responder in 1..world.next_responder {
            prop_assert!(world.answered.contains_key(&responder), "publisher {responder} never answered");
        }
        prop_assert_eq!(world.core.queued(), 0);
        if !world.stopped {
            // Attached, and everything the hub numbered since the first attach accounted
            // for: delivered in order, or reported missing.
            prop_assert_eq!(world.state, ChannelState::Attached);
            let head = position(&world.hub.epoch(), world.hub.head);
            prop_assert_eq!(world.cursor.as_ref(), Some(&head));
        }
    }
}

/// A deterministic run through the same model, so a broken rule shows up even without luck.
#[test]
fn a_scripted_run_through_losses_trims_and_a_restart() {
    use Op::*;
    let mut world = World::new(
        BufferLimits {
            max_messages: 8,
            max_bytes: usize::MAX,
            max_in_flight: 2,
            overflow: OverflowPolicy::RejectNew,
        },
        4,
    );
    let script = [
        Reconnect,
        HubStep,
        ClientStep,
        Publish,
        Publish,
        Publish,
        HubStep,
        HubStep,
        Cut,
        OtherPublisher,
        OtherPublisher,
        Trim(1),
        Reconnect,
        HubStep,
        ClientStep,
        ClientStep,
        ClientStep,
        ClientStep,
        OverlapNextReplay(3),
        Cut,
        Reconnect,
        HubStep,
        ClientStep,
        ClientStep,
        HubStep,
        HubStep,
        ClientStep,
        DuplicateAck,
        ClientStep,
        ClientStep,
        ClientStep,
        ClientStep,
        HubRestart,
        Publish,
        Reconnect,
        HubStep,
        ClientStep,
        HubStep,
        ClientStep,
        ClientStep,
        Read(2),
        OtherPublisher,
        ClientStep,
    ];
    for op in script {
        world.apply(op);
    }
    world.heal();
    // Offset 1 was trimmed before the resume; the slow subscriber (room for 4) fell behind at
    // 3 and caught up — but the restart took 3 and 4 of the old epoch with it.
    let seen: Vec<String> = world
        .events
        .iter()
        .map(|event| match event {
            ChannelEvent::Message(m) => format!("{}@{}", m.offset, m.epoch.0),
            ChannelEvent::Discontinuity(d) => format!("gap {}..{}", d.from, d.to),
        })
        .collect();
    assert_eq!(
        seen,
        [
            "gap 1@e0..1@e0",
            "2@e0",
            "gap 3@e0..0@e1",
            "1@e1",
            "2@e1",
            "3@e1"
        ]
    );
    assert_eq!(world.answered.len() as u64, world.next_responder - 1);
    assert!(world
        .answered
        .values()
        .all(|answer| matches!(answer, Ok(PublishAck { .. }))));
    assert_eq!(
        world.cursor,
        Some(position(&world.hub.epoch(), world.hub.head))
    );
}
