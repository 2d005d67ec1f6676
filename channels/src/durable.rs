//! The durable client outbox: publishes that survive the client process, on an embedded
//! [redb](https://docs.rs/redb) file. Everything redb-specific lives in this module.
//!
//! A [`DurableStore`] is one file, owned by one running client at a time (redb locks it: a
//! second open, from this process or another, is refused with [`DurableFailure::Locked`]). It
//! keeps what a restarted process needs to continue exactly where a killed one stopped:
//!
//! * the client's identity — its client id and instance id, made up on first open (or the
//!   client id given to [`DurableStoreBuilder::client_id`]) and handed to the transport by
//!   [`DurableStore::transport_config`]; the hub tells publishers apart by exactly these;
//! * per channel, the producer id of the channel handle and the last sequence number given
//!   out, so numbering continues after a restart instead of starting again at 1;
//! * per channel, every publish accepted and not yet acknowledged, under its sequence number.
//!
//! A publish on a durable channel is accepted once its write is committed: concurrent
//! publishes share one commit (group commit), and acknowledgements are removed in batches
//! too. A process that starts again on the same file re-sends the stored publishes with their
//! original sequence numbers before anything new; the hub recognises those it already stored
//! (by producer and sequence number) and acknowledges them again without storing them twice.
//!
//! The store holds no more per channel than the channel's
//! [`BufferLimits`](crate::BufferLimits) allow: publishes are stored only once the outbox has
//! room for them.
//!
//! ```no_run
//! use tether_channels::{durable::DurableStore, Channel, ChannelOptions};
//! use tether_transport::Transport;
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let store = DurableStore::open("/var/lib/app/outbox.redb")?;
//! let transport = Transport::start(store.transport_config("ws://127.0.0.1:8080/ws").build()?);
//! let (orders, _events, recovered) =
//!     Channel::open_durable(&transport, "orders", ChannelOptions::publish_only(), &store).await?;
//! println!("{} publishes from an earlier run are being re-sent", recovered.pending.len());
//! let mut publish = orders.publish(&serde_json::json!({"order": 1}));
//! let seq = publish.accepted().await?; // committed to the file: survives a crash from here on
//! let ack = publish.await?; // stored by the hub
//! assert_eq!(ack.seq, seq);
//! # Ok(()) }
//! ```

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use redb::{Database, ReadableTable, TableDefinition};
use tether_transport::protocol::{check_identifier, ClientId, InstanceId, Payload, MAX_ID_LEN};
use tether_transport::TransportConfigBuilder;

use crate::error::{validate_name, ChannelError, DurableFailure};

/// Store-wide settings: `client_id`, `instance_id`.
const META: TableDefinition<&str, &str> = TableDefinition::new("meta");
/// Channel name → the producer id of its handle.
const PRODUCERS: TableDefinition<&str, &str> = TableDefinition::new("producers");
/// Channel name → the last sequence number given out (committed).
const LAST_SEQ: TableDefinition<&str, u64> = TableDefinition::new("last_seq");
/// (channel name, sequence number) → payload, for every publish accepted and not acknowledged.
const ENTRIES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("entries");

/// One client's durable outbox file. Cheap to clone (clones share the open file).
#[derive(Clone)]
pub struct DurableStore {
    inner: Arc<StoreInner>,
}

struct StoreInner {
    db: Database,
    path: PathBuf,
    client_id: ClientId,
    instance_id: InstanceId,
    /// Channels with a live handle on this store.
    open_channels: Mutex<HashSet<String>>,
}

impl std::fmt::Debug for DurableStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DurableStore")
            .field("path", &self.inner.path)
            .field("client_id", &self.inner.client_id)
            .field("instance_id", &self.inner.instance_id)
            .finish_non_exhaustive()
    }
}

/// Builder for [`DurableStore`].
#[derive(Debug, Clone)]
pub struct DurableStoreBuilder {
    path: PathBuf,
    client_id: Option<String>,
}

impl DurableStoreBuilder {
    /// The client id to store in a new file, or to check an existing file against (a
    /// different stored one is refused with [`DurableFailure::IdentityMismatch`]). Default: a
    /// random one, made up when the file is created and kept in it.
    pub fn client_id(mut self, id: impl Into<String>) -> Self {
        self.client_id = Some(id.into());
        self
    }

    /// Opens the file, creating it (and the identity in it) if it does not exist.
    pub fn open(self) -> Result<DurableStore, ChannelError> {
        let path = self.path;
        if let Some(id) = &self.client_id {
            check_identifier("client_id", id, MAX_ID_LEN, true)
                .map_err(|e| durable_error(&path, DurableFailure::InvalidOptions, e.to_string()))?;
        }
        let db = Database::create(&path).map_err(|e| classify(&path, e.into()))?;
        let fail = |e: redb::Error| classify(&path, e);
        let txn = db.begin_write().map_err(|e| fail(e.into()))?;
        let (client_id, instance_id) = {
            let mut meta = txn.open_table(META).map_err(|e| fail(e.into()))?;
            let stored_client = meta
                .get("client_id")
                .map_err(|e| fail(e.into()))?
                .map(|v| v.value().to_owned());
            let client_id = match (stored_client, self.client_id) {
                (Some(stored), Some(asked)) if stored != asked => {
                    return Err(durable_error(
                        &path,
                        DurableFailure::IdentityMismatch,
                        format!("the store belongs to client {stored:?}, not {asked:?}"),
                    ));
                }
                (Some(stored), _) => stored,
                (None, asked) => {
                    let id = asked.unwrap_or_else(|| ClientId::random().0);
                    meta.insert("client_id", id.as_str())
                        .map_err(|e| fail(e.into()))?;
                    id
                }
            };
            let stored_instance = meta
                .get("instance_id")
                .map_err(|e| fail(e.into()))?
                .map(|v| v.value().to_owned());
            let instance_id = match stored_instance {
                Some(id) => id,
                None => {
                    let id = InstanceId::random().0;
                    meta.insert("instance_id", id.as_str())
                        .map_err(|e| fail(e.into()))?;
                    id
                }
            };
            // Create the other tables so that readers never meet a missing one.
            txn.open_table(PRODUCERS).map_err(|e| fail(e.into()))?;
            txn.open_table(LAST_SEQ).map_err(|e| fail(e.into()))?;
            txn.open_table(ENTRIES).map_err(|e| fail(e.into()))?;
            (ClientId(client_id), InstanceId(instance_id))
        };
        txn.commit().map_err(|e| fail(e.into()))?;
        tracing::info!(path = %path.display(), client_id = %client_id, instance_id = %instance_id, "durable outbox open");
        Ok(DurableStore {
            inner: Arc::new(StoreInner {
                db,
                path,
                client_id,
                instance_id,
                open_channels: Mutex::new(HashSet::new()),
            }),
        })
    }
}

impl DurableStore {
    /// A builder for the store at `path`.
    pub fn builder(path: impl Into<PathBuf>) -> DurableStoreBuilder {
        DurableStoreBuilder {
            path: path.into(),
            client_id: None,
        }
    }

    /// Opens (or creates) the store at `path` with its stored identity (a random one for a
    /// new file).
    pub fn open(path: impl Into<PathBuf>) -> Result<DurableStore, ChannelError> {
        Self::builder(path).open()
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The client id kept in the store.
    pub fn client_id(&self) -> &ClientId {
        &self.inner.client_id
    }

    /// The instance id kept in the store.
    pub fn instance_id(&self) -> &InstanceId {
        &self.inner.instance_id
    }

    /// A transport configuration for `endpoint` with this store's identity (client id and
    /// instance id) — the transport a durable channel of this store must use.
    pub fn transport_config(&self, endpoint: impl Into<String>) -> TransportConfigBuilder {
        tether_transport::TransportConfig::builder(endpoint)
            .client_id(self.inner.client_id.0.clone())
            .instance_id(self.inner.instance_id.0.clone())
    }

    /// Publishes of `channel` stored and not yet acknowledged.
    pub fn queued(&self, channel: &str) -> Result<usize, ChannelError> {
        let fail = |e: redb::Error| classify(&self.inner.path, e);
        let txn = self.inner.db.begin_read().map_err(|e| fail(e.into()))?;
        let entries = txn.open_table(ENTRIES).map_err(|e| fail(e.into()))?;
        let range = entries
            .range((channel, 0)..=(channel, u64::MAX))
            .map_err(|e| fail(e.into()))?;
        let mut n = 0;
        for entry in range {
            entry.map_err(|e| fail(e.into()))?;
            n += 1;
        }
        Ok(n)
    }

    /// The last sequence number `channel` gave out (0 before its first publish).
    pub fn last_seq(&self, channel: &str) -> Result<u64, ChannelError> {
        let fail = |e: redb::Error| classify(&self.inner.path, e);
        let txn = self.inner.db.begin_read().map_err(|e| fail(e.into()))?;
        let table = txn.open_table(LAST_SEQ).map_err(|e| fail(e.into()))?;
        let last = table.get(channel).map_err(|e| fail(e.into()))?;
        Ok(last.map_or(0, |v| v.value()))
    }

    /// Takes `channel` for one handle and reads what an earlier run left: its producer id
    /// (made up and stored on first use), last sequence number and unacknowledged publishes.
    pub(crate) fn open_channel(
        &self,
        channel: &str,
    ) -> Result<(DurableChannel, Recovery), ChannelError> {
        validate_name(channel)?;
        {
            let mut open = self
                .inner
                .open_channels
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if !open.insert(channel.to_owned()) {
                return Err(durable_error(
                    &self.inner.path,
                    DurableFailure::ChannelInUse,
                    format!("channel {channel:?} already has a handle on this store"),
                ));
            }
        }
        // From here on the handle gives the name back when dropped, also on error.
        let handle = DurableChannel {
            store: self.clone(),
            name: channel.to_owned(),
        };
        let recovery = self.recover(channel)?;
        Ok((handle, recovery))
    }

    fn recover(&self, channel: &str) -> Result<Recovery, ChannelError> {
        let path = &self.inner.path;
        let fail = |e: redb::Error| classify(path, e);
        let txn = self.inner.db.begin_write().map_err(|e| fail(e.into()))?;
        let recovery = {
            let mut producers = txn.open_table(PRODUCERS).map_err(|e| fail(e.into()))?;
            let stored = producers
                .get(channel)
                .map_err(|e| fail(e.into()))?
                .map(|v| v.value().to_owned());
            let producer = match stored {
                Some(p) => p,
                None => {
                    let p = InstanceId::random().0;
                    producers
                        .insert(channel, p.as_str())
                        .map_err(|e| fail(e.into()))?;
                    p
                }
            };
            let last_seq = txn
                .open_table(LAST_SEQ)
                .map_err(|e| fail(e.into()))?
                .get(channel)
                .map_err(|e| fail(e.into()))?
                .map_or(0, |v| v.value());
            let entries_table = txn.open_table(ENTRIES).map_err(|e| fail(e.into()))?;
            let mut entries = Vec::new();
            for entry in entries_table
                .range((channel, 0)..=(channel, u64::MAX))
                .map_err(|e| fail(e.into()))?
            {
                let (key, value) = entry.map_err(|e| fail(e.into()))?;
                let seq = key.value().1;
                // Stored as published: JSON text, or opaque bytes (`Payload::from_bytes`), read
                // back as they are (whether they are JSON is checked where it matters: in a v1
                // frame). Any bytes are a valid payload, so none of them is `Corrupt`.
                let payload = Payload::from_unchecked(bytes::Bytes::copy_from_slice(value.value()));
                entries.push((seq, payload));
            }
            if let Some((seq, _)) = entries.last() {
                if *seq > last_seq {
                    return Err(durable_error(
                        path,
                        DurableFailure::Corrupt,
                        format!(
                            "publish {seq} of {channel:?} is past its last sequence {last_seq}"
                        ),
                    ));
                }
            }
            Recovery {
                producer,
                last_seq,
                entries,
            }
        };
        txn.commit().map_err(|e| fail(e.into()))?;
        Ok(recovery)
    }
}

/// What an earlier run left for one channel.
#[derive(Debug)]
pub(crate) struct Recovery {
    /// The channel handle's producer id.
    pub producer: String,
    /// The last sequence number given out.
    pub last_seq: u64,
    /// Publishes accepted and not acknowledged, in sequence order.
    pub entries: Vec<(u64, Payload)>,
}

/// One channel's hold on a [`DurableStore`]; gives the channel back when dropped.
pub(crate) struct DurableChannel {
    store: DurableStore,
    name: String,
}

impl std::fmt::Debug for DurableChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DurableChannel")
            .field("path", &self.store.inner.path)
            .field("name", &self.name)
            .finish()
    }
}

impl DurableChannel {
    /// Commits, in one write transaction, the publishes `appends` (in sequence order) and the
    /// removal of the acknowledged `removes`. Blocking: run it off the actor's thread. A
    /// commit with appends is durable when this returns; one with only removals is left for
    /// the next commit (or the OS) to flush — a removal lost in a crash only means the hub
    /// acknowledges that publish again as a duplicate after the restart.
    pub(crate) fn commit(
        &self,
        appends: &[(u64, Payload)],
        removes: &[u64],
    ) -> Result<(), ChannelError> {
        let path = &self.store.inner.path;
        let fail = |e: redb::Error| classify(path, e);
        let mut txn = self
            .store
            .inner
            .db
            .begin_write()
            .map_err(|e| fail(e.into()))?;
        if appends.is_empty() {
            txn.set_durability(redb::Durability::Eventual);
        }
        {
            let mut entries = txn.open_table(ENTRIES).map_err(|e| fail(e.into()))?;
            for (seq, payload) in appends {
                entries
                    .insert((self.name.as_str(), *seq), payload.as_bytes())
                    .map_err(|e| fail(e.into()))?;
            }
            for seq in removes {
                entries
                    .remove((self.name.as_str(), *seq))
                    .map_err(|e| fail(e.into()))?;
            }
        }
        if let Some((last, _)) = appends.last() {
            let mut last_seq = txn.open_table(LAST_SEQ).map_err(|e| fail(e.into()))?;
            last_seq
                .insert(self.name.as_str(), *last)
                .map_err(|e| fail(e.into()))?;
        }
        txn.commit().map_err(|e| fail(e.into()))
    }
}

impl DurableChannel {
    /// The store's file, for errors about it.
    pub(crate) fn path(&self) -> &Path {
        &self.store.inner.path
    }

    /// An I/O failure outside redb (the commit's thread went away).
    pub(crate) fn io_error(&self, message: String) -> ChannelError {
        durable_error(self.path(), DurableFailure::Io, message)
    }
}

impl Drop for DurableChannel {
    fn drop(&mut self) {
        self.store
            .inner
            .open_channels
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.name);
    }
}

fn durable_error(path: &Path, kind: DurableFailure, message: String) -> ChannelError {
    ChannelError::Durable {
        path: path.display().to_string(),
        kind,
        message,
    }
}

/// Sorts redb's errors into the crate's permanent and retryable kinds.
fn classify(path: &Path, error: redb::Error) -> ChannelError {
    let kind = match &error {
        redb::Error::DatabaseAlreadyOpen => DurableFailure::Locked,
        // What redb reads and cannot make sense of (a wrong magic number, a short file).
        redb::Error::Io(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof
            ) =>
        {
            DurableFailure::Corrupt
        }
        // Disk full, permissions, a failing device.
        redb::Error::Io(_) => DurableFailure::Io,
        // An earlier I/O failure poisoned this handle: only a reopen can help.
        redb::Error::PreviousIo => DurableFailure::Corrupt,
        _ => DurableFailure::Corrupt,
    };
    let message = match &error {
        redb::Error::DatabaseAlreadyOpen => {
            "the store is open in another process (or handle): one client per store".to_owned()
        }
        other => other.to_string(),
    };
    durable_error(path, kind, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(n: u64) -> Payload {
        Payload::from_json(&format!("{{\"n\":{n}}}")).unwrap()
    }

    fn temp_path(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "tether-durable-{}-{}",
            std::process::id(),
            InstanceId::random().0
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join(name)
    }

    #[test]
    fn identity_and_entries_survive_a_reopen() {
        let path = temp_path("reopen.redb");
        let (client, instance, producer) = {
            let store = DurableStore::open(&path).unwrap();
            let (channel, recovery) = store.open_channel("orders").unwrap();
            assert_eq!((recovery.last_seq, recovery.entries.len()), (0, 0));
            channel
                .commit(&[(1, p(1)), (2, p(2)), (3, p(3))], &[])
                .unwrap();
            channel.commit(&[], &[1]).unwrap();
            (
                store.client_id().clone(),
                store.instance_id().clone(),
                recovery.producer,
            )
        };
        let store = DurableStore::open(&path).unwrap();
        assert_eq!(store.client_id(), &client);
        assert_eq!(store.instance_id(), &instance);
        assert_eq!(store.queued("orders").unwrap(), 2);
        assert_eq!(store.last_seq("orders").unwrap(), 3);
        let (_channel, recovery) = store.open_channel("orders").unwrap();
        assert_eq!(recovery.producer, producer);
        assert_eq!(recovery.last_seq, 3);
        let seqs: Vec<_> = recovery.entries.iter().map(|(s, _)| *s).collect();
        assert_eq!(seqs, [2, 3]);
        assert_eq!(recovery.entries[0].1.json(), r#"{"n":2}"#);
        let config = store
            .transport_config("ws://127.0.0.1:1/ws")
            .build()
            .unwrap();
        assert_eq!(config.client_id, client);
        assert_eq!(config.instance_id, Some(instance));
    }

    #[test]
    fn opaque_payloads_survive_a_reopen_as_the_same_bytes() {
        let path = temp_path("opaque.redb");
        let blob: Vec<u8> = (0..=255u8).rev().collect();
        {
            let store = DurableStore::open(&path).unwrap();
            let (channel, _) = store.open_channel("blobs").unwrap();
            channel
                .commit(&[(1, Payload::from_bytes(blob.clone())), (2, p(2))], &[])
                .unwrap();
        }
        let store = DurableStore::open(&path).unwrap();
        let (_channel, recovery) = store.open_channel("blobs").unwrap();
        assert_eq!(recovery.entries[0].1.as_bytes(), &blob[..]);
        assert!(recovery.entries[0].1.checked_json().is_none());
        assert_eq!(recovery.entries[1].1.json(), r#"{"n":2}"#);
    }

    #[test]
    fn acks_remove_entries_and_the_last_sequence_stays() {
        let path = temp_path("acks.redb");
        let store = DurableStore::open(&path).unwrap();
        let (channel, _) = store.open_channel("c").unwrap();
        channel.commit(&[(1, p(1)), (2, p(2))], &[]).unwrap();
        channel.commit(&[(3, p(3))], &[1, 2]).unwrap();
        channel.commit(&[], &[3]).unwrap();
        assert_eq!(store.queued("c").unwrap(), 0);
        assert_eq!(store.last_seq("c").unwrap(), 3);
        // Channels of one store are kept apart.
        let (other, recovery) = store.open_channel("c2").unwrap();
        assert_eq!(recovery.last_seq, 0);
        other.commit(&[(1, p(1))], &[]).unwrap();
        assert_eq!(store.queued("c").unwrap(), 0);
        assert_eq!(store.queued("c2").unwrap(), 1);
    }

    #[test]
    fn a_second_open_of_the_file_is_refused_as_locked() {
        let path = temp_path("locked.redb");
        let store = DurableStore::open(&path).unwrap();
        match DurableStore::open(&path) {
            Err(ChannelError::Durable { kind, message, .. }) => {
                assert_eq!(kind, DurableFailure::Locked);
                assert!(!kind.is_permanent());
                assert!(message.contains("another process"), "{message}");
            }
            other => panic!("expected Locked, got {other:?}"),
        }
        drop(store);
        assert!(DurableStore::open(&path).is_ok());
    }

    #[test]
    fn one_handle_per_channel() {
        let store = DurableStore::open(temp_path("in-use.redb")).unwrap();
        let (first, _) = store.open_channel("c").unwrap();
        match store.open_channel("c") {
            Err(ChannelError::Durable { kind, .. }) => {
                assert_eq!(kind, DurableFailure::ChannelInUse)
            }
            other => panic!("expected ChannelInUse, got {other:?}"),
        }
        drop(first);
        assert!(store.open_channel("c").is_ok());
    }

    #[test]
    fn a_different_client_id_is_refused() {
        let path = temp_path("identity.redb");
        drop(
            DurableStore::builder(&path)
                .client_id("ada")
                .open()
                .unwrap(),
        );
        let again = DurableStore::builder(&path)
            .client_id("ada")
            .open()
            .unwrap();
        assert_eq!(again.client_id().0, "ada");
        drop(again);
        match DurableStore::builder(&path).client_id("bob").open() {
            Err(ChannelError::Durable { kind, .. }) => {
                assert_eq!(kind, DurableFailure::IdentityMismatch);
                assert!(kind.is_permanent());
            }
            other => panic!("expected IdentityMismatch, got {other:?}"),
        }
    }

    #[test]
    fn a_file_that_is_not_a_store_is_corrupt() {
        let path = temp_path("garbage.redb");
        std::fs::write(&path, vec![0x5a; 8192]).unwrap();
        match DurableStore::open(&path) {
            Err(ChannelError::Durable { kind, .. }) => {
                assert_eq!(kind, DurableFailure::Corrupt);
                assert!(kind.is_permanent());
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }
}
