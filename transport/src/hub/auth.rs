//! Pluggable authentication for the hub's handshake, and the [`Identity`] it establishes.
//!
//! An identity is whom the hub is talking to, as its authenticator decided — not what the client
//! claims. Everything a client can make the hub keep on its behalf belongs to its identity:
//! its resumable sessions (a `hello.resume` naming another identity's session gets a new
//! session, and the owner is neither evicted nor told) and its publish dedupe state (a publish
//! id is scoped by the identity, so nobody can have another identity's publishes acknowledged
//! as duplicates). Client ids, instance ids and session ids are not secrets; identities are what
//! keeps clients apart.

use std::collections::HashMap;
use std::sync::Arc;

use futures::future::BoxFuture;
use sha2::{Digest, Sha256};

use crate::error::TransportError;
use crate::protocol::{check_identifier, ClientId};

/// Longest identity an authenticator may issue, in bytes: 256.
pub const MAX_IDENTITY_LEN: usize = 256;

/// The prefix of every identity [`AllowAll`] issues (`anonymous:{client id}`); reserved: no
/// identity made with [`Identity::new`] starts with it.
pub const ANONYMOUS_PREFIX: &str = "anonymous:";

/// The prefix of the identities [`StaticTokens::new`] names its tokens with.
pub const TOKEN_PREFIX: &str = "token:";

/// Who a connection is, as the hub's [`Authenticator`] established it: sessions and publish
/// dedupe state belong to an identity, and one identity can never affect another's.
///
/// 1 to [`MAX_IDENTITY_LEN`] bytes, no control characters. Cheap to clone (shared text).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity(Arc<str>);

impl Identity {
    /// An identity named `name`: 1 to [`MAX_IDENTITY_LEN`] bytes, no control characters, not
    /// starting with [`ANONYMOUS_PREFIX`]. Otherwise `invalid_identifier` (permanent).
    pub fn new(name: impl Into<String>) -> Result<Self, TransportError> {
        let name = name.into();
        check_identifier("identity", &name, MAX_IDENTITY_LEN, true)?;
        if name.starts_with(ANONYMOUS_PREFIX) {
            return Err(TransportError::InvalidIdentifier {
                field: "identity",
                reason: format!("the prefix {ANONYMOUS_PREFIX:?} is reserved for AllowAll"),
            });
        }
        Ok(Identity(name.into()))
    }

    /// The identity [`AllowAll`] gives `client_id`: `anonymous:{client id}`. Every connection
    /// presenting the same client id has it, so they share sessions and dedupe state — as
    /// anyone can present any client id, this keeps nobody apart (development only).
    ///
    /// The hub bounds client ids (1 to 128 bytes, no control characters) before it asks the
    /// authenticator, so an anonymous identity is at most 138 bytes.
    pub fn anonymous(client_id: &ClientId) -> Self {
        Identity(format!("{ANONYMOUS_PREFIX}{client_id}").into())
    }

    /// The identity's name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether [`AllowAll`] issued it.
    pub fn is_anonymous(&self) -> bool {
        self.0.starts_with(ANONYMOUS_PREFIX)
    }
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why an authenticator refused a client. Sent to the client as a permanent `auth_rejected`
/// (or `auth_required`) error frame, after which the connection is closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthRejection {
    /// The hello carried no token and one is required.
    Missing,
    /// The token was refused, with a reason safe to show the client.
    Invalid(String),
}

/// Decides whether a hello may open a session, and as whom. Called once per connection, before
/// the welcome.
///
/// Returns a future so that implementations can ask an external service; it runs on the hub
/// worker that owns the connection. The [`Identity`] it resolves to owns the connection's
/// session and publishes: give two clients the same identity only when either may resume the
/// other's session and replay the other's publishes (one principal's fleet of processes, for
/// example — they still keep apart by client id and instance id, which the hub does not verify).
pub trait Authenticator: Send + Sync + 'static {
    /// Accepts `client_id` presenting `token` as an identity, or rejects it.
    fn authenticate(
        &self,
        client_id: &ClientId,
        token: Option<&str>,
    ) -> BoxFuture<'static, Result<Identity, AuthRejection>>;
}

/// Accepts everyone, each as the [anonymous identity](Identity::anonymous) of its client id. The
/// default, for development and tests.
///
/// Anyone who presents a client id is that client: with another client's id (and session id) a
/// peer can take over its session or have its publishes acknowledged as duplicates. Use an
/// authenticator that issues real identities on any hub others can reach.
#[derive(Debug, Clone, Copy, Default)]
pub struct AllowAll;

impl Authenticator for AllowAll {
    fn authenticate(
        &self,
        client_id: &ClientId,
        _token: Option<&str>,
    ) -> BoxFuture<'static, Result<Identity, AuthRejection>> {
        Box::pin(futures::future::ready(Ok(Identity::anonymous(client_id))))
    }
}

/// Accepts exactly the tokens it was given, each as its identity.
#[derive(Clone, Default)]
pub struct StaticTokens {
    tokens: HashMap<String, Identity>,
}

impl StaticTokens {
    /// An authenticator accepting any of `tokens`, each as the identity
    /// [`StaticTokens::token_identity`] names it: distinct per token, the same across restarts,
    /// nodes and reorderings of the list, and showing (in logs, in the store's keys) a hash of
    /// the token rather than the token — as safe as the token is hard to guess.
    pub fn new<I, S>(tokens: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        StaticTokens {
            tokens: tokens
                .into_iter()
                .map(|t| {
                    let t = t.into();
                    let identity = Self::token_identity(&t);
                    (t, identity)
                })
                .collect(),
        }
    }

    /// An authenticator accepting the given tokens, each as the identity beside it. Several
    /// tokens may share one identity (a token being rotated, say); one token given twice with
    /// different identities is refused (`invalid_config`).
    pub fn with_identities<I, S>(tokens: I) -> Result<Self, TransportError>
    where
        I: IntoIterator<Item = (S, Identity)>,
        S: Into<String>,
    {
        let mut map = HashMap::new();
        for (token, identity) in tokens {
            let token = token.into();
            if let Some(previous) = map.get(&token) {
                if *previous != identity {
                    return Err(TransportError::InvalidConfig {
                        field: "StaticTokens::with_identities",
                        reason: format!(
                            "a token is given for two identities ({previous} and {identity})"
                        ),
                    });
                }
            }
            map.insert(token, identity);
        }
        Ok(StaticTokens { tokens: map })
    }

    /// The identity [`StaticTokens::new`] gives `token`: `token:` and the first 16 hex digits
    /// of the token's SHA-256.
    pub fn token_identity(token: &str) -> Identity {
        let digest = Sha256::digest(token.as_bytes());
        let mut name = String::with_capacity(TOKEN_PREFIX.len() + 16);
        name.push_str(TOKEN_PREFIX);
        for byte in &digest[..8] {
            name.push_str(&format!("{byte:02x}"));
        }
        Identity(name.into())
    }

    /// Number of tokens accepted.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether no token is accepted.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

/// Shows how many tokens, never the tokens.
impl std::fmt::Debug for StaticTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaticTokens")
            .field("tokens", &self.tokens.len())
            .finish()
    }
}

impl Authenticator for StaticTokens {
    fn authenticate(
        &self,
        _client_id: &ClientId,
        token: Option<&str>,
    ) -> BoxFuture<'static, Result<Identity, AuthRejection>> {
        let result = match token {
            None => Err(AuthRejection::Missing),
            Some(t) => match self.tokens.get(t) {
                Some(identity) => Ok(identity.clone()),
                None => Err(AuthRejection::Invalid("unknown token".into())),
            },
        };
        Box::pin(futures::future::ready(result))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(name: &str) -> Identity {
        Identity::new(name).unwrap()
    }

    #[tokio::test]
    async fn static_tokens_accept_only_known_tokens() {
        let auth = StaticTokens::new(["good"]);
        let id = ClientId("c".into());
        assert_eq!(
            auth.authenticate(&id, Some("good")).await,
            Ok(StaticTokens::token_identity("good"))
        );
        assert_eq!(
            auth.authenticate(&id, Some("bad")).await,
            Err(AuthRejection::Invalid("unknown token".into()))
        );
        assert_eq!(
            auth.authenticate(&id, None).await,
            Err(AuthRejection::Missing)
        );
    }

    #[test]
    fn token_identities_are_distinct_stable_and_do_not_show_the_token() {
        let a = StaticTokens::token_identity("secret-a");
        let b = StaticTokens::token_identity("secret-b");
        assert_ne!(a, b);
        assert_eq!(a, StaticTokens::token_identity("secret-a"));
        // SHA-256("abc") begins ba7816bf8f01cfea.
        assert_eq!(
            StaticTokens::token_identity("abc").as_str(),
            "token:ba7816bf8f01cfea"
        );
        assert!(!a.as_str().contains("secret"));
        assert!(!a.is_anonymous());
        assert!(!format!("{:?}", StaticTokens::new(["secret-a"])).contains("secret"));
    }

    #[tokio::test]
    async fn static_tokens_with_identities_answer_each_token_with_its_identity() {
        let auth = StaticTokens::with_identities([
            ("t-alice", named("alice")),
            ("t-alice-next", named("alice")),
            ("t-bob", named("bob")),
        ])
        .unwrap();
        assert_eq!(auth.len(), 3);
        let id = ClientId("c".into());
        assert_eq!(
            auth.authenticate(&id, Some("t-alice")).await,
            Ok(named("alice"))
        );
        assert_eq!(
            auth.authenticate(&id, Some("t-alice-next")).await,
            Ok(named("alice"))
        );
        assert_eq!(
            auth.authenticate(&id, Some("t-bob")).await,
            Ok(named("bob"))
        );
        assert!(auth.authenticate(&id, Some("alice")).await.is_err());

        let conflict = StaticTokens::with_identities([("t", named("alice")), ("t", named("bob"))])
            .unwrap_err();
        assert!(matches!(conflict, TransportError::InvalidConfig { .. }));
        assert!(StaticTokens::with_identities([("t", named("a")), ("t", named("a"))]).is_ok());
    }

    #[tokio::test]
    async fn allow_all_gives_each_client_id_its_anonymous_identity() {
        let a = ClientId("a".into());
        let b = ClientId("b".into());
        let of_a = AllowAll.authenticate(&a, None).await.unwrap();
        assert_eq!(of_a.as_str(), "anonymous:a");
        assert!(of_a.is_anonymous());
        assert_eq!(AllowAll.authenticate(&a, Some("x")).await.unwrap(), of_a);
        assert_ne!(AllowAll.authenticate(&b, None).await.unwrap(), of_a);
    }

    #[test]
    fn identities_are_bounded_and_cannot_pose_as_anonymous() {
        assert!(Identity::new("alice").is_ok());
        assert!(Identity::new("x".repeat(MAX_IDENTITY_LEN)).is_ok());
        for bad in [
            String::new(),
            "x".repeat(MAX_IDENTITY_LEN + 1),
            "a\nb".to_owned(),
            "anonymous:a".to_owned(),
        ] {
            let err = Identity::new(bad).unwrap_err();
            assert!(matches!(
                err,
                TransportError::InvalidIdentifier {
                    field: "identity",
                    ..
                }
            ));
            assert!(err.is_permanent());
        }
    }
}
