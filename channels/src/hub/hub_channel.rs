//! The HubChannel actor: one per channel on the hub. It owns the channel's [`ChannelLog`] and
//! its subscribers, so numbering, storing and fan-out happen in one place, in one order.

use std::collections::HashMap;

use actix::prelude::*;
use bytestring::ByteString;
use tether_transport::hub::{Outbound, SessionOutbox};
use tether_transport::protocol::{Ack, Attached, Detached, ErrorCode, Frame, Payload, Position};
use tether_transport::{ErrorCategory, TransportError};
use tokio::time::Instant;

use super::log::{ChannelLog, ProducerKey, PublishOutcome};
use crate::telemetry;

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
    /// Who publishes.
    pub producer: ProducerKey,
    /// The publish's sequence number.
    pub seq: u64,
    /// The message.
    pub payload: Payload,
    /// Where the ack goes.
    pub reply: SessionOutbox,
}

/// One channel on the hub.
pub struct HubChannel {
    log: ChannelLog,
    subscribers: HashMap<u64, SessionOutbox>,
    span: tracing::Span,
}

impl HubChannel {
    /// A channel over `log`.
    pub fn new(log: ChannelLog) -> Self {
        let span = tracing::info_span!("hub_channel", channel = %log.name(), epoch = %log.epoch());
        HubChannel {
            log,
            subscribers: HashMap::new(),
            span,
        }
    }

    fn frame(frame: Frame, completes_publish: bool) -> Outbound {
        Outbound {
            text: frame.encode().into(),
            completes_publish,
        }
    }

    /// Sends to one connection; a full outbox closes it as a slow consumer.
    fn send(&mut self, conn_id: u64, outbox: &SessionOutbox, out: Outbound) -> bool {
        if outbox.send(out).is_ok() {
            return true;
        }
        self.kick_slow(conn_id, outbox);
        false
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

    /// Sends one encoded message frame to every subscriber (encoded once, shared by all).
    fn fan_out(&mut self, frame: ByteString) {
        let mut closed = Vec::new();
        let mut slow = Vec::new();
        for (conn_id, outbox) in &self.subscribers {
            let out = Outbound {
                text: frame.clone(),
                completes_publish: false,
            };
            if !outbox.is_open() {
                closed.push(*conn_id);
            } else if outbox.send(out).is_err() {
                slow.push((*conn_id, outbox.clone()));
            }
        }
        let delivered = self.subscribers.len() - closed.len() - slow.len();
        metrics::counter!(telemetry::HUB_DELIVERIES).increment(delivered as u64);
        for conn_id in closed {
            self.subscribers.remove(&conn_id);
        }
        for (conn_id, outbox) in slow {
            self.kick_slow(conn_id, &outbox);
        }
    }
}

impl Actor for HubChannel {
    type Context = Context<Self>;

    fn started(&mut self, _ctx: &mut Context<Self>) {
        metrics::gauge!(telemetry::HUB_CHANNELS).increment(1.0);
    }

    fn stopped(&mut self, _ctx: &mut Context<Self>) {
        metrics::gauge!(telemetry::HUB_CHANNELS).decrement(1.0);
    }
}

impl Handler<Subscribe> for HubChannel {
    type Result = ();

    fn handle(&mut self, msg: Subscribe, _ctx: &mut Context<Self>) {
        let now = Instant::now();
        let plan = if msg.subscribe {
            self.log.resume(msg.resume.as_ref(), now)
        } else {
            self.log.resume(None, now)
        };
        tracing::debug!(parent: &self.span, conn_id = msg.conn_id, resumed = plan.resumed, replay = plan.replay.len(), gap = ?plan.gap, "attach");
        let attached = Frame::Attached(Attached {
            channel: self.log.name().to_owned(),
            epoch: plan.epoch,
            head: plan.head,
            resumed: plan.resumed,
            replay: plan.replay.len() as u64,
            gap: plan.gap,
        })
        .encode();
        // The confirmation and the whole replay go as one batch, ahead of anything live.
        metrics::counter!(telemetry::HUB_REPLAYED).increment(plan.replay.len() as u64);
        let mut batch = Vec::with_capacity(plan.replay.len() + 1);
        batch.push(attached.into());
        batch.extend(plan.replay);
        if msg.outbox.send_batch(batch).is_err() {
            self.kick_slow(msg.conn_id, &msg.outbox);
            return;
        }
        if msg.subscribe {
            self.subscribers.insert(msg.conn_id, msg.outbox);
        } else {
            self.subscribers.remove(&msg.conn_id);
        }
    }
}

impl Handler<Unsubscribe> for HubChannel {
    type Result = ();

    fn handle(&mut self, msg: Unsubscribe, _ctx: &mut Context<Self>) {
        self.subscribers.remove(&msg.conn_id);
        if let Some(reply) = msg.reply {
            let detached = Self::frame(
                Frame::Detached(Detached {
                    channel: self.log.name().to_owned(),
                }),
                false,
            );
            self.send(msg.conn_id, &reply, detached);
        }
    }
}

impl Handler<PublishCommand> for HubChannel {
    type Result = ();

    fn handle(&mut self, msg: PublishCommand, _ctx: &mut Context<Self>) {
        let outcome = self
            .log
            .publish(&msg.producer, msg.seq, &msg.payload, Instant::now());
        let (offset, duplicate) = match outcome {
            PublishOutcome::Stored { offset, frame } => {
                metrics::counter!(telemetry::HUB_MESSAGES_STORED).increment(1);
                self.fan_out(frame);
                (Some(offset), false)
            }
            PublishOutcome::Duplicate { offset } => {
                metrics::counter!(telemetry::DUPLICATES_DROPPED, "side" => "hub").increment(1);
                tracing::debug!(parent: &self.span, producer = %msg.producer, seq = msg.seq, "duplicate publish acknowledged again");
                (offset, true)
            }
        };
        let ack = Self::frame(
            Frame::Ack(Ack {
                channel: self.log.name().to_owned(),
                seq: msg.seq,
                offset,
                duplicate,
            }),
            true,
        );
        self.send(msg.reply.conn_id(), &msg.reply, ack);
    }
}
