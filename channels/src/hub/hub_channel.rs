//! The HubChannel actor: one per channel on each hub node. It drives the channel's appends into
//! the shared [`HistoryStore`] and fans out, in offset order, everything the store numbered —
//! its own appends and those of other nodes.
//!
//! * **Appends** are batched and pipelined per channel: up to two batches are in the store at
//!   once, later publishes queue and go as the next batch (one store round trip for many
//!   messages; publishes of one connection are never reordered). Each batch carries a
//!   [`Fence`]: the store applies it only if the batch before it applied, and the actor handles
//!   results in the order it sent the batches. Acks go out only once the store confirmed. A
//!   batch the store refused fails every publish queued or in flight behind it too, and closes
//!   their connections with a retryable `unavailable` error: nothing later of a producer can be
//!   stored ahead of something earlier that the store refused.
//! * **Fan-out** follows one cursor, `delivered`: every live subscriber has been sent every
//!   message up to it, in order. Own appends that continue it are fanned out straight from the
//!   batch; anything else (another node's appends, told by [`StoreNotice`]s) is read from the
//!   store page by page.
//! * **Attach with resume** reads history page by page and sends it to that subscriber alone
//!   until it reaches `delivered`, then the subscriber turns live. Its `attached` frame states
//!   the head and replay count at the moment of the attach; whatever the channel fans out while
//!   the subscriber catches up follows the replay in order. Each page is paid for from the
//!   connection's outbound budget *before* it is read ([`SessionOutbox::reserve_replay`]): a
//!   connection whose socket does not drain stops its replays instead of piling pages up, and
//!   a re-attach of the same channel starts over instead of stacking a second replay.
//! * **Expiry and fairness** (see [`idle`](super::idle)): a channel of a service that no
//!   connection has attached, with nothing in progress, retires from the registry after its
//!   idle TTL and stops; and a channel yields its thread after each turn of work, so that the
//!   other channels on that thread are served in between.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use bytes::BytesMut;
use tether_transport::hub::admin::{
    ChannelDetail, ChannelSubscriber, ChannelSummary, SessionChannel,
};
use tether_transport::hub::{Completes, Outbound, ReplayReservation, SessionOutbox, Wire};
use tether_transport::protocol::{
    v2, Ack, Attached, Detached, Epoch, ErrorCode, ErrorFrame, Frame, Message as MessageFrame,
    Offset, Payload, Position,
};
use tether_transport::{ErrorCategory, TransportError};

use super::history::{
    AppendOutcome, AppendRequest, Appended, Fence, HistoryStore, NoticeSink, Page, PageLimit,
    StoreNotice, StoredMessage,
};
use super::idle::{BatchSizer, IdleClock, TurnBudget, DEFAULT_BATCH_WORK, DEFAULT_TURN_BUDGET};
use super::log::{plan_resume, ProducerKey};
use super::service::{ChannelLease, Retirement};
use crate::error::ChannelError;
use crate::telemetry;

/// Most publishes in one append batch (fewer while messages cost more: [`BatchSizer`]).
const MAX_BATCH_MESSAGES: usize = 512;
/// Fewest publishes an append batch is cut down to.
const MIN_BATCH_MESSAGES: usize = 8;
/// Most payload bytes in one append batch (a batch always takes at least one publish).
const MAX_BATCH_BYTES: usize = 1024 * 1024;
/// Most append batches in the store at once per channel.
const MAX_APPENDS_IN_FLIGHT: usize = 2;
/// Wait before reading the store again after a failed read.
const READ_RETRY: Duration = Duration::from_millis(250);
/// Most an idle channel waits to look again when work outlived its connections (an append to
/// a slow store) at the end of its idle TTL.
const IDLE_RECHECK: Duration = Duration::from_secs(1);

/// A connection attaches (or re-attaches) to the channel.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Subscribe {
    /// The connection.
    pub conn_id: u64,
    /// Where its frames go.
    pub outbox: SessionOutbox,
    /// The last position it delivered.
    pub resume: Option<Position>,
    /// Whether it receives messages (false: publish only).
    pub subscribe: bool,
}

/// A connection leaves the channel; `reply` gets the `detached` frame.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Unsubscribe {
    /// The connection.
    pub conn_id: u64,
    /// Where to confirm, when the client asked (not when its connection died).
    pub reply: Option<SessionOutbox>,
}

/// A publish from a connection.
#[derive(Message)]
#[rtype(result = "()")]
pub struct PublishCommand {
    /// Who publishes (shared by all of its publishes).
    pub producer: Arc<ProducerKey>,
    /// The publish's sequence number.
    pub seq: u64,
    /// The message.
    pub payload: Payload,
    /// Where the ack goes.
    pub reply: SessionOutbox,
}

/// Publishes of one producer with consecutive sequence numbers (a v2 publish run), in one
/// mailbox message.
#[derive(Message)]
#[rtype(result = "()")]
pub struct PublishRunCommand {
    /// Who publishes (shared by all of its publishes).
    pub producer: Arc<ProducerKey>,
    /// The first publish's sequence number; the others follow it by one.
    pub first_seq: u64,
    /// The messages, in seq order.
    pub payloads: Vec<Payload>,
    /// Where the acks go.
    pub reply: SessionOutbox,
}

/// A connection's outbound budget has room for the replay page a subscriber waits to read.
#[derive(Message)]
#[rtype(result = "()")]
struct ReplayRoom {
    conn_id: u64,
    generation: u64,
}

/// The first replay read of an attach, waiting for room in the connection's budget.
struct AttachRead {
    msg: Subscribe,
    from: Position,
    after: Offset,
}

/// The store has news about the channel (coalesced in [`Notices`]).
#[derive(Message)]
#[rtype(result = "()")]
struct Wake;

/// For the admin API: the channel in a few figures (answered at once, no store read).
#[derive(Message)]
#[rtype(result = "ChannelSummary")]
pub struct Summarize;

/// For the admin API: the channel in full, with the store's retained range.
#[derive(Message)]
#[rtype(result = "ChannelDetail")]
pub struct Describe;

/// For the admin API: how the channel sees connection `conn_id` (`None`: not attached).
#[derive(Message)]
#[rtype(result = "Option<SessionChannel>")]
pub struct DescribeMember {
    /// The connection.
    pub conn_id: u64,
}

/// Store notices, coalesced: however many arrive while the actor is busy, one [`Wake`] waits
/// in its mailbox, and only the latest head is kept.
#[derive(Default)]
struct Notices {
    queued: AtomicBool,
    latest: Mutex<Option<(Epoch, Offset)>>,
    resync: AtomicBool,
}

/// One attached subscriber.
struct Subscriber {
    outbox: SessionOutbox,
    /// Receives live fan-out (caught up to `delivered`).
    live: bool,
    /// While catching up: the last offset sent to it.
    next: Offset,
    /// Distinguishes a re-attach of the same connection from the attach a read answers.
    generation: u64,
    /// The attach's first read, when it waits for room in the connection's budget.
    attach_read: Option<AttachRead>,
}

/// One append batch sent to the store.
struct InFlight {
    number: u64,
    commands: Vec<PublishCommand>,
    result: Option<Result<Appended, ChannelError>>,
    started: std::time::Instant,
    /// Time the store call took on the channel's thread.
    call: Duration,
}

/// One channel on a hub node.
pub struct HubChannel {
    name: String,
    store: Arc<dyn HistoryStore>,
    page: PageLimit,
    /// The epoch fanned out; `None` until the store's position was read.
    epoch: Option<Epoch>,
    /// Every live subscriber was sent every message up to here.
    delivered: Offset,
    /// The highest head the store reported.
    known_head: Offset,
    reading_position: bool,
    /// A position read was asked for while one was running.
    read_again: bool,
    pumping: bool,
    /// Append batches in the store, in the order they were sent.
    in_flight: VecDeque<InFlight>,
    fence_token: String,
    fence_number: u64,
    /// After a failed append: nothing new goes to the store until every batch in flight has
    /// answered (then under a new fence token).
    draining: bool,
    subscribers: HashMap<u64, Subscriber>,
    generation: u64,
    /// Attaches that wait for the channel's position (or for the fan-out to reach them).
    waiting: Vec<Subscribe>,
    pending: VecDeque<PublishCommand>,
    /// Most publishes queued for the store (the channel's mailbox capacity: the actor moves
    /// commands out of its mailbox at once, so this is what bounds them while the store is
    /// slow or down).
    max_pending: usize,
    /// Connections whose publishes the store refused: their later publishes are refused too
    /// (they are being closed and will replay in order on their next connection).
    refused: HashSet<u64>,
    notices: Arc<Notices>,
    watching: bool,
    /// Connections that have the channel attached (subscribing or publish-only): while there
    /// is one, the channel does not expire.
    members: HashSet<u64>,
    /// Its registry entry, when the channel belongs to a service (then it expires once idle).
    lease: Option<ChannelLease>,
    idle: IdleClock,
    idle_timer: Option<SpawnHandle>,
    turn: TurnBudget,
    batches: BatchSizer,
    span: tracing::Span,
}

impl HubChannel {
    /// A channel named `name` over `store`, reading history in pages of `page`, queueing at
    /// most `max_pending` publishes for the store.
    pub fn new(
        name: impl Into<String>,
        store: Arc<dyn HistoryStore>,
        page: PageLimit,
        max_pending: usize,
    ) -> Self {
        let name = name.into();
        let span =
            tracing::info_span!("hub_channel", channel = %name, epoch = tracing::field::Empty);
        HubChannel {
            name,
            store,
            page,
            epoch: None,
            delivered: Offset(0),
            known_head: Offset(0),
            reading_position: false,
            read_again: false,
            pumping: false,
            in_flight: VecDeque::new(),
            fence_token: Epoch::random().to_string(),
            fence_number: 0,
            draining: false,
            subscribers: HashMap::new(),
            generation: 0,
            waiting: Vec::new(),
            pending: VecDeque::new(),
            max_pending: max_pending.max(1),
            refused: HashSet::new(),
            notices: Arc::new(Notices::default()),
            watching: false,
            members: HashSet::new(),
            lease: None,
            idle: IdleClock::new(Duration::MAX),
            idle_timer: None,
            turn: TurnBudget::new(DEFAULT_TURN_BUDGET),
            batches: BatchSizer::new(DEFAULT_BATCH_WORK, MIN_BATCH_MESSAGES, MAX_BATCH_MESSAGES),
            span,
        }
    }

    /// Ties the channel to its service's registry: it expires after the lease's idle TTL.
    pub(crate) fn with_lease(mut self, lease: ChannelLease) -> Self {
        self.idle = IdleClock::new(lease.idle_ttl());
        self.lease = Some(lease);
        self
    }

    /// Work of the channel that has not finished (whether or not a connection waits for it).
    fn in_progress(&self) -> bool {
        !self.pending.is_empty()
            || !self.in_flight.is_empty()
            || !self.waiting.is_empty()
            || !self.subscribers.is_empty()
            || self.reading_position
            || self.pumping
    }

    /// A connection attaches: the channel is in use.
    fn member_arrived(&mut self, ctx: &mut Context<Self>, conn_id: u64) {
        if let Some(lease) = &self.lease {
            lease.attach_arrived();
        }
        self.members.insert(conn_id);
        self.idle.in_use();
        if let Some(timer) = self.idle_timer.take() {
            ctx.cancel_future(timer);
        }
    }

    /// A connection detached or closed; the last one starts the idle TTL.
    fn member_left(&mut self, ctx: &mut Context<Self>, conn_id: u64) {
        self.members.remove(&conn_id);
        if self.members.is_empty() {
            self.arm_idle_timer(ctx, None);
        }
    }

    /// Looks at the idle channel again when its TTL runs out (or after `recheck`).
    fn arm_idle_timer(&mut self, ctx: &mut Context<Self>, recheck: Option<Duration>) {
        if self.lease.is_none() {
            return;
        }
        let now = tokio::time::Instant::now();
        self.idle.unused(now);
        if let Some(timer) = self.idle_timer.take() {
            ctx.cancel_future(timer);
        }
        let wait = recheck.unwrap_or_else(|| self.idle.remaining(now).unwrap_or(self.idle.ttl()));
        self.idle_timer = Some(ctx.run_later(wait, |act, ctx| act.on_idle_timer(ctx)));
    }

    /// The idle TTL ran out: retire, unless a connection or some work came meanwhile.
    fn on_idle_timer(&mut self, ctx: &mut Context<Self>) {
        self.idle_timer = None;
        if !self.members.is_empty() {
            return;
        }
        if !self.idle.expired(tokio::time::Instant::now()) {
            self.arm_idle_timer(ctx, None);
            return;
        }
        if self.in_progress() {
            // Work that outlived its connections (an append to a slow store) finishes first.
            self.arm_idle_timer(ctx, Some(IDLE_RECHECK.min(self.idle.ttl())));
            return;
        }
        let Some(lease) = &self.lease else {
            return;
        };
        match lease.retire() {
            Retirement::Retired | Retirement::NotRegistered => {
                tracing::debug!(parent: &self.span, "channel expired: unused for its idle TTL");
                ctx.stop();
            }
            // Its Subscribe is in the mailbox and makes the channel in use; should it not,
            // look again after another TTL.
            Retirement::AttachOnItsWay => self.arm_idle_timer(ctx, None),
        }
    }

    /// Yields the thread to the other channels on it once this one has worked for a turn.
    fn pace(&mut self, ctx: &mut Context<Self>) {
        if self.turn.spend(tokio::time::Instant::now()) && !ctx.waiting() {
            metrics::counter!(telemetry::HUB_CHANNEL_YIELDS).increment(1);
            ctx.wait(tokio::task::yield_now().into_actor(self));
        }
    }

    /// The furthest position this node has seen, for the store's lost-tail check.
    fn seen(&self) -> Option<Position> {
        self.epoch.clone().map(|epoch| Position {
            epoch,
            offset: self.delivered.max(self.known_head),
        })
    }

    /// `messages` (in offset order) for a connection speaking `version`: one v1 text frame
    /// each, or one v2 record per run of consecutive offsets.
    fn encode(&self, version: u16, epoch: &Epoch, messages: &[StoredMessage]) -> Vec<Wire> {
        if version < 2 {
            return messages
                .iter()
                .map(|m| {
                    Wire::Text(
                        Frame::Message(MessageFrame {
                            channel: self.name.clone(),
                            epoch: epoch.clone(),
                            offset: m.offset,
                            payload: m.payload.clone(),
                        })
                        .encode()
                        .into(),
                    )
                })
                .collect();
        }
        let mut out = Vec::with_capacity(1);
        let mut start = 0;
        for end in 1..=messages.len() {
            if end == messages.len() || messages[end].offset.0 != messages[end - 1].offset.0 + 1 {
                let run = &messages[start..end];
                // Kept as parts: each subscriber's writer copies the payloads straight into
                // its socket buffer (no encoded copy of the whole run first).
                out.push(Wire::Run(v2::SharedMessageRun::new(
                    &self.name,
                    epoch,
                    run[0].offset,
                    run.iter().map(|m| m.payload.clone()).collect(),
                )));
                start = end;
            }
        }
        out
    }

    fn unavailable(error: &ChannelError) -> TransportError {
        TransportError::Remote {
            code: ErrorCode::Unavailable,
            category: ErrorCategory::Service,
            permanent: false,
            message: format!("history store unavailable: {error}"),
        }
    }

    /// A channel-scoped error frame (the connection stays up).
    /// `publish`: the sequence number and payload size of the publish it answers.
    fn send_error(
        &self,
        outbox: &SessionOutbox,
        error: &TransportError,
        publish: Option<(u64, usize)>,
    ) {
        let seq = publish.map(|(seq, _)| seq);
        let frame = Frame::Error(ErrorFrame::from_error(error).about(&self.name, seq));
        let _ = outbox.send(Outbound {
            wire: outbox.encode(&frame),
            completes: publish.map(|(_, bytes)| Completes {
                publishes: 1,
                bytes,
            }),
        });
    }

    fn kick_slow(&mut self, conn_id: u64, outbox: &SessionOutbox) {
        metrics::counter!(telemetry::HUB_SLOW_CONSUMERS).increment(1);
        tracing::warn!(parent: &self.span, conn_id, "subscriber cannot keep up; closing its connection");
        self.subscribers.remove(&conn_id);
        outbox.kick(TransportError::Remote {
            code: ErrorCode::SlowConsumer,
            category: ErrorCategory::Service,
            permanent: false,
            message: "connection fell too far behind; resume to catch up".into(),
        });
    }

    /// Takes the store's position in: the first one, a newer head, or a new epoch (the store
    /// lost the channel: everything retained of the new epoch is fanned out, and subscribers
    /// see the epoch change as a discontinuity).
    fn adopt(&mut self, epoch: &Epoch, head: Offset, first: Offset) {
        match &self.epoch {
            None => {
                self.span.record("epoch", tracing::field::display(epoch));
                self.epoch = Some(epoch.clone());
                self.delivered = head;
                self.known_head = head;
            }
            Some(mine) if mine != epoch => {
                metrics::counter!(telemetry::HUB_EPOCH_CHANGES).increment(1);
                tracing::warn!(parent: &self.span, old = %mine, new = %epoch, "channel epoch changed: the store lost this channel's history");
                self.epoch = Some(epoch.clone());
                self.delivered = Offset(first.0.saturating_sub(1));
                self.known_head = head;
                for sub in self.subscribers.values_mut() {
                    sub.next = self.delivered;
                }
            }
            Some(_) => self.known_head = self.known_head.max(head),
        }
    }

    fn watch(&mut self, ctx: &mut Context<Self>) {
        if self.watching {
            return;
        }
        self.watching = true;
        let notices = self.notices.clone();
        let addr = ctx.address();
        let sink: NoticeSink = Arc::new(move |notice| {
            match notice {
                StoreNotice::Advanced { epoch, head } => {
                    let mut latest = notices.latest.lock().unwrap_or_else(|p| p.into_inner());
                    match latest.as_mut() {
                        Some((e, h)) if *e == epoch => *h = (*h).max(head),
                        _ => *latest = Some((epoch, head)),
                    }
                }
                StoreNotice::Resync => notices.resync.store(true, Ordering::Relaxed),
            }
            if !notices.queued.swap(true, Ordering::AcqRel) {
                addr.do_send(Wake);
            }
        });
        self.store.watch(&self.name, sink);
    }

    fn unwatch_if_unused(&mut self) {
        if self.watching && self.subscribers.is_empty() {
            self.watching = false;
            self.store.unwatch(&self.name);
        }
    }

    /// Reads the channel's position (first time, or after notices may have been missed).
    fn read_position(&mut self, ctx: &mut Context<Self>) {
        if self.reading_position {
            // What started it may predate what asks now: read once more when it answers.
            self.read_again = true;
            return;
        }
        self.reading_position = true;
        self.read_again = false;
        let read = self.store.read(
            &self.name,
            self.seen(),
            self.delivered,
            PageLimit::POSITION_ONLY,
        );
        ctx.spawn(read.into_actor(self).map(|result, act, ctx| {
            act.reading_position = false;
            if std::mem::take(&mut act.read_again) {
                act.read_position(ctx);
            }
            match result {
                Ok(page) => {
                    act.adopt(&page.epoch, page.head, page.first);
                    act.pump(ctx);
                    act.retry_waiting(ctx);
                }
                Err(e) => {
                    metrics::counter!(telemetry::HUB_STORE_ERRORS, "op" => "read").increment(1);
                    tracing::warn!(parent: &act.span, error = %e, "cannot read the channel's position");
                    let error = Self::unavailable(&e);
                    for waiting in std::mem::take(&mut act.waiting) {
                        act.send_error(&waiting.outbox, &error, None);
                    }
                    if !act.subscribers.is_empty() {
                        ctx.run_later(READ_RETRY, |act, ctx| act.read_position(ctx));
                    }
                }
            }
        }));
    }

    /// Fans out what the store holds beyond `delivered`, page by page.
    fn pump(&mut self, ctx: &mut Context<Self>) {
        if self.pumping || self.epoch.is_none() {
            return;
        }
        if self.known_head <= self.delivered {
            // Caught up: attaches that waited for the fan-out go on.
            self.retry_waiting(ctx);
            return;
        }
        if !self.subscribers.values().any(|s| s.live) {
            // Nobody to fan out to: move the cursor without reading (subscribers catching up
            // read their own pages up to it).
            self.delivered = self.known_head;
            self.retry_waiting(ctx);
            return;
        }
        self.pumping = true;
        let read = self
            .store
            .read(&self.name, self.seen(), self.delivered, self.page);
        ctx.spawn(read.into_actor(self).map(|result, act, ctx| {
            act.pumping = false;
            match result {
                Ok(page) => act.on_pump_page(ctx, page),
                Err(e) => {
                    metrics::counter!(telemetry::HUB_STORE_ERRORS, "op" => "read").increment(1);
                    tracing::warn!(parent: &act.span, error = %e, "fan-out read failed; retrying");
                    ctx.run_later(READ_RETRY, |act, ctx| act.pump(ctx));
                }
            }
        }));
    }

    fn on_pump_page(&mut self, ctx: &mut Context<Self>, page: Page) {
        let before = self.epoch.clone();
        self.adopt(&page.epoch, page.head, page.first);
        if before.as_ref() != Some(&page.epoch) {
            // The epoch changed under the read: read the new one from its start.
            self.pump(ctx);
            return;
        }
        let stale = !page.messages.is_empty();
        let fresh: Vec<StoredMessage> = page
            .messages
            .into_iter()
            .filter(|m| m.offset > self.delivered)
            .collect();
        if fresh.is_empty() && stale {
            // The fan-out moved past this page while it was read (this node's own appends
            // went out meanwhile): read again from where it is now.
        } else if fresh.is_empty() {
            // Everything up to the head was trimmed before we read it: subscribers see the
            // jump in offsets and report it.
            self.delivered = self.delivered.max(page.head.min(self.known_head));
        } else {
            self.fan_out(&fresh);
        }
        self.pump(ctx);
        self.retry_waiting(ctx);
        self.pace(ctx);
    }

    /// Sends messages (contiguous after `delivered`, or after a trimmed range) to every live
    /// subscriber, each encoded once.
    fn fan_out(&mut self, messages: &[StoredMessage]) {
        let Some(epoch) = self.epoch.clone() else {
            return;
        };
        let Some(last) = messages.last().map(|m| m.offset) else {
            return;
        };
        self.delivered = last;
        // Encoded once per protocol version, for the subscribers that speak it.
        let mut encoded: [Option<Vec<Wire>>; 2] = [None, None];
        let mut closed = Vec::new();
        let mut slow = Vec::new();
        let mut delivered = 0u64;
        for (conn_id, sub) in &self.subscribers {
            if !sub.live {
                continue;
            }
            if !sub.outbox.is_open() {
                closed.push(*conn_id);
                continue;
            }
            let version = sub.outbox.version();
            let frames = encoded[usize::from(version >= 2)]
                .get_or_insert_with(|| self.encode(version, &epoch, messages));
            let sent = if frames.len() == 1 {
                sub.outbox.send(Outbound {
                    wire: frames[0].clone(),
                    completes: None,
                })
            } else {
                sub.outbox.send_batch(frames.clone())
            };
            match sent {
                Ok(()) => delivered += messages.len() as u64,
                Err(_) => slow.push((*conn_id, sub.outbox.clone())),
            }
        }
        metrics::counter!(telemetry::HUB_DELIVERIES).increment(delivered);
        for conn_id in closed {
            self.subscribers.remove(&conn_id);
        }
        for (conn_id, outbox) in slow {
            self.kick_slow(conn_id, &outbox);
        }
    }

    /// Attaches that waited for the position or for the fan-out to reach them go again.
    fn retry_waiting(&mut self, ctx: &mut Context<Self>) {
        if self.epoch.is_none() || self.waiting.is_empty() {
            return;
        }
        for msg in std::mem::take(&mut self.waiting) {
            self.attach(ctx, msg);
        }
    }

    fn attach(&mut self, ctx: &mut Context<Self>, msg: Subscribe) {
        if msg.subscribe && !self.watching {
            // Nobody watched the channel: other nodes may have moved it on. Watch it, then
            // read where it stands before answering.
            self.watch(ctx);
            self.waiting.push(msg);
            self.read_position(ctx);
            return;
        }
        let Some(epoch) = self.epoch.clone() else {
            self.waiting.push(msg);
            self.read_position(ctx);
            return;
        };
        let from = match (&msg.resume, msg.subscribe) {
            (Some(from), true) => from.clone(),
            _ => {
                // Live from the head (or publish only): nothing to read.
                self.confirm(&msg.outbox, &epoch, false, None, 0);
                if msg.subscribe {
                    self.add_subscriber(ctx, msg.conn_id, msg.outbox, true);
                } else {
                    self.subscribers.remove(&msg.conn_id);
                }
                return;
            }
        };
        let generation = self.add_subscriber(ctx, msg.conn_id, msg.outbox.clone(), false);
        let after = if from.epoch == epoch {
            from.offset.min(self.delivered)
        } else {
            Offset(0)
        };
        self.read_attach_page(ctx, AttachRead { msg, from, after }, generation);
    }

    /// Reserves room for one replay page in the connection's budget; `None` (and a
    /// [`ReplayRoom`] later) when its socket has not drained enough yet.
    fn reserve_page(
        &self,
        ctx: &mut Context<Self>,
        outbox: &SessionOutbox,
        conn_id: u64,
        generation: u64,
    ) -> Option<ReplayReservation> {
        if !outbox.is_open() {
            // Gone: its Unsubscribe is on the way. (A closed budget wakes at once, which would
            // only bounce ReplayRoom messages until then.)
            return None;
        }
        let bytes = self.page.max_bytes.min(outbox.replay_share());
        let addr = ctx.address();
        outbox.reserve_replay(
            bytes,
            Box::new(move || {
                addr.do_send(ReplayRoom {
                    conn_id,
                    generation,
                })
            }),
        )
    }

    /// The limits of a page read into `reservation`.
    fn page_for(&self, reservation: &ReplayReservation) -> PageLimit {
        PageLimit {
            max_messages: self.page.max_messages,
            max_bytes: reservation.bytes(),
        }
    }

    fn read_attach_page(&mut self, ctx: &mut Context<Self>, read: AttachRead, generation: u64) {
        let conn_id = read.msg.conn_id;
        let Some(reservation) = self.reserve_page(ctx, &read.msg.outbox, conn_id, generation)
        else {
            metrics::counter!(telemetry::HUB_REPLAYS_PACED).increment(1);
            if let Some(sub) = self.subscribers.get_mut(&conn_id) {
                sub.attach_read = Some(read);
            }
            return;
        };
        let AttachRead { msg, from, after } = read;
        let page = self.page_for(&reservation);
        let read = self.store.read(&self.name, self.seen(), after, page);
        ctx.spawn(read.into_actor(self).map(move |result, act, ctx| {
            if act.subscribers.get(&msg.conn_id).map(|s| s.generation) != Some(generation) {
                return; // detached or re-attached meanwhile (the reservation goes back)
            }
            match result {
                Ok(page) => act.on_attach_page(ctx, msg, from, page, reservation),
                Err(e) => {
                    metrics::counter!(telemetry::HUB_STORE_ERRORS, "op" => "read").increment(1);
                    act.subscribers.remove(&msg.conn_id);
                    act.send_error(&msg.outbox, &Self::unavailable(&e), None);
                }
            }
        }));
    }

    fn add_subscriber(
        &mut self,
        ctx: &mut Context<Self>,
        conn_id: u64,
        outbox: SessionOutbox,
        live: bool,
    ) -> u64 {
        self.generation += 1;
        self.subscribers.insert(
            conn_id,
            Subscriber {
                outbox,
                live,
                next: self.delivered,
                generation: self.generation,
                attach_read: None,
            },
        );
        self.watch(ctx);
        self.generation
    }

    fn confirm(
        &self,
        outbox: &SessionOutbox,
        epoch: &Epoch,
        resumed: bool,
        gap: Option<tether_transport::protocol::Gap>,
        replay: u64,
    ) -> Wire {
        let frame = outbox.encode(&Frame::Attached(Attached {
            channel: self.name.clone(),
            epoch: epoch.clone(),
            head: self.delivered,
            resumed,
            replay,
            gap,
        }));
        if replay == 0 {
            let _ = outbox.send(Outbound {
                wire: frame.clone(),
                completes: None,
            });
        }
        frame
    }

    fn on_attach_page(
        &mut self,
        ctx: &mut Context<Self>,
        msg: Subscribe,
        from: Position,
        page: Page,
        reservation: ReplayReservation,
    ) {
        let before = self.epoch.clone();
        self.adopt(&page.epoch, page.head, page.first);
        let epoch = page.epoch.clone();
        let ahead = from.epoch == epoch && from.offset > self.delivered;
        if before.as_ref() != Some(&epoch) || (ahead && self.delivered < page.head) {
            // The channel moved under the read, or the subscriber has seen more than this node
            // has fanned out yet (another node's appends): attach once the fan-out is there.
            // (Past the store's head too, the tail is lost: answered once this node has fanned
            // out everything the store still has, so nothing is sent twice.)
            self.subscribers.remove(&msg.conn_id);
            self.waiting.push(msg);
            self.pump(ctx);
            return;
        }
        self.finish_attach(ctx, msg, from, page, reservation);
    }

    fn finish_attach(
        &mut self,
        ctx: &mut Context<Self>,
        msg: Subscribe,
        from: Position,
        page: Page,
        reservation: ReplayReservation,
    ) {
        let Some(epoch) = self.epoch.clone() else {
            return;
        };
        let head = self.delivered;
        let plan = plan_resume(&from, &epoch, head, page.first);
        let replay = head.0.saturating_sub(plan.start_after.0);
        tracing::debug!(parent: &self.span, conn_id = msg.conn_id, resumed = plan.resumed, replay, gap = ?plan.gap, "attach");
        let attached = self.confirm(&msg.outbox, &epoch, plan.resumed, plan.gap, replay);
        let generation = self.add_subscriber(ctx, msg.conn_id, msg.outbox.clone(), false);
        if let Some(sub) = self.subscribers.get_mut(&msg.conn_id) {
            sub.next = plan.start_after;
        }
        if replay == 0 {
            self.caught_up_or_continue(ctx, msg.conn_id, generation);
            return;
        }
        let messages: Vec<StoredMessage> = page
            .messages
            .into_iter()
            .filter(|m| m.offset > plan.start_after && m.offset <= head)
            .collect();
        let mut batch = Vec::with_capacity(messages.len() + 1);
        batch.push(attached);
        self.send_catch_up(ctx, msg.conn_id, generation, batch, &messages, reservation);
    }

    /// Sends `frames` plus `messages` to a catching-up subscriber, paid for by `reservation`,
    /// then continues.
    fn send_catch_up(
        &mut self,
        ctx: &mut Context<Self>,
        conn_id: u64,
        generation: u64,
        mut frames: Vec<Wire>,
        messages: &[StoredMessage],
        reservation: ReplayReservation,
    ) {
        let Some(epoch) = self.epoch.clone() else {
            return;
        };
        let Some(version) = self.subscribers.get(&conn_id).map(|s| s.outbox.version()) else {
            return;
        };
        frames.extend(self.encode(version, &epoch, messages));
        let Some(sub) = self.subscribers.get_mut(&conn_id) else {
            return;
        };
        if let Some(last) = messages.last() {
            sub.next = last.offset;
        }
        metrics::counter!(telemetry::HUB_REPLAYED).increment(messages.len() as u64);
        if !frames.is_empty() && sub.outbox.send_replay(frames, reservation).is_err() {
            let outbox = sub.outbox.clone();
            self.kick_slow(conn_id, &outbox);
            return;
        }
        self.caught_up_or_continue(ctx, conn_id, generation);
    }

    /// Turns a catching-up subscriber live once it reached `delivered`, or reads its next page.
    fn caught_up_or_continue(&mut self, ctx: &mut Context<Self>, conn_id: u64, generation: u64) {
        let delivered = self.delivered;
        let Some(sub) = self.subscribers.get_mut(&conn_id) else {
            return;
        };
        if sub.next >= delivered {
            sub.live = true;
            return;
        }
        let after = sub.next;
        let outbox = sub.outbox.clone();
        let Some(reservation) = self.reserve_page(ctx, &outbox, conn_id, generation) else {
            metrics::counter!(telemetry::HUB_REPLAYS_PACED).increment(1);
            return; // a ReplayRoom continues it
        };
        let page = self.page_for(&reservation);
        let read = self.store.read(&self.name, self.seen(), after, page);
        ctx.spawn(read.into_actor(self).map(move |result, act, ctx| {
            if act.subscribers.get(&conn_id).map(|s| s.generation) != Some(generation) {
                return;
            }
            match result {
                Ok(page) => {
                    let before = act.epoch.clone();
                    act.adopt(&page.epoch, page.head, page.first);
                    if before.as_ref() != Some(&page.epoch) {
                        act.pump(ctx);
                        act.caught_up_or_continue(ctx, conn_id, generation);
                        return;
                    }
                    let delivered = act.delivered;
                    let messages: Vec<StoredMessage> = page
                        .messages
                        .into_iter()
                        .filter(|m| m.offset > after && m.offset <= delivered)
                        .collect();
                    if messages.is_empty() {
                        // Trimmed while it caught up: it sees the jump and reports the gap.
                        if let Some(sub) = act.subscribers.get_mut(&conn_id) {
                            sub.next = delivered;
                        }
                    }
                    act.send_catch_up(
                        ctx,
                        conn_id,
                        generation,
                        Vec::new(),
                        &messages,
                        reservation,
                    );
                }
                Err(e) => {
                    metrics::counter!(telemetry::HUB_STORE_ERRORS, "op" => "read").increment(1);
                    tracing::warn!(parent: &act.span, conn_id, error = %e, "catch-up read failed; retrying");
                    ctx.run_later(READ_RETRY, move |act, ctx| {
                        act.caught_up_or_continue(ctx, conn_id, generation)
                    });
                }
            }
        }));
    }

    /// Sends batches of queued publishes to the store while fewer than
    /// [`MAX_APPENDS_IN_FLIGHT`] are there.
    fn append_next(&mut self, ctx: &mut Context<Self>) {
        while !self.draining
            && self.in_flight.len() < MAX_APPENDS_IN_FLIGHT
            && !self.pending.is_empty()
        {
            let mut commands = Vec::new();
            let mut bytes = 0;
            let max_messages = self.batches.limit();
            while let Some(next) = self.pending.front() {
                if !commands.is_empty()
                    && (commands.len() >= max_messages
                        || bytes + next.payload.len() > MAX_BATCH_BYTES)
                {
                    break;
                }
                bytes += next.payload.len();
                commands.extend(self.pending.pop_front());
            }
            let requests = commands
                .iter()
                .map(|c| AppendRequest {
                    producer: c.producer.clone(),
                    seq: c.seq,
                    payload: c.payload.clone(),
                })
                .collect();
            metrics::histogram!(telemetry::HUB_STORE_APPEND_BATCH).record(commands.len() as f64);
            // Behind the last append still outstanding, if any; with none, unconditionally
            // (so a fence key that expired while the channel was quiet costs nothing).
            // Numbers never repeat within a token: a value the key kept from an earlier
            // append can never pass for the one this must follow.
            let after = self.in_flight.back().map_or(0, |f| f.number);
            self.fence_number += 1;
            let number = self.fence_number;
            let fence = Fence {
                token: self.fence_token.clone(),
                number,
                after,
            };
            let started = std::time::Instant::now();
            let append = self.store.append(&self.name, self.seen(), fence, requests);
            self.in_flight.push_back(InFlight {
                number,
                commands,
                result: None,
                started,
                call: started.elapsed(),
            });
            ctx.spawn(
                append
                    .into_actor(self)
                    .map(move |result, act, ctx| act.on_append_result(ctx, number, result)),
            );
        }
    }

    /// Takes an append's result in, and handles every result that is next in send order.
    fn on_append_result(
        &mut self,
        ctx: &mut Context<Self>,
        number: u64,
        result: Result<Appended, ChannelError>,
    ) {
        if let Some(slot) = self.in_flight.iter_mut().find(|f| f.number == number) {
            metrics::histogram!(telemetry::HUB_STORE_APPEND_SECONDS)
                .record(slot.started.elapsed().as_secs_f64());
            slot.result = Some(result);
        }
        while self.in_flight.front().is_some_and(|f| f.result.is_some()) {
            let Some(InFlight {
                commands,
                result: Some(result),
                call,
                ..
            }) = self.in_flight.pop_front()
            else {
                break;
            };
            match result {
                Ok(appended) => {
                    let (handling, messages) = (std::time::Instant::now(), commands.len());
                    self.on_appended(ctx, commands, appended);
                    self.batches.observe(messages, call + handling.elapsed());
                }
                Err(e) => self.on_append_failed(commands, &e),
            }
        }
        if self.draining && self.in_flight.is_empty() {
            self.draining = false;
        }
        self.append_next(ctx);
        self.pace(ctx);
    }

    fn on_appended(
        &mut self,
        ctx: &mut Context<Self>,
        commands: Vec<PublishCommand>,
        appended: Appended,
    ) {
        let same_epoch = self.epoch.as_ref() == Some(&appended.epoch);
        // The payloads move from the commands into the fan-out; the acks keep the rest.
        let mut stored = Vec::with_capacity(commands.len());
        let mut acks = Vec::with_capacity(commands.len());
        for (command, outcome) in commands.into_iter().zip(&appended.outcomes) {
            let bytes = command.payload.len();
            let (offset, duplicate) = match outcome {
                AppendOutcome::Stored(offset) => {
                    stored.push(StoredMessage {
                        offset: *offset,
                        payload: command.payload,
                    });
                    (Some(*offset), false)
                }
                AppendOutcome::Duplicate(offset) => {
                    metrics::counter!(telemetry::DUPLICATES_DROPPED, "side" => "hub").increment(1);
                    tracing::debug!(parent: &self.span, producer = %command.producer, seq = command.seq, "duplicate publish acknowledged again");
                    (*offset, true)
                }
            };
            acks.push((command.reply, command.seq, bytes, offset, duplicate));
        }
        metrics::counter!(telemetry::HUB_MESSAGES_STORED).increment(stored.len() as u64);
        let contiguous = stored
            .iter()
            .enumerate()
            .all(|(i, m)| m.offset.0 == self.delivered.0 + 1 + i as u64);
        if same_epoch && contiguous {
            self.known_head = self.known_head.max(appended.head);
            self.fan_out(&stored);
        } else {
            // Another node appended in between (or the store started a new epoch): fan out
            // from the store, in offset order.
            self.adopt(&appended.epoch, appended.head, Offset(1));
        }
        self.send_acks(acks, &appended.epoch);
        self.pump(ctx);
        self.retry_waiting(ctx);
    }

    /// Acknowledges appended publishes, in order: to a v2 connection, consecutive publishes
    /// stored at consecutive offsets (or duplicates alike) go as one ack run.
    fn send_acks(
        &mut self,
        acks: Vec<(SessionOutbox, u64, usize, Option<Offset>, bool)>,
        epoch: &Epoch,
    ) {
        let mut acks = acks.into_iter().peekable();
        while let Some((reply, seq, bytes, offset, duplicate)) = acks.next() {
            let mut count: u32 = 1;
            let mut total = bytes;
            if reply.version() >= 2 {
                while let Some((next, next_seq, next_bytes, next_offset, next_dup)) = acks.peek() {
                    let i = u64::from(count);
                    let follows = next.conn_id() == reply.conn_id()
                        && *next_seq == seq + i
                        && *next_dup == duplicate
                        && match (offset, next_offset) {
                            (Some(o), Some(n)) => n.0 == o.0 + i,
                            (None, None) => true,
                            _ => false,
                        };
                    if !follows || count == u32::MAX {
                        break;
                    }
                    count += 1;
                    total += *next_bytes;
                    acks.next();
                }
            }
            let wire = if reply.version() >= 2 {
                let mut buf = BytesMut::new();
                v2::encode(
                    &v2::Record::Ack(v2::AckRun {
                        channel: self.name.clone(),
                        first_seq: seq,
                        count,
                        duplicate,
                        stored: offset.map(|o| (epoch.clone(), o)),
                    }),
                    &mut buf,
                );
                Wire::Records(buf.freeze())
            } else {
                reply.encode(&Frame::Ack(Ack {
                    channel: self.name.clone(),
                    seq,
                    offset,
                    epoch: offset.map(|_| epoch.clone()),
                    duplicate,
                }))
            };
            let out = Outbound {
                wire,
                completes: Some(Completes {
                    publishes: count as usize,
                    bytes: total,
                }),
            };
            if reply.send(out).is_err() {
                self.kick_slow(reply.conn_id(), &reply);
            }
        }
    }

    /// The store refused a batch: nothing of it is stored (the append is atomic), and nothing
    /// queued behind it may be stored ahead of it, so all of it is refused and the publishers'
    /// connections closed with a retryable error; they replay in order on their next
    /// connection.
    fn on_append_failed(&mut self, commands: Vec<PublishCommand>, error: &ChannelError) {
        metrics::counter!(telemetry::HUB_STORE_ERRORS, "op" => "append").increment(1);
        tracing::warn!(parent: &self.span, %error, publishes = commands.len() + self.pending.len(), "append failed; refusing the queued publishes");
        // Batches still in flight are fenced behind this one: they apply only if it did (a
        // timed-out append may have), and their own results say which — a failure refuses
        // their publishers in turn. New batches wait for them, under a new fence token.
        self.draining = true;
        self.fence_token = Epoch::random().to_string();
        self.fence_number = 0;
        let refusal = Self::unavailable(error);
        let mut kicked = HashSet::new();
        let queued: Vec<PublishCommand> = self.pending.drain(..).collect();
        for command in commands.into_iter().chain(queued) {
            let conn_id = command.reply.conn_id();
            self.refused.insert(conn_id);
            if kicked.insert(conn_id) {
                self.send_error(
                    &command.reply,
                    &refusal,
                    Some((command.seq, command.payload.len())),
                );
                command.reply.kick(refusal.clone());
            }
        }
    }
}

impl Actor for HubChannel {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.read_position(ctx);
        // Unused until its first attach arrives (the registry counts it as a channel).
        self.arm_idle_timer(ctx, None);
    }

    fn stopped(&mut self, _ctx: &mut Context<Self>) {
        if self.watching {
            self.store.unwatch(&self.name);
        }
    }
}

impl Handler<Subscribe> for HubChannel {
    type Result = ();

    fn handle(&mut self, msg: Subscribe, ctx: &mut Context<Self>) {
        self.member_arrived(ctx, msg.conn_id);
        self.attach(ctx, msg);
        self.pace(ctx);
    }
}

impl Handler<Unsubscribe> for HubChannel {
    type Result = ();

    fn handle(&mut self, msg: Unsubscribe, ctx: &mut Context<Self>) {
        self.member_left(ctx, msg.conn_id);
        self.pace(ctx);
        self.subscribers.remove(&msg.conn_id);
        self.waiting.retain(|w| w.conn_id != msg.conn_id);
        if msg.reply.is_none() {
            // The connection is gone: no later publish can come from it.
            self.refused.remove(&msg.conn_id);
        }
        self.unwatch_if_unused();
        if let Some(reply) = msg.reply {
            let out = Outbound {
                wire: reply.encode(&Frame::Detached(Detached {
                    channel: self.name.clone(),
                })),
                completes: None,
            };
            if reply.send(out).is_err() {
                self.kick_slow(msg.conn_id, &reply);
            }
        }
    }
}

impl Handler<PublishCommand> for HubChannel {
    type Result = ();

    fn handle(&mut self, msg: PublishCommand, ctx: &mut Context<Self>) {
        self.queue_publish(msg);
        self.append_next(ctx);
        self.pace(ctx);
    }
}

impl Handler<PublishRunCommand> for HubChannel {
    type Result = ();

    fn handle(&mut self, run: PublishRunCommand, ctx: &mut Context<Self>) {
        let PublishRunCommand {
            producer,
            first_seq,
            payloads,
            reply,
        } = run;
        for (seq, payload) in (first_seq..).zip(payloads) {
            self.queue_publish(PublishCommand {
                producer: producer.clone(),
                seq,
                payload,
                reply: reply.clone(),
            });
        }
        self.append_next(ctx);
        self.pace(ctx);
    }
}

impl HubChannel {
    /// Queues one publish for the store, or refuses it (and, when the queue is full, closes
    /// its connection).
    fn queue_publish(&mut self, msg: PublishCommand) {
        if self.refused.contains(&msg.reply.conn_id()) {
            let error = TransportError::Remote {
                code: ErrorCode::Unavailable,
                category: ErrorCategory::Service,
                permanent: false,
                message: "an earlier publish of this connection was refused; reconnect and replay"
                    .into(),
            };
            self.send_error(&msg.reply, &error, Some((msg.seq, msg.payload.len())));
            return;
        }
        if self.pending.len() >= self.max_pending {
            // The store is not keeping up: refuse, in order, everything this connection sends
            // from here on (it replays on its next connection), as a full mailbox would.
            let conn_id = msg.reply.conn_id();
            tracing::warn!(parent: &self.span, conn_id, queued = self.pending.len(), "publish queue full; closing the publisher's connection");
            let error = TransportError::Remote {
                code: ErrorCode::Overloaded,
                category: ErrorCategory::Service,
                permanent: false,
                message: "channel is overloaded; reconnect and retry".into(),
            };
            self.refused.insert(conn_id);
            self.send_error(&msg.reply, &error, Some((msg.seq, msg.payload.len())));
            msg.reply.kick(error);
            return;
        }
        self.pending.push_back(msg);
    }
}

impl HubChannel {
    /// The last offset sent to `sub`.
    fn offset_of(&self, sub: &Subscriber) -> Offset {
        if sub.live {
            self.delivered
        } else {
            sub.next
        }
    }

    fn head(&self) -> Offset {
        self.delivered.max(self.known_head)
    }
}

impl Handler<Summarize> for HubChannel {
    type Result = MessageResult<Summarize>;

    fn handle(&mut self, _: Summarize, _: &mut Context<Self>) -> Self::Result {
        MessageResult(ChannelSummary {
            name: self.name.clone(),
            epoch: self.epoch.as_ref().map(|e| e.to_string()),
            head: self.head().0,
            subscribers: self.subscribers.len(),
            nodes: Vec::new(),
        })
    }
}

impl Handler<Describe> for HubChannel {
    type Result = ResponseActFuture<Self, ChannelDetail>;

    fn handle(&mut self, _: Describe, _: &mut Context<Self>) -> Self::Result {
        let head = self.head();
        let mut subscribers: Vec<ChannelSubscriber> = self
            .subscribers
            .values()
            .map(|sub| {
                let offset = self.offset_of(sub);
                let (client_id, session) = sub
                    .outbox
                    .owner()
                    .map(|(c, s)| (c.0.clone(), s.0.clone()))
                    .unwrap_or_default();
                ChannelSubscriber {
                    client_id,
                    session,
                    node: String::new(),
                    live: sub.live,
                    offset: offset.0,
                    behind: head.0.saturating_sub(offset.0),
                    queued_bytes: sub.outbox.pending_bytes(),
                }
            })
            .collect();
        subscribers.sort_by(|a, b| (&a.client_id, &a.session).cmp(&(&b.client_id, &b.session)));
        let detail = ChannelDetail {
            name: self.name.clone(),
            epoch: self.epoch.as_ref().map(|e| e.to_string()),
            head: head.0,
            first_retained: None,
            store_error: None,
            pending_publishes: self.pending.len()
                + self
                    .in_flight
                    .iter()
                    .map(|b| b.commands.len())
                    .sum::<usize>(),
            members: self.members.len(),
            subscribers,
        };
        // The retained range is the store's (its trimming is not this node's doing).
        let read = self
            .store
            .read(&self.name, self.seen(), head, PageLimit::POSITION_ONLY);
        Box::pin(read.into_actor(self).map(move |result, _act, _ctx| {
            let mut detail = detail;
            match result {
                Ok(page) => {
                    detail.epoch = Some(page.epoch.to_string());
                    detail.head = detail.head.max(page.head.0);
                    detail.first_retained = Some(page.first.0);
                }
                Err(e) => detail.store_error = Some(e.to_string()),
            }
            detail
        }))
    }
}

impl Handler<DescribeMember> for HubChannel {
    type Result = MessageResult<DescribeMember>;

    fn handle(&mut self, msg: DescribeMember, _: &mut Context<Self>) -> Self::Result {
        let head = self.head();
        let epoch = self.epoch.as_ref().map(|e| e.to_string());
        let facts = match self.subscribers.get(&msg.conn_id) {
            Some(sub) => {
                let offset = self.offset_of(sub);
                Some(SessionChannel {
                    channel: self.name.clone(),
                    subscribed: true,
                    live: sub.live,
                    epoch,
                    offset: Some(offset.0),
                    behind: Some(head.0.saturating_sub(offset.0)),
                })
            }
            None if self.members.contains(&msg.conn_id) => Some(SessionChannel {
                channel: self.name.clone(),
                subscribed: self.waiting.iter().any(|w| w.conn_id == msg.conn_id),
                live: false,
                epoch,
                offset: None,
                behind: None,
            }),
            None => None,
        };
        MessageResult(facts)
    }
}

impl Handler<ReplayRoom> for HubChannel {
    type Result = ();

    fn handle(&mut self, msg: ReplayRoom, ctx: &mut Context<Self>) {
        let Some(sub) = self.subscribers.get_mut(&msg.conn_id) else {
            return;
        };
        if sub.generation != msg.generation || sub.live {
            return;
        }
        match sub.attach_read.take() {
            Some(read) => self.read_attach_page(ctx, read, msg.generation),
            None => self.caught_up_or_continue(ctx, msg.conn_id, msg.generation),
        }
    }
}

impl Handler<Wake> for HubChannel {
    type Result = ();

    fn handle(&mut self, _: Wake, ctx: &mut Context<Self>) {
        self.pace(ctx);
        self.notices.queued.store(false, Ordering::Release);
        let latest = self
            .notices
            .latest
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let resync = self.notices.resync.swap(false, Ordering::Relaxed);
        let Some(epoch) = self.epoch.clone() else {
            // The first position read is under way; whatever this was, read again after it.
            self.read_position(ctx);
            return;
        };
        match latest {
            _ if resync => self.read_position(ctx),
            // Another epoch: the store started over; read where it stands.
            Some((e, _)) if e != epoch => self.read_position(ctx),
            Some((_, head)) if head > self.known_head => {
                self.known_head = head;
                self.pump(ctx);
            }
            _ => {}
        }
    }
}
