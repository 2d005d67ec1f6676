//! The hub's session table: which sessions exist, whose each is, which connection owns each,
//! and when a detached one expires. Pure: the owner handle is generic and time is passed in.
//!
//! A session belongs to the [`Identity`] the authenticator gave the connection that opened it
//! (and to that connection's client id). Only the same identity and client id resume it: a
//! `hello.resume` naming a session of anyone else gets a new session, exactly as an unknown or
//! expired one would — the owner keeps its session and its connection, and the asker learns
//! nothing about it.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use super::auth::Identity;
use crate::protocol::{ClientId, SessionId};
use crate::telemetry;

/// Default time a detached session stays resumable: 5 minutes.
pub const DEFAULT_SESSION_TTL: Duration = Duration::from_secs(300);

#[derive(Debug)]
struct Entry<O> {
    identity: Identity,
    client_id: ClientId,
    owner: Option<(u64, O)>,
    detached_at: Option<Instant>,
}

/// The result of opening a session for a new connection.
#[derive(Debug)]
pub struct Opened<O> {
    /// The session the connection now owns.
    pub session: SessionId,
    /// Whether it is the session the client asked to resume.
    pub resumed: bool,
    /// The previous owner of a resumed session that was still attached (its connection should
    /// be closed: the client has moved on).
    pub evicted: Option<(u64, O)>,
}

/// Sessions by id. `O` is whatever handle reaches a connection (an actor recipient in the hub).
#[derive(Debug)]
pub struct SessionTable<O> {
    ttl: Duration,
    entries: HashMap<SessionId, Entry<O>>,
}

impl<O> SessionTable<O> {
    /// An empty table whose detached sessions expire after `ttl`.
    pub fn new(ttl: Duration) -> Self {
        SessionTable {
            ttl,
            entries: HashMap::new(),
        }
    }

    /// Number of sessions, attached or resumable.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Opens a session for connection `conn_id` of `client_id`, authenticated as `identity`:
    /// the one in `resume` if it exists, has not expired and belongs to the same identity and
    /// client id; a new one otherwise (a session of someone else is left as it was: its owner
    /// is not evicted).
    pub fn open(
        &mut self,
        identity: &Identity,
        client_id: &ClientId,
        resume: Option<&SessionId>,
        conn_id: u64,
        owner: O,
        now: Instant,
    ) -> Opened<O> {
        self.purge(now);
        if let Some(id) = resume {
            match self.entries.get_mut(id) {
                Some(entry) if entry.identity == *identity && entry.client_id == *client_id => {
                    let evicted = entry.owner.replace((conn_id, owner));
                    entry.detached_at = None;
                    return Opened {
                        session: id.clone(),
                        resumed: true,
                        evicted,
                    };
                }
                // Someone else's: counted (a peer guessing or replaying session ids shows
                // here), answered as an unknown session would be.
                Some(_) => {
                    metrics::counter!(telemetry::HUB_RESUMES_REFUSED, "reason" => "not_owner")
                        .increment(1)
                }
                None => metrics::counter!(telemetry::HUB_RESUMES_REFUSED, "reason" => "unknown")
                    .increment(1),
            }
        }
        let session = SessionId::random();
        self.entries.insert(
            session.clone(),
            Entry {
                identity: identity.clone(),
                client_id: client_id.clone(),
                owner: Some((conn_id, owner)),
                detached_at: None,
            },
        );
        Opened {
            session,
            resumed: false,
            evicted: None,
        }
    }

    /// Connection `conn_id` ended: its session becomes resumable until `now + ttl`. Does nothing
    /// if another connection took the session over meanwhile.
    pub fn detach(&mut self, session: &SessionId, conn_id: u64, now: Instant) {
        if let Some(entry) = self.entries.get_mut(session) {
            if entry.owner.as_ref().is_some_and(|(id, _)| *id == conn_id) {
                entry.owner = None;
                entry.detached_at = Some(now);
            }
        }
    }

    /// Drops detached sessions older than the TTL; returns how many.
    pub fn purge(&mut self, now: Instant) -> usize {
        let before = self.entries.len();
        let ttl = self.ttl;
        self.entries.retain(|_, e| {
            e.detached_at
                .is_none_or(|at| now.saturating_duration_since(at) < ttl)
        });
        before - self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(id: &str) -> ClientId {
        ClientId(id.into())
    }

    fn who(name: &str) -> Identity {
        Identity::new(name).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_detached_session_resumes_until_its_ttl() {
        let mut t = SessionTable::new(Duration::from_secs(60));
        let alice = who("alice");
        let first = t.open(&alice, &client("a"), None, 1, (), Instant::now());
        assert!(!first.resumed);
        t.detach(&first.session, 1, Instant::now());

        tokio::time::advance(Duration::from_secs(59)).await;
        let again = t.open(
            &alice,
            &client("a"),
            Some(&first.session),
            2,
            (),
            Instant::now(),
        );
        assert!(again.resumed);
        assert_eq!(again.session, first.session);
        t.detach(&again.session, 2, Instant::now());

        tokio::time::advance(Duration::from_secs(60)).await;
        let late = t.open(
            &alice,
            &client("a"),
            Some(&first.session),
            3,
            (),
            Instant::now(),
        );
        assert!(!late.resumed);
        assert_ne!(late.session, first.session);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn another_client_cannot_take_a_session() {
        let mut t = SessionTable::new(DEFAULT_SESSION_TTL);
        let alice = who("alice");
        let a = t.open(&alice, &client("a"), None, 1, (), Instant::now());
        // Same identity (one principal's fleet), another client id: a session of its own.
        let b = t.open(
            &alice,
            &client("b"),
            Some(&a.session),
            2,
            (),
            Instant::now(),
        );
        assert!(!b.resumed);
        assert_ne!(a.session, b.session);
    }

    #[test]
    fn another_identity_cannot_take_or_evict_a_session_with_the_same_client_id() {
        let mut t = SessionTable::new(DEFAULT_SESSION_TTL);
        let (alice, mallory) = (who("alice"), who("mallory"));
        let a = t.open(&alice, &client("c"), None, 1, "alice's", Instant::now());
        let m = t.open(
            &mallory,
            &client("c"),
            Some(&a.session),
            2,
            "mallory's",
            Instant::now(),
        );
        assert!(!m.resumed);
        assert_ne!(m.session, a.session);
        assert_eq!(m.evicted, None, "the owner's connection is not evicted");
        assert_eq!(t.len(), 2);

        // Nor can it end or orphan the owner's session: its connection still owns it, and the
        // owner's own resume evicts exactly that connection.
        t.detach(&a.session, 2, Instant::now());
        let back = t.open(
            &alice,
            &client("c"),
            Some(&a.session),
            3,
            "alice's new",
            Instant::now(),
        );
        assert!(back.resumed);
        assert_eq!(back.session, a.session);
        assert_eq!(back.evicted, Some((1, "alice's")));

        // Detached, the owner's session stays the owner's.
        t.detach(&a.session, 3, Instant::now());
        let again = t.open(
            &mallory,
            &client("c"),
            Some(&a.session),
            4,
            "mallory's",
            Instant::now(),
        );
        assert!(!again.resumed);
        let owner = t.open(
            &alice,
            &client("c"),
            Some(&a.session),
            5,
            "alice's",
            Instant::now(),
        );
        assert!(owner.resumed);
        assert_eq!(owner.evicted, None);
    }

    #[test]
    fn anonymous_identities_of_one_client_id_share_its_sessions() {
        let mut t = SessionTable::new(DEFAULT_SESSION_TTL);
        let id = Identity::anonymous(&client("c"));
        let a = t.open(&id, &client("c"), None, 1, "old", Instant::now());
        let b = t.open(
            &Identity::anonymous(&client("c")),
            &client("c"),
            Some(&a.session),
            2,
            "new",
            Instant::now(),
        );
        assert!(
            b.resumed,
            "AllowAll keeps nobody apart: by design, development only"
        );
        assert_eq!(b.evicted, Some((1, "old")));
    }

    #[test]
    fn resuming_an_attached_session_evicts_the_old_connection() {
        let mut t = SessionTable::new(DEFAULT_SESSION_TTL);
        let alice = who("alice");
        let a = t.open(&alice, &client("a"), None, 1, "old", Instant::now());
        let b = t.open(
            &alice,
            &client("a"),
            Some(&a.session),
            2,
            "new",
            Instant::now(),
        );
        assert!(b.resumed);
        assert_eq!(b.evicted, Some((1, "old")));
        // The old connection's late detach does not orphan the new owner.
        t.detach(&a.session, 1, Instant::now());
        t.purge(Instant::now() + DEFAULT_SESSION_TTL * 2);
        assert_eq!(t.len(), 1);
    }
}
