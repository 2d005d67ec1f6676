//! The hub's session table: which sessions exist, whose each is, which connection owns each,
//! and when a detached one expires. Pure: the owner handle is generic and time is passed in.
//!
//! A session belongs to the [`Identity`] the authenticator gave the connection that opened it
//! (and to that connection's client id). Only the same identity and client id resume it: a
//! `hello.resume` naming a session of anyone else gets a new session, exactly as an unknown or
//! expired one would — the owner keeps its session and its connection, and the asker learns
//! nothing about it.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Bound;
use std::time::Duration;

use tokio::time::Instant;

use super::auth::Identity;
use crate::protocol::{ClientId, SessionId};
use crate::telemetry;

/// Default time a detached session stays resumable: 5 minutes.
pub const DEFAULT_SESSION_TTL: Duration = Duration::from_secs(300);

/// A session's key in the table: sessions are ordered by client id, then session id (what the
/// admin API pages by).
pub type SessionKey = (ClientId, SessionId);

#[derive(Debug)]
struct Entry<O> {
    identity: Identity,
    owner: Option<(u64, O)>,
    opened_at: Instant,
    attached_at: Instant,
    detached_at: Option<Instant>,
    resumes: u64,
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

/// What the table knows of one session (for the admin API).
#[derive(Debug, Clone)]
pub struct SessionFacts<O> {
    /// The client id the session belongs to.
    pub client_id: ClientId,
    /// The session.
    pub session: SessionId,
    /// Who the session belongs to.
    pub identity: Identity,
    /// The connection that owns it, when attached.
    pub owner: Option<(u64, O)>,
    /// When the session was created.
    pub opened_at: Instant,
    /// When its current (or last) connection took it.
    pub attached_at: Instant,
    /// When its last connection ended, while detached.
    pub detached_at: Option<Instant>,
    /// How many times a new connection resumed it.
    pub resumes: u64,
}

/// Sessions by client id and session id. `O` is whatever handle reaches a connection (the
/// session actor's address in the hub).
///
/// Expiry is a queue in detach order, so opening a session costs `O(log n)` whatever the number
/// of sessions (a reconnect storm of `n` clients does not scan the table `n` times).
#[derive(Debug)]
pub struct SessionTable<O> {
    ttl: Duration,
    entries: BTreeMap<SessionKey, Entry<O>>,
    /// Detaches in time order; an entry that was resumed (or detached again) since is skipped.
    expiry: VecDeque<(Instant, SessionKey)>,
    /// Sessions detached now (what `expiry` must at least hold; stale entries beyond twice
    /// that are swept, so a client that flaps cannot grow the queue without bound).
    detached: usize,
}

impl<O> SessionTable<O> {
    /// An empty table whose detached sessions expire after `ttl`.
    pub fn new(ttl: Duration) -> Self {
        SessionTable {
            ttl,
            entries: BTreeMap::new(),
            expiry: VecDeque::new(),
            detached: 0,
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
            let key = (client_id.clone(), id.clone());
            match self.entries.get_mut(&key) {
                Some(entry) if entry.identity == *identity => {
                    let evicted = entry.owner.replace((conn_id, owner));
                    if entry.detached_at.take().is_some() {
                        self.detached -= 1;
                    }
                    entry.attached_at = now;
                    entry.resumes += 1;
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
            (client_id.clone(), session.clone()),
            Entry {
                identity: identity.clone(),
                owner: Some((conn_id, owner)),
                opened_at: now,
                attached_at: now,
                detached_at: None,
                resumes: 0,
            },
        );
        Opened {
            session,
            resumed: false,
            evicted: None,
        }
    }

    /// Connection `conn_id` ended: session `session` of `client_id` becomes resumable until
    /// `now + ttl`. Does nothing if another connection took the session over meanwhile.
    pub fn detach(
        &mut self,
        client_id: &ClientId,
        session: &SessionId,
        conn_id: u64,
        now: Instant,
    ) {
        let key = (client_id.clone(), session.clone());
        if let Some(entry) = self.entries.get_mut(&key) {
            if entry.owner.as_ref().is_some_and(|(id, _)| *id == conn_id) {
                entry.owner = None;
                entry.detached_at = Some(now);
                self.detached += 1;
                self.expiry.push_back((now, key));
                if self.expiry.len() > 2 * self.detached + 1024 {
                    self.sweep_expiry();
                }
            }
        }
    }

    /// Whether `(at, key)` is the detach that still holds for its session.
    fn is_current(&self, at: Instant, key: &SessionKey) -> bool {
        self.entries
            .get(key)
            .is_some_and(|e| e.owner.is_none() && e.detached_at == Some(at))
    }

    /// Drops the queue's stale entries (sessions resumed or detached again since).
    fn sweep_expiry(&mut self) {
        let mut expiry = std::mem::take(&mut self.expiry);
        expiry.retain(|(at, key)| self.is_current(*at, key));
        self.expiry = expiry;
    }

    /// Entries in the expiry queue (for tests of its bound).
    #[cfg(test)]
    fn queued(&self) -> usize {
        self.expiry.len()
    }

    /// Drops detached sessions older than the TTL; returns how many.
    pub fn purge(&mut self, now: Instant) -> usize {
        let mut dropped = 0;
        while let Some((at, _)) = self.expiry.front() {
            if now.saturating_duration_since(*at) < self.ttl {
                break;
            }
            let Some((at, key)) = self.expiry.pop_front() else {
                break;
            };
            // Still detached since exactly then (not resumed, not detached again later).
            if self.is_current(at, &key) {
                self.entries.remove(&key);
                self.detached -= 1;
                dropped += 1;
            }
        }
        dropped
    }
}

impl<O: Clone> SessionTable<O> {
    fn facts(key: &SessionKey, e: &Entry<O>) -> SessionFacts<O> {
        SessionFacts {
            client_id: key.0.clone(),
            session: key.1.clone(),
            identity: e.identity.clone(),
            owner: e.owner.clone(),
            opened_at: e.opened_at,
            attached_at: e.attached_at,
            detached_at: e.detached_at,
            resumes: e.resumes,
        }
    }

    /// Up to `limit` sessions after `after` (from the first when `None`), in key order, and
    /// whether more follow. Expired sessions are dropped first.
    pub fn page(
        &mut self,
        after: Option<&SessionKey>,
        limit: usize,
        now: Instant,
    ) -> (Vec<SessionFacts<O>>, bool) {
        self.purge(now);
        let lower = match after {
            Some(key) => Bound::Excluded(key.clone()),
            None => Bound::Unbounded,
        };
        let mut range = self.entries.range((lower, Bound::Unbounded));
        let page = range
            .by_ref()
            .take(limit)
            .map(|(k, e)| Self::facts(k, e))
            .collect();
        (page, range.next().is_some())
    }

    /// Every session of `client_id` (one per identity that used the id, usually one).
    pub fn of_client(&mut self, client_id: &ClientId, now: Instant) -> Vec<SessionFacts<O>> {
        self.purge(now);
        let from = (client_id.clone(), SessionId(String::new()));
        self.entries
            .range((Bound::Included(from), Bound::Unbounded))
            .take_while(|((c, _), _)| c == client_id)
            .map(|(k, e)| Self::facts(k, e))
            .collect()
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
        t.detach(&client("a"), &first.session, 1, Instant::now());

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
        t.detach(&client("a"), &again.session, 2, Instant::now());

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
        t.detach(&client("c"), &a.session, 2, Instant::now());
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
        t.detach(&client("c"), &a.session, 3, Instant::now());
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
        t.detach(&client("a"), &a.session, 1, Instant::now());
        t.purge(Instant::now() + DEFAULT_SESSION_TTL * 2);
        assert_eq!(t.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn pages_walk_every_session_once_in_client_order() {
        let mut t = SessionTable::new(DEFAULT_SESSION_TTL);
        for (conn, name) in ["c", "a", "b", "a", "d"].iter().enumerate() {
            t.open(
                &who(name),
                &client(name),
                None,
                conn as u64,
                (),
                Instant::now(),
            );
        }
        let mut seen = Vec::new();
        let mut cursor = None;
        loop {
            let (page, more) = t.page(cursor.as_ref(), 2, Instant::now());
            assert!(page.len() <= 2);
            cursor = page
                .last()
                .map(|f| (f.client_id.clone(), f.session.clone()));
            seen.extend(page.into_iter().map(|f| f.client_id.0));
            if !more {
                break;
            }
        }
        assert_eq!(seen, ["a", "a", "b", "c", "d"]);
        assert_eq!(t.of_client(&client("a"), Instant::now()).len(), 2);
        assert!(t.of_client(&client("e"), Instant::now()).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn facts_count_resumes_and_keep_the_times() {
        let mut t = SessionTable::new(Duration::from_secs(60));
        let alice = who("alice");
        let start = Instant::now();
        let s = t.open(&alice, &client("a"), None, 1, (), start).session;
        tokio::time::advance(Duration::from_secs(5)).await;
        t.detach(&client("a"), &s, 1, Instant::now());
        let facts = &t.of_client(&client("a"), Instant::now())[0];
        assert_eq!(facts.detached_at, Some(start + Duration::from_secs(5)));
        assert!(facts.owner.is_none());
        tokio::time::advance(Duration::from_secs(5)).await;
        t.open(&alice, &client("a"), Some(&s), 2, (), Instant::now());
        let facts = &t.of_client(&client("a"), Instant::now())[0];
        assert_eq!(facts.resumes, 1);
        assert_eq!(facts.opened_at, start);
        assert_eq!(facts.attached_at, start + Duration::from_secs(10));
        assert_eq!(facts.detached_at, None);
        assert_eq!(facts.owner.as_ref().map(|o| o.0), Some(2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_detached_again_expires_from_its_last_detach() {
        let mut t = SessionTable::new(Duration::from_secs(60));
        let alice = who("alice");
        let s = t
            .open(&alice, &client("a"), None, 1, (), Instant::now())
            .session;
        t.detach(&client("a"), &s, 1, Instant::now());
        tokio::time::advance(Duration::from_secs(50)).await;
        t.open(&alice, &client("a"), Some(&s), 2, (), Instant::now());
        t.detach(&client("a"), &s, 2, Instant::now());
        // The first detach's deadline passes: the queue's stale entry drops nothing.
        tokio::time::advance(Duration::from_secs(20)).await;
        assert_eq!(t.purge(Instant::now()), 0);
        assert_eq!(t.len(), 1);
        tokio::time::advance(Duration::from_secs(40)).await;
        assert_eq!(t.purge(Instant::now()), 1);
        assert!(t.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_flapping_client_cannot_grow_the_expiry_queue_without_bound() {
        let mut t = SessionTable::new(DEFAULT_SESSION_TTL);
        let alice = who("alice");
        let s = t
            .open(&alice, &client("a"), None, 0, (), Instant::now())
            .session;
        for conn in 0..20_000u64 {
            t.detach(&client("a"), &s, conn, Instant::now());
            let again = t.open(&alice, &client("a"), Some(&s), conn + 1, (), Instant::now());
            assert!(again.resumed);
            tokio::time::advance(Duration::from_millis(1)).await;
        }
        assert!(t.queued() <= 1024 + 2, "{} queued", t.queued());
        // The session still expires on time once it stays detached.
        t.detach(&client("a"), &s, 20_000, Instant::now());
        tokio::time::advance(DEFAULT_SESSION_TTL).await;
        assert_eq!(t.purge(Instant::now()), 1);
        assert!(t.is_empty());
    }
}
