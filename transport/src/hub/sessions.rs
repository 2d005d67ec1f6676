//! The hub's session table: which sessions exist, which connection owns each, and when a
//! detached one expires. Pure: the owner handle is generic and time is passed in.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use crate::protocol::{ClientId, SessionId};

/// Default time a detached session stays resumable: 5 minutes.
pub const DEFAULT_SESSION_TTL: Duration = Duration::from_secs(300);

#[derive(Debug)]
struct Entry<O> {
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

    /// Opens a session for connection `conn_id` of `client_id`: the one in `resume` if it
    /// exists, has not expired and belongs to the same client; a new one otherwise.
    pub fn open(
        &mut self,
        client_id: &ClientId,
        resume: Option<&SessionId>,
        conn_id: u64,
        owner: O,
        now: Instant,
    ) -> Opened<O> {
        self.purge(now);
        if let Some(id) = resume {
            if let Some(entry) = self.entries.get_mut(id) {
                if entry.client_id == *client_id {
                    let evicted = entry.owner.replace((conn_id, owner));
                    entry.detached_at = None;
                    return Opened {
                        session: id.clone(),
                        resumed: true,
                        evicted,
                    };
                }
            }
        }
        let session = SessionId::random();
        self.entries.insert(
            session.clone(),
            Entry {
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

    #[tokio::test(start_paused = true)]
    async fn a_detached_session_resumes_until_its_ttl() {
        let mut t = SessionTable::new(Duration::from_secs(60));
        let first = t.open(&client("a"), None, 1, (), Instant::now());
        assert!(!first.resumed);
        t.detach(&first.session, 1, Instant::now());

        tokio::time::advance(Duration::from_secs(59)).await;
        let again = t.open(&client("a"), Some(&first.session), 2, (), Instant::now());
        assert!(again.resumed);
        assert_eq!(again.session, first.session);
        t.detach(&again.session, 2, Instant::now());

        tokio::time::advance(Duration::from_secs(60)).await;
        let late = t.open(&client("a"), Some(&first.session), 3, (), Instant::now());
        assert!(!late.resumed);
        assert_ne!(late.session, first.session);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn another_client_cannot_take_a_session() {
        let mut t = SessionTable::new(DEFAULT_SESSION_TTL);
        let a = t.open(&client("a"), None, 1, (), Instant::now());
        let b = t.open(&client("b"), Some(&a.session), 2, (), Instant::now());
        assert!(!b.resumed);
        assert_ne!(a.session, b.session);
    }

    #[test]
    fn resuming_an_attached_session_evicts_the_old_connection() {
        let mut t = SessionTable::new(DEFAULT_SESSION_TTL);
        let a = t.open(&client("a"), None, 1, "old", Instant::now());
        let b = t.open(&client("a"), Some(&a.session), 2, "new", Instant::now());
        assert!(b.resumed);
        assert_eq!(b.evicted, Some((1, "old")));
        // The old connection's late detach does not orphan the new owner.
        t.detach(&a.session, 1, Instant::now());
        t.purge(Instant::now() + DEFAULT_SESSION_TTL * 2);
        assert_eq!(t.len(), 1);
    }
}
